"""The settings of fitting and emitting, as frozen dataclasses: defaults stated here once (the command
line derives its options' defaults from them), saved as JSON into every output. No torch here:
the command line imports this module for every command, ingest included."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from farcast_core.errors import ConfigError
from farcast_core.sampling import SAMPLE, SEED

AXES = ("auto", "steps", "lr")  # FitConfig.axis
OPTIMIZER_POLICIES = ("keep", "reset")  # EmitConfig.optimizer
NONFINITE_POLICIES = ("refuse", "last-finite")  # EmitConfig.nonfinite


@dataclass(frozen=True)
class FitConfig:
    horizons: int = 4  # m: horizon points, evenly spaced in ratio between the newest step and the target
    max_cuts: int = 8  # calibration cuts, spread over the admissible range
    sample: int = SAMPLE  # l: parameters sampled per chunk to fit its forecaster (4096; ingest keeps them)
    lam: float = 1.0  # weight of the deceleration regulariser L_grad (chosen on bench/forecast_quality.py)
    iters: int = 150  # Adam iterations of the L1 refinement after the least-squares warm start
    lr: float = 0.02  # Adam learning rate in the normalised parametrisation (cosine-decayed to 0)
    # Extra feature times as fractions of t_c - t_0 (the paper's general subset T). The paper and
    # docs/method.md recommend none ({s_0, s_c} only); bench/forecast_quality.py measured (0.5, 0.8)
    # far better (ratio 2: 0.70 vs 1.09 x persistence on average, beats every baseline on 4/4 runs
    # vs 2/4), so it is the default here. extra_features=() gives the paper's forecaster.
    extra_features: tuple[float, ...] = (0.5, 0.8)
    # Calibration cuts weighted by (t_c - t_0) ** recency (0: all alike, the method page's stacking):
    # the later cuts are the most like the forecast itself. 2 measured on bench/forecast_quality.py:
    # 15 of 18 rows the same (within 0.001) or better than 0, by up to 0.053, the other three 0.006-0.013
    # worse; 4 cost digits SGD +0.05.
    recency: float = 2.0
    linefit_k: int = 4  # checkpoints in the per-weight line-fit baseline
    seed: int = SEED  # seeds the parameter sample of each chunk
    # Chunks read and reduced together (one padded batch; a flow's task each). Each chunk's fit is
    # independent of the others and the refinement runs on all chunks at once, so this changes
    # memory (about 13 rows x 4096 values x 8 B per chunk, a few copies) and speed, not the result.
    batch_chunks: int = 32
    # Time axis (farcast_core.timeaxis): "auto" takes cumulative learning rate ("lr") whenever the
    # schedule is known, else global steps; "steps" or "lr" force one. schedule: a stated schedule
    # {name, peak_lr, warmup, total, options}, preferred over what the checkpoints recorded.
    axis: str = "auto"
    schedule: dict | None = None
    # Shrinkage towards the newest weights (docs/method.md): every forecast becomes
    # w_n + alpha (forecast - w_n). "auto" chooses alpha in [0, 1] from a backtest on the run's own
    # history (fit on the steps up to s_b, forecast the newest step on the sampled parameters,
    # take the alpha that minimises the L1 error); a number states alpha (1: the paper's forecaster).
    shrink: str | float = "auto"

    def __post_init__(self):
        ints = {"horizons": 1, "max_cuts": 1, "sample": 1, "iters": 0, "linefit_k": 2, "batch_chunks": 1}
        for name, least in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ConfigError(f"{name} must be a whole number >= {least}, got {v!r}")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ConfigError(f"lam (the regulariser's weight) must be a finite number >= 0, got {self.lam!r}")
        if not (isinstance(self.recency, (int, float)) and math.isfinite(self.recency) and self.recency >= 0):
            raise ConfigError(f"recency (the cut weights' power of time) must be a finite number >= 0, got {self.recency!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        bad = [f for f in self.extra_features if not (isinstance(f, (int, float)) and 0 < f < 1)]
        if bad:
            raise ConfigError(f"feature times are fractions strictly between 0 and 1, got {bad[0]!r}")
        if self.shrink != "auto" and not (isinstance(self.shrink, (int, float)) and not isinstance(self.shrink, bool)
                                          and 0 <= self.shrink <= 1):
            raise ConfigError(f"shrink must be 'auto' or a number in [0, 1] (1: no shrinkage), got {self.shrink!r}")
        if self.axis not in AXES:
            raise ConfigError(f"axis must be auto, steps or lr, got {self.axis!r}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["extra_features"] = list(self.extra_features)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "FitConfig":
        d = dict(d)
        if "extra_features" in d:
            d["extra_features"] = tuple(d["extra_features"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class EmitConfig:
    optimizer: str = "keep"  # keep: copy the newest optimizer state; reset: same param groups, empty state
    force: bool = False  # replace an existing output
    allow_worse: bool = False  # emit even when the backtest says the farcaster is worse than persistence
    allow_pickle: bool = False  # load torch pickles that hold Python objects beyond tensors
    # A tensor emitted unforecast (non-finite in the history) that is NaN/Inf at the newest step:
    # refuse (default), or take its values from the newest step where it is finite.
    nonfinite: str = "refuse"

    def __post_init__(self):
        if self.optimizer not in OPTIMIZER_POLICIES:
            raise ConfigError(f"--optimizer must be keep or reset, got {self.optimizer!r}")
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"--nonfinite must be refuse or last-finite, got {self.nonfinite!r}")


@dataclass(frozen=True)
class IngestConfig:
    # Bounds the memory of one chunk in flight: chunk = budget / (4 B x 64 rows) values,
    # a power of two between 4 Ki and 4 Mi (512 MiB -> 2 Mi values, 8 MiB per float32 row).
    memory_budget_mb: int = 512
    # Torch pickles holding Python objects beyond tensors are refused unless this is set.
    allow_pickle: bool = False
    # Threads reading and writing chunks of one step; each owns whole chunks.
    workers: int = 4

    def __post_init__(self):
        if not isinstance(self.memory_budget_mb, int) or self.memory_budget_mb < 1:
            raise ConfigError(f"memory budget must be a whole number of MiB >= 1, got {self.memory_budget_mb!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers must be a whole number >= 1, got {self.workers!r}")
