"""What every checkpoint layout module shares: the reader interface and what a forecast checkpoint is made of."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

DAMAGED = "the file is incomplete or damaged: re-save it, or move this checkpoint aside and rerun"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a checkpoint's headers describe it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # canonical name from farcast_core.dtypes
    file: str  # the file that holds it

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class CheckpointReader:
    """Lazy access to one checkpoint: headers first, then tensor slices on demand."""

    tensors: dict[str, TensorInfo]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Values [start, stop) of the flattened tensor, in the store's representation."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class Forecasted:
    """A forecast checkpoint as the layout writers need it (``pipelines/emit.py`` builds it).

    ``stream(names)`` yields (name, chunk) for every chunk of ``names`` in order, in the store's
    representation; ``tensor(name)`` is one whole tensor (torch). Step counters and schedules
    move from ``newest_step`` to ``target``; ``lr_factor`` is the schedule's multiplier on the base
    learning rate at the target when the schedule is known.
    """

    specs: dict[str, tuple[str, tuple[int, ...]]]  # every tensor of the run: name -> (dtype, shape)
    stream: Callable[[list[str]], Iterator[tuple[str, np.ndarray]]]
    tensor: Callable[[str], object]
    newest_step: int
    target: int
    metadata: dict[str, str]  # added to every safetensors file written
    optimizer: str = "keep"  # keep: the newest optimizer state; reset: same param groups, empty state
    allow_pickle: bool = False
    lr_factor: float | None = None
