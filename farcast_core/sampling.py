"""Which parameters of each chunk the fit looks at, and where ingest keeps their values.

A forecaster is fitted on ``sample`` parameters drawn per chunk (method page, section 4). The
draw depends only on the tensor's name, the chunk's index and the seed, never on the order in
which chunks are processed, so ingest can pick the same parameters as the fit and keep their
values in one small array beside the full ones (``SampleLayout``): the fit then reads a few
rows of that array instead of every chunk of the model.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from farcast_core.dtypes import widen_np

SAMPLE = 4096  # parameters sampled per chunk by default (FitConfig.sample)
SEED = 0  # the default sample seed (FitConfig.seed)


def chunk_seed(seed: int, name: str, chunk: int) -> int:
    """A sample seed per chunk that depends on the tensor name, not on processing order."""
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 4_099 + chunk) % (2**63)


def sample_index(n: int, l: int, seed: int) -> np.ndarray:
    """A sorted, seeded sample of l of n positions (all of them when n <= l), as int64."""
    if n <= l:
        return np.arange(n, dtype=np.int64)
    # numpy, not torch: ingest draws the sample too, and must not pay torch's import for it
    return np.sort(np.random.default_rng(seed).choice(n, size=l, replace=False)).astype(np.int64)


@dataclass
class SampleLayout:
    """Columns of the sample array: chunk (name, i) holds columns ``spans[(name, i)]``.

    Every float tensor's chunks, in manifest order, each with min(chunk length, size) columns.
    """

    size: int  # parameters per chunk (FitConfig.sample)
    seed: int  # FitConfig.seed
    spans: dict[tuple[str, int], tuple[int, int]]
    width: int
    _index: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, chunks: list[tuple[str, int, int]], size: int, seed: int) -> "SampleLayout":
        """From (tensor name, chunk index, chunk length) of every float chunk, in order."""
        spans, at = {}, 0
        for name, i, n in chunks:
            spans[(name, i)] = (at, at + min(n, size))
            at += min(n, size)
        return cls(size, seed, spans, at)

    def index(self, name: str, i: int, n: int) -> np.ndarray:
        """Positions within chunk (name, i) of length n that the sample holds (drawn once, kept)."""
        key = (name, i)
        if key not in self._index:
            self._index[key] = sample_index(n, self.size, chunk_seed(self.seed, name, i))
        return self._index[key]

    def take(self, out: np.ndarray, name: str, i: int, values: np.ndarray, dtype: str) -> None:
        """Put chunk (name, i)'s sampled values, from its stored ``values``, into its columns of ``out``
        (one row of the sample array), widened to float (``dtype``: the tensor's)."""
        s0, s1 = self.spans[(name, i)]
        out[s0:s1] = widen_np(values[self.index(name, i, len(values))], dtype)

    def serves(self, size: int, seed: int) -> bool:
        return size == self.size and seed == self.seed
