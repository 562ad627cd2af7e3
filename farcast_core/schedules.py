"""Learning-rate schedules as pure functions, for a time axis in cumulative learning rate.

The multipliers of the Hugging Face schedules (transformers.optimization), so that tau(s), the
learning rate summed over the steps that produced w(s), can be computed for any step without
transformers or a pickle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

NAMES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
         "inverse_sqrt", "warmup_stable_decay")


def _warm(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def multiplier(name: str, step: int, warmup: int = 0, total: int | None = None, **kw) -> float:
    """The schedule's factor on the peak learning rate at ``step`` (as transformers' LambdaLR uses it)."""
    if name == "constant":
        return 1.0
    if name == "constant_with_warmup":
        return _warm(step, warmup) if step < warmup else 1.0
    if name == "inverse_sqrt":
        if step < warmup:
            return _warm(step, warmup)
        timescale = kw.get("timescale") or warmup or 10_000
        return 1.0 / math.sqrt((step + timescale - warmup) / timescale)
    if name == "warmup_stable_decay":
        return _wsd(step, warmup, total, **kw)
    if name in TORCH:
        return TORCH[name](step, **kw)
    if total is None:
        raise ValueError(f"schedule {name!r} needs the total number of training steps")
    if step < warmup:
        return _warm(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    if name == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(kw.get("num_cycles", 0.5)) * 2.0 * progress)))
    if name == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(kw.get("num_cycles", 1)) * progress) % 1.0))))
    if name == "polynomial":
        lr_init, lr_end, power = kw["lr_init"], kw.get("lr_end", 1e-7), kw.get("power", 1.0)
        if step > total:
            return lr_end / lr_init
        return ((lr_init - lr_end) * (1 - (step - warmup) / (total - warmup)) ** power + lr_end) / lr_init
    raise ValueError(f"unknown schedule {name!r}; known: {', '.join(NAMES)}")


def _wsd(step, warmup, total, num_decay_steps, num_stable_steps=None, warmup_type="linear", decay_type="cosine",
         min_lr_ratio=0.0, num_cycles=0.5, **_):
    if num_stable_steps is None:
        num_stable_steps = total - warmup - num_decay_steps
    if step < warmup:
        p = float(step) / float(max(1, warmup))
        f = {"linear": p, "cosine": 0.5 * (1.0 - math.cos(math.pi * p)), "1-sqrt": 1.0 - math.sqrt(1.0 - p)}[warmup_type]
        return max(0.0, f * (1.0 - min_lr_ratio) + min_lr_ratio)
    if step < warmup + num_stable_steps:
        return 1.0
    if step < warmup + num_stable_steps + num_decay_steps:
        p = float(step - warmup - num_stable_steps) / float(max(1, num_decay_steps))
        f = {"linear": 1.0 - p, "cosine": 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * p)),
             "1-sqrt": 1.0 - math.sqrt(p)}[decay_type]
        return max(0.0, f * (1.0 - min_lr_ratio) + min_lr_ratio)
    return min_lr_ratio


# torch.optim.lr_scheduler classes stepped once per optimizer step (what Lightning saves), by their
# state-dict fields; the multiplier is on the group's base learning rate. eta_min is relative here.
TORCH = {
    "torch_cosine_annealing": lambda s, T_max, eta_min_ratio=0.0, **_: (
        eta_min_ratio + (1.0 - eta_min_ratio) * (1.0 + math.cos(math.pi * s / T_max)) / 2.0),
    "torch_linear": lambda s, start_factor, end_factor, total_iters, **_: (
        start_factor + (end_factor - start_factor) * min(s, total_iters) / max(1, total_iters)),
    "torch_constant": lambda s, factor, total_iters, **_: factor if s < total_iters else 1.0,
    "torch_exponential": lambda s, gamma, **_: gamma**s,
    "torch_step": lambda s, step_size, gamma, **_: gamma ** (s // step_size),
    # any schedule evaluated in-process (e.g. a LambdaLR's own function), step by step; held after the end
    "tabulated": lambda s, table, **_: table[min(s, len(table) - 1)],
}


@dataclass(frozen=True)
class Schedule:
    """A stated schedule: name, peak learning rate, warm-up and total steps, extra options."""

    name: str
    peak_lr: float
    warmup: int = 0
    total: int | None = None
    options: dict = field(default_factory=dict)
    peak_known: bool = True  # False: stated without --peak-lr (1.0 stands in; only the shape matters)

    def to_json(self) -> dict:
        return {"name": self.name, "peak_lr": self.peak_lr if self.peak_known else None, "warmup": self.warmup,
                "total": self.total, "options": dict(self.options)}

    @classmethod
    def from_json(cls, d: dict) -> "Schedule":
        return cls(d["name"], float(d.get("peak_lr") or 1.0), int(d.get("warmup") or 0),
                   None if d.get("total") is None else int(d["total"]), dict(d.get("options") or {}),
                   peak_known=bool(d.get("peak_lr")))

    def describe(self) -> str:
        parts = [self.name, f"peak lr {self.peak_lr:.4g}" if self.peak_known else "peak lr not stated (shape only)"]
        if self.warmup:
            parts.append(f"warm-up {self.warmup}")
        if self.total is not None:
            parts.append(f"{self.total} steps")
        parts += [f"{k}={v}" for k, v in self.options.items() if k not in ("lr_init", "table")]
        return ", ".join(parts)

    def lr(self, steps) -> np.ndarray:
        """Learning rate set at each step (the optimizer step number s + 1 uses lr(s))."""
        return np.array([self.peak_lr * multiplier(self.name, int(s), self.warmup, self.total, **self.options)
                         for s in np.atleast_1d(steps)], dtype=np.float64)

    def tau(self, steps) -> np.ndarray:
        """Cumulative learning rate tau(s) = lr(0) + ... + lr(s - 1): the 'time' weights have moved."""
        steps = np.atleast_1d(np.asarray(steps, dtype=np.int64))
        top = int(steps.max()) if steps.size else 0
        cum = np.concatenate([[0.0], np.cumsum(self.lr(np.arange(top)))])
        return cum[steps]
