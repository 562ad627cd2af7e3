"""Pure numerics of weight farcasting: no file access, no orchestration."""

from farcast_core.chunks import ChunkPlan, chunk_len, chunk_plan
from farcast_core.dtypes import DTYPES, DType, from_storage, to_storage, widen
from farcast_core.errors import CheckpointError, FarcastError, SequenceMismatchError, StoreError

__all__ = [
    "ChunkPlan", "chunk_len", "chunk_plan",
    "DTYPES", "DType", "from_storage", "to_storage", "widen",
    "FarcastError", "CheckpointError", "SequenceMismatchError", "StoreError",
]
