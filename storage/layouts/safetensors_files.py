"""safetensors files (single, or shards of a Hugging Face directory): header validation, reading
by positioned reads, and writing a forecast streamed chunk by chunk in a source file's order."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from farcast_core.dtypes import DTYPES, SAFETENSORS_DTYPES
from farcast_core.errors import CheckpointError, StoreError
from farcast.storage.layouts.base import DAMAGED as _DAMAGED, CheckpointReader, Forecasted, TensorInfo
from farcast.storage.writers import naming

_ST_NAME = {v: k for k, v in SAFETENSORS_DTYPES.items()}

MAX_HEADER = 100_000_000  # bytes; the safetensors library's own limit


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(data start offset, header dict) of a safetensors file, validated as the safetensors library does.

    Accepted exactly when ``safetensors.safe_open`` accepts the file: a JSON object header of at
    most 100 MB that fits the file; every tensor with a known dtype, a shape and data offsets;
    the tensors, ordered by offset, tile the data section from byte 0 without gap or overlap, each
    exactly as long as its shape and dtype need, and end where the file ends.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes, no safetensors header); {_DAMAGED}")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: bad safetensors header (length {n}, file size {size}); {_DAMAGED}")
            raw = f.read(n)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: vanished while being read (rotated by the trainer?); rerun") from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise CheckpointError(f"{path}: bad safetensors header (not JSON, or not an object); {_DAMAGED}") from e
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: bad safetensors header (__metadata__ is not a map of strings); {_DAMAGED}")
    spans = []
    for name, h in header.items():
        if name == "__metadata__":
            continue
        try:
            if not isinstance(h["shape"], list) or len(h["data_offsets"]) != 2:
                raise ValueError("bad shape or offsets")
            dtype = DTYPES[SAFETENSORS_DTYPES[h["dtype"]]]
            shape = tuple(_uint(d) for d in h["shape"])
            begin, end = (_uint(o) for o in h["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor '{name}': unsupported or bad header entry {h}; {_DAMAGED}") from e
        spans.append((begin, end, name, math.prod(shape) * dtype.storage.itemsize))
    pos = 0
    for begin, end, name, nbytes in sorted(spans):
        if begin != pos or end < begin:
            raise CheckpointError(
                f"{path}: tensor '{name}': data offsets [{begin}, {end}] "
                + ("overlap the previous tensor" if begin < pos else "leave a gap after the previous tensor" if begin > pos
                   else "are reversed")
                + f"; {_DAMAGED}"
            )
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor '{name}': header size does not match shape and dtype; {_DAMAGED}")
        pos = end
    if 8 + n + pos > size:
        cut = next(name for _, end, name, _ in sorted(spans) if 8 + n + end > size)
        raise CheckpointError(
            f"{path}: truncated: tensor '{cut}' ends at byte {8 + n + header[cut]['data_offsets'][1]} but the file "
            f"has {size}; {_DAMAGED}"
        )
    if 8 + n + pos < size:
        raise CheckpointError(f"{path}: {size - 8 - n - pos} bytes after the last tensor; {_DAMAGED}")
    return 8 + n, header


def _uint(v) -> int:
    """A JSON non-negative integer (safetensors' usize): no bools, no floats, no negatives."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v >= 2**64:
        raise ValueError(f"{v!r} is not a non-negative integer")
    return v


class SafetensorsReader(CheckpointReader):
    """safetensors files read with plain positioned reads: memory is the slice, never the file."""

    def __init__(self, files: tuple[Path, ...]):
        self.tensors, self._where = {}, {}
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{path}: vanished (rotated by the trainer?), or named by the shard index but "
                                      "never written; rerun, or move this checkpoint aside")
            base, header = read_safetensors_header(path)  # validated: offsets tile the data exactly
            for name, h in header.items():
                if name == "__metadata__":
                    continue
                dtype = DTYPES[SAFETENSORS_DTYPES[h["dtype"]]]
                self.tensors[name] = TensorInfo(name, tuple(h["shape"]), dtype.name, str(path))
                self._where[name] = (path, base + h["data_offsets"][0], dtype.storage)
        self._fds: dict[Path, int] = {}

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        path, offset, np_dtype = self._where[name]
        stop = self.tensors[name].numel if stop is None else stop
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except FileNotFoundError as e:
                raise CheckpointError(f"{path}: vanished while being read (rotated by the trainer?); nothing of this "
                                      "step was committed: rerun") from e
        out = np.empty(stop - start, dtype=np_dtype)
        view = memoryview(out).cast("B")
        want, pos, got = view.nbytes, offset + start * np_dtype.itemsize, 0
        while got < want:
            n = os.preadv(fd, [view[got:]], pos + got)
            if n == 0:
                raise CheckpointError(f"{path}: tensor '{name}': short read (file shrank while reading); {_DAMAGED}")
            got += n
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


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


def write_like(src: Path, dst: Path, fc: Forecasted) -> None:
    """A safetensors file with ``src``'s tensors, order and metadata, holding the forecast."""
    _, header = read_safetensors_header(src)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    _write(fc, names, dst, {**header.get("__metadata__", {}), **fc.metadata})


def write_all(dst: Path, fc: Forecasted) -> None:
    """One safetensors file holding every tensor of the forecast (beside torch pickles and DCP shards)."""
    _write(fc, sorted(fc.specs), dst, {"format": "pt", **fc.metadata})


def _write(fc: Forecasted, names: list[str], dst: Path, meta: dict) -> None:
    stream_safetensors(dst, [(n, *fc.specs[n]) for n in names], fc.stream(names), meta)
