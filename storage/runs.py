"""Which store holds which run: the default store of a checkpoint directory, and the store an
ingest with ``--store`` used for it, remembered so that later commands given the checkpoint
directory reuse it instead of building a second copy.

Both live under ``$FARCAST_HOME`` (default ``~/.cache/farcast``): ``stores/<name>-<hash>`` (the
default stores) and ``runs/<name>-<hash>.json`` ({"source": the run's absolute path, "store": URL}).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def farcast_home() -> Path:
    return Path(os.environ.get("FARCAST_HOME", Path.home() / ".cache" / "farcast"))


def keyed_name(name: str, identity: str) -> str:
    """``<name>-<10 hex digits of a hash of identity>``: a readable file name that two identities never share
    (run directories' keys, remote stores' forecaster folders)."""
    return f"{name}-{hashlib.sha1(identity.encode()).hexdigest()[:10]}"


def _key(ckpt_dir: str | os.PathLike) -> tuple[Path, str]:
    root = Path(ckpt_dir).resolve()
    return root, keyed_name(root.name, str(root))


def run_key(ckpt_dir: str | os.PathLike) -> str:
    """A run directory's key, ``<name>-<hash of its absolute path>``: its default store's and its record's name."""
    return _key(ckpt_dir)[1]


def default_store(ckpt_dir: str | os.PathLike) -> Path:
    """A per-run store outside the checkpoint directory: $FARCAST_HOME/stores/<name>-<hash>."""
    return farcast_home() / "stores" / _key(ckpt_dir)[1]


def remember_store(ckpt_dir: str | os.PathLike, store_url: str | os.PathLike) -> None:
    """Record that ``store_url`` holds the run at ``ckpt_dir`` (best effort: a read-only home only loses the hint)."""
    root, key = _key(ckpt_dir)
    url = str(store_url)
    if "://" not in url:
        url = str(Path(url).resolve())
    if Path(url) == default_store(root):
        return
    path = farcast_home() / "runs" / f"{key}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"source": str(root), "store": url}) + "\n")
        os.replace(tmp, path)  # readers see the old record or the new one
    except OSError:
        tmp.unlink(missing_ok=True)


def store_for(ckpt_dir: str | os.PathLike) -> str:
    """The store the last ``ingest --store`` used for ``ckpt_dir`` while it still exists, else the default store."""
    root, key = _key(ckpt_dir)
    try:
        rec = json.loads((farcast_home() / "runs" / f"{key}.json").read_text())
    except (OSError, ValueError):
        rec = {}
    url = rec.get("store") if rec.get("source") == str(root) else None
    if url and ("://" in url or (Path(url) / "zarr.json").is_file()):
        return url
    return str(default_store(root))
