"""torch.distributed.checkpoint directories (``.metadata`` + ``*.distcp``; accelerate and FSDP save them):
reading one tensor at a time, writing the forecast as a DCP directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from farcast_core.dtypes import DTYPES, dtype_of, to_storage
from farcast_core.errors import CheckpointError
from farcast.storage.layouts.base import DAMAGED as _DAMAGED, CheckpointReader, Forecasted, TensorInfo
from farcast.storage.writers import naming

SHARD_SUFFIX = ".distcp"
METADATA = ".metadata"


def is_dcp_dir(d: Path) -> bool:
    return (d / METADATA).is_file() or any(d.glob("*" + SHARD_SUFFIX))


def incomplete(d: Path) -> str | None:
    """Why a DCP directory is not complete yet, or None."""
    return None if (d / METADATA).is_file() else "no .metadata yet (dcp.save writes it last)"


def is_weights(p: Path) -> bool:
    """A file of the DCP checkpoint itself (not an extra file saved beside it)."""
    return p.suffix == SHARD_SUFFIX or p.name == METADATA


class DCPReader(CheckpointReader):
    """torch.distributed.checkpoint directories: planned from .metadata, one tensor loaded at a time."""

    def __init__(self, path: Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        try:
            meta = FileSystemReader(str(path)).read_metadata()
        except Exception as e:
            raise CheckpointError(f"{path}/.metadata: cannot be read ({type(e).__name__}); {_DAMAGED}") from e
        self.tensors = {}
        for name, m in meta.state_dict_metadata.items():
            if isinstance(m, TensorStorageMetadata) and not name.startswith(("optim", "optimizer")):
                try:
                    dtype = dtype_of(m.properties.dtype).name
                except KeyError as e:
                    raise CheckpointError(f"{path}: tensor '{name}': unsupported dtype {m.properties.dtype}") from e
                self.tensors[name] = TensorInfo(name, tuple(m.size), dtype, str(path))
        self._cached = None  # (name, tensor): one whole tensor at a time

    def _tensor(self, name: str):
        if self._cached is None or self._cached[0] != name:
            import torch
            import torch.distributed.checkpoint as dcp

            info = self.tensors[name]
            buf = {name: torch.empty(info.shape, dtype=DTYPES[info.dtype].torch)}
            self._cached = None
            try:
                dcp.load(buf, storage_reader=dcp.FileSystemReader(str(self.path)), no_dist=True)
            except Exception as e:
                raise CheckpointError(f"{self.path}: tensor '{name}': cannot be loaded ({type(e).__name__}: {e}); {_DAMAGED}") from e
            self._cached = (name, buf[name])
        return self._cached[1]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return to_storage(self._tensor(name).reshape(-1)[start:stop])

    def close(self) -> None:
        self._cached = None


def write(dst: Path, fc: Forecasted) -> list[str]:
    """The forecast as a DCP checkpoint in the directory ``dst``; returns the files written."""
    import torch.distributed.checkpoint as dcp

    with naming(dst):
        dcp.save({name: fc.tensor(name) for name in fc.specs}, checkpoint_id=str(dst), no_dist=True)
    return [METADATA]
