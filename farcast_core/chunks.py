"""Chunk planning: how many values of one tensor form the unit of storage and fitting."""

from dataclasses import dataclass

# Fitting holds at most this many float32 rows of one chunk at once (s_0, the cuts, the
# interpolation neighbours of each horizon point, the latest step): 64 is a safe ceiling
# for the default 8 cuts x 4 horizon points.
ROWS_IN_FLIGHT = 64
MIN_CHUNK = 1 << 12  # below this the per-chunk overhead dominates
MAX_CHUNK = 1 << 22  # above this one sampled forecaster covers too many weights


@dataclass(frozen=True)
class ChunkPlan:
    numel: int  # values in the tensor
    chunk: int  # values per chunk (the last one may be shorter)

    @property
    def n_chunks(self) -> int:
        return max(1, -(-self.numel // self.chunk))

    def bounds(self, i: int) -> tuple[int, int]:
        """[start, stop) of chunk i in the flattened tensor."""
        return i * self.chunk, min(self.numel, (i + 1) * self.chunk)


def chunk_len(memory_budget_bytes: int) -> int:
    """Values per chunk for a memory budget: a power of two, so chunks align across tensors."""
    per_row = max(1, memory_budget_bytes // (4 * ROWS_IN_FLIGHT))
    n = 1 << (per_row.bit_length() - 1)
    return min(MAX_CHUNK, max(MIN_CHUNK, n))


def chunk_plan(numel: int, memory_budget_bytes: int) -> ChunkPlan:
    """The chunk plan of a tensor of ``numel`` values (small tensors are one chunk)."""
    c = chunk_len(memory_budget_bytes)
    return ChunkPlan(numel=numel, chunk=max(1, min(c, numel)))
