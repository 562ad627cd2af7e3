"""Checkpoint writers. Every write goes to a temporary name in the target directory, then is renamed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from safetensors.torch import save_file

from farcast_core.dtypes import DTYPES, SAFETENSORS_DTYPES
from farcast_core.errors import StoreError

_ST_NAME = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
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
    with open(path, "wb") as f:
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
    torch.save(obj, path)


def load_torch(path: Path, allow_pickle: bool = False):
    """A torch pickle that farcast copies and patches (optimizer, scheduler, Lightning checkpoint)."""
    return torch.load(path, map_location="cpu", weights_only=not allow_pickle)


def save_dcp(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(state_dict, checkpoint_id=str(path), no_dist=True)


def copy_file(src: Path, dst: Path) -> None:
    shutil.copy2(src, dst)


class StagedOutput:
    """A directory entry built under a temporary name beside its final place, then renamed.

    Nothing appears at ``final`` until ``commit``; an error leaves ``final`` as it was.
    """

    def __init__(self, final: Path, overwrite: bool):
        self.final = final
        if final.exists() and not overwrite:
            raise StoreError(f"{final}: already exists; pass --force to replace it, or choose another --out")
        final.parent.mkdir(parents=True, exist_ok=True)
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
