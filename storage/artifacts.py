"""Fitted forecasters on disk: one safetensors file (A, b) with everything else in its metadata."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from safetensors import safe_open

from farcast_core.errors import ForecastError, StoreError
from farcast_core.forecaster import FitConfig, Forecasters
from farcast.storage.checkpoints import is_inside
from farcast.storage.runs import farcast_home, keyed_name
from farcast.storage.store import VERSION
from farcast.storage.writers import check_writable_dir, save_safetensors


def default_forecaster_path(store_url: str, target_step: int) -> Path:
    """Where `farcast fit` saves by default: beside a local store; under $FARCAST_HOME/forecasters for a
    store at a remote URL (s3://...)."""
    url = str(store_url)
    if "://" in url and not url.startswith("file://"):  # a remote store: a local folder per store URL
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", url.split("://", 1)[1]).strip("-")[-60:]
        return farcast_home() / "forecasters" / keyed_name(slug, url) / forecaster_name(target_step)
    p = Path(url.removeprefix("file://"))
    return p.parent / f"{p.name}.forecasters" / forecaster_name(target_step)


def forecaster_path(out: str | os.PathLike | None, store_url: str, source: str, target_step: int,
                    force: bool = False) -> Path:
    """Where `farcast fit` saves the forecasters for ``target_step``: in the directory ``out``, or by
    default beside the store (farcast's own file there: a refit replaces it). Checked before fitting:
    never inside the run's directory or the store, and an existing file is replaced only with ``force``."""
    if out is not None and Path(out).is_file():
        raise StoreError(f"--out {out} is a file; --out names the directory to save the forecasters in "
                         f"(as {forecaster_name(target_step)})")
    path = Path(out) / forecaster_name(target_step) if out else default_forecaster_path(str(store_url), target_step)
    return check_forecaster_path(store_url, source, path, force or out is None)


def check_forecaster_path(store_url: str, source: str, path: Path, force: bool) -> Path:
    """Where a forecaster file may go: outside the run's directory and the store, new unless ``force``."""
    path = Path(path).resolve()
    if is_inside(path, source):
        raise ForecastError(f"--out {path} is inside the checkpoint directory {source}; it would overwrite or "
                            "pose as one of the run's checkpoints: save the forecasters elsewhere")
    local = "://" not in store_url or store_url.startswith("file://")
    if local and is_inside(path, store_url.removeprefix("file://")):
        raise ForecastError(f"--out {path} is inside the store {store_url}; save the forecasters elsewhere")
    if path.is_dir():
        raise StoreError(f"{path} is a directory; move it away or choose another --out")
    if path.exists() and not force:
        raise StoreError(f"{path}: already exists; pass --force to replace it, or choose another --out")
    check_writable_dir(path.parent)
    return path


def forecaster_name(target_step: int) -> str:
    """The file name of forecasters fitted for ``target_step`` (in --out, or beside the store)."""
    return f"target_{target_step}.safetensors"


def save_forecasters(fc: Forecasters, path: str | os.PathLike, extra: dict | None = None) -> Path:
    meta = {
        "keys": fc.keys,
        "chunks": fc.chunks,
        "config": fc.config.to_json(),
        "rho": fc.rho,
        "ratios": list(fc.ratios),
        "feature_ratios": list(fc.feature_ratios),
        "steps": fc.steps,
        "excluded": fc.excluded,
        "times": fc.times,
        "axis": fc.axis,
        "shrink": fc.shrink,
        "farcast_version": VERSION,
        **(extra or {}),
    }
    return save_safetensors({"A": fc.A, "b": fc.b}, path, {"farcast": json.dumps(meta)})


def load_forecasters(path: str | os.PathLike) -> tuple[Forecasters, dict]:
    """(forecasters, the full metadata) from a file written by ``save_forecasters``."""
    path = Path(path)
    try:
        with safe_open(str(path), "np") as f:
            meta = json.loads(f.metadata()["farcast"])
            A, b = f.get_tensor("A"), f.get_tensor("b")
    except Exception as e:
        raise StoreError(f"{path}: not a farcast forecaster file ({type(e).__name__}: {e}); fit one with 'farcast fit'") from e
    fc = Forecasters(
        keys=[tuple(k) for k in meta["keys"]], chunks=meta["chunks"], A=A, b=b,
        config=FitConfig.from_json(meta["config"]), rho=meta["rho"], ratios=tuple(meta["ratios"]),
        feature_ratios=tuple(meta["feature_ratios"]),
        steps=meta["steps"], excluded=meta["excluded"], times=meta.get("times"), axis=meta.get("axis"),
        shrink=meta.get("shrink"),
    )
    return fc, meta
