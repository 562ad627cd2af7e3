"""Checkpoint writers. Every write goes to a temporary name in the target directory, then is renamed."""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from safetensors.torch import save_file

from farcast_core.dtypes import DTYPES, SAFETENSORS_DTYPES
from farcast_core.errors import StoreError
from storage.checkpoints import load_torch_file
from storage.lock import pid_alive

_ST_NAME = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@contextmanager
def naming(path: Path):
    """OS errors raised inside name ``path`` when they name no file (a write hitting a full disk)."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming(path):
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def stream_safetensors(
    path: Path,
    specs: list[tuple[str, str, tuple[int, ...]]],
    chunks: Iterable[tuple[str, np.ndarray]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a safetensors file tensor by tensor, chunk by chunk (memory: one chunk).

    ``specs`` lists (name, dtype, shape) in file order; ``chunks`` yields (name, values in the
    store's representation) in that same order, each tensor's chunks consecutive. Returns bytes.
    """
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    sizes = {}
    for name, dtype, shape in specs:
        n = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].storage.itemsize
        header[name] = {"dtype": _ST_NAME[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        sizes[name] = n
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    written = {name: 0 for name in sizes}
    order = [s[0] for s in specs]
    pos = 0
    with naming(path), open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, values in chunks:
            while written[order[pos]] == sizes[order[pos]] and order[pos] != name:
                pos += 1
            if order[pos] != name:
                raise StoreError(f"{path}: tensor '{name}' written out of order")
            f.write(np.ascontiguousarray(values).tobytes())
            written[name] += values.nbytes
        f.flush()
        os.fsync(f.fileno())
    short = [n for n in order if written[n] != sizes[n]]
    if short:
        raise StoreError(f"{path}: tensor '{short[0]}' got {written[short[0]]} of {sizes[short[0]]} bytes")
    return 8 + len(raw) + offset


def save_torch(obj, path: Path) -> None:
    """torch.save to ``path`` (callers write inside a temporary directory that is renamed later)."""
    with naming(path):
        torch.save(obj, path)


def load_torch(path: Path, allow_pickle: bool = False):
    """A torch pickle that farcast copies and patches (optimizer, scheduler, Lightning checkpoint)."""
    return load_torch_file(path, allow_pickle)


def check_writable_dir(d: Path) -> None:
    """Refuse an output directory that cannot be created or written, before any work is done."""
    d = Path(d)
    probe = d
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise StoreError(f"{probe}: is a file, so {d} cannot be made a directory; choose another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(13, "Permission denied (cannot write there)", str(probe))


def save_dcp(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with naming(path):
        dcp.save(state_dict, checkpoint_id=str(path), no_dist=True)


def copy_file(src: Path, dst: Path) -> None:
    with naming(dst):
        shutil.copy2(src, dst)


_LEFTOVER = re.compile(r"^\.farcast-(tmp|old)-(\d+)-(.+)$|^\.(.+)\.tmp-(\d+)$")


def sweep_leftovers(d: Path) -> list[str]:
    """Remove what killed farcast processes on this host left in ``d``; returns the names removed.

    A ``.farcast-old-PID-NAME`` whose NAME is missing is the previous output, moved aside by a
    process killed just before it renamed the new one into place: it is put back, not removed.
    """
    removed = []
    try:
        entries = list(d.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _LEFTOVER.match(p.name)
        if not m:
            continue
        pid = int(m.group(2) or m.group(5))
        if pid == os.getpid() or pid_alive(pid):
            continue
        if m.group(1) == "old" and not (d / m.group(3)).exists():
            os.replace(p, d / m.group(3))
            continue
        StagedOutput._clear(p)
        removed.append(p.name)
    return removed


class StagedOutput:
    """A directory entry built under a temporary name beside its final place, then renamed.

    Nothing appears at ``final`` until ``commit``; an error leaves ``final`` as it was.
    """

    def __init__(self, final: Path, overwrite: bool):
        self.final = final
        if final.exists() and not overwrite:
            raise StoreError(f"{final}: already exists; pass --force to replace it, or choose another --out")
        final.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(final.parent)
        self.tmp = final.parent / f".farcast-tmp-{os.getpid()}-{final.name}"
        self._clear(self.tmp)

    @staticmethod
    def _clear(p: Path) -> None:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    def commit(self) -> Path:
        old = self.final.parent / f".farcast-old-{os.getpid()}-{self.final.name}"
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        self._clear(old)
        return self.final

    def abort(self) -> None:
        self._clear(self.tmp)

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()
