"""The time axis farcasting measures in: global steps (the paper's), or cumulative learning rate.

Gradient descent is a discretised ODE dw/dt = -lr(t) grad L(w): a weight moves in proportion to
the learning rate it sees, not to the number of steps. On the ``lr`` axis the time of step s is
tau(s) = lr(0) + ... + lr(s - 1), the learning rate summed over the optimizer steps that made
w(s); ratios, calibration cuts, interpolation and the regulariser's segment lengths all use it.

The schedule comes from, in order: what the user states; what the checkpoints recorded (the
"facts" ingest keeps: Hugging Face learning-rate logs + horizon, torch scheduler states from
Lightning, training_args.bin only when pickles were allowed). Pure: no file access here.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np

from farcast_core.errors import ForecastError, ScheduleEndError
from farcast_core.schedules import NAMES, TORCH, Schedule, multiplier

AXES = ("auto", "steps", "lr")
# Schedules tried against logged learning rates, in order of preference when several fit.
INFERABLE = ("linear", "cosine", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt")
REL_TOL = 1e-6  # logged learning rates are the scheduler's own floats


@dataclass(frozen=True)
class TimeAxis:
    name: str = "steps"  # "steps" or "lr"
    schedule: Schedule | None = None  # known schedule (also on the steps axis: it bounds the target)
    source: str = ""  # where the schedule came from
    note: str = ""  # why this axis, or why not the other one
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def unit(self) -> str:
        return "steps" if self.name == "steps" else "cumulative learning rate"

    @property
    def end(self) -> int | None:
        """The schedule's last step (training ends there), when known."""
        return None if self.schedule is None else self.schedule.total

    def times(self, steps) -> np.ndarray:
        steps = np.asarray(steps, dtype=np.int64)
        if self.name == "steps":
            return steps.astype(np.float64)
        return self._tau(int(steps.max()) if steps.size else 0)[steps]

    def _tau(self, upto: int) -> np.ndarray:
        """tau(0..upto) (cached, grown by doubling)."""
        tau = self._cache.get("tau")
        if tau is None or len(tau) <= upto:
            n = max(upto + 1, 2 * (len(tau) if tau is not None else 0), 1024)
            tau = self.schedule.tau(np.arange(n))
            self._cache["tau"] = tau
        return tau

    def step_at(self, t: float, after: int) -> int:
        """The step (> ``after``) whose time is nearest ``t``; ForecastError past the schedule's end."""
        if self.name == "steps":
            s = max(int(round(t)), after + 1)
            self.check_step(s)
            return s
        limit = self.end
        if limit is None:  # no end: grow until the target time is reached (or clearly never is)
            limit = 2 * after + 2
            while self._tau(limit)[limit] < t and limit < 1000 * (after + 1):
                limit *= 2
        tau = self._tau(limit)[: limit + 1]
        if t > tau[-1] * (1 + 1e-12):
            if self.end is None:
                raise ForecastError(f"the learning-rate schedule never reaches that target (cumulative learning rate "
                                    f"{t:.6g}) within {limit} steps; ask for a nearer one")
            raise ScheduleEndError(
                f"that target lies beyond the learning-rate schedule's end: its last step is {limit} "
                f"(cumulative learning rate {tau[-1]:.6g}, the target needs {t:.6g}); "
                f"use --target-step {limit} to forecast the end of training"
            )
        hi = min(int(np.searchsorted(tau, t, side="left")), limit)  # t may exceed tau[limit] by rounding
        s = hi if hi == 0 or abs(tau[hi] - t) <= abs(t - tau[hi - 1]) else hi - 1
        return min(max(s, after + 1), limit)

    def check_step(self, step: int) -> None:
        if self.end is not None and step > self.end:
            raise ScheduleEndError(
                f"--target-step {step} is past the end of the run's learning-rate schedule: its last step is "
                f"{self.end}; use --target-step {self.end} to forecast the end of training"
            )

    def describe(self) -> str:
        if self.name == "lr":
            return f"time axis: lr (cumulative learning rate; {self.schedule.describe()}; from {self.source})"
        why = f"; {self.note}" if self.note else ""
        return f"time axis: steps{why}"

    def to_json(self) -> dict:
        return {"name": self.name, "schedule": self.schedule.to_json() if self.schedule else None,
                "source": self.source, "note": self.note}

    @classmethod
    def from_json(cls, d: dict | None) -> "TimeAxis":
        if not d:
            return cls()
        sched = Schedule.from_json(d["schedule"]) if d.get("schedule") else None
        return cls(d["name"], sched, d.get("source", ""), d.get("note", ""))


STEPS = TimeAxis()


def stated_schedule(d: dict) -> Schedule:
    """A schedule the user states: {name, peak_lr, warmup, total, options}; ForecastError if unusable."""
    name = d.get("name")
    if name not in NAMES and name not in TORCH:
        raise ForecastError(f"unknown learning-rate schedule {name!r}; known: {', '.join(NAMES)}")
    s = Schedule.from_json(d)
    if name not in ("constant", "constant_with_warmup", "inverse_sqrt") and s.total is None:
        raise ForecastError(f"the {name} schedule needs the run's total steps: add --total-steps N (the Trainer's max_steps)")
    s = _with_lr_init(s)
    if name == "warmup_stable_decay" and "num_decay_steps" not in s.options:
        raise ForecastError("the warmup_stable_decay schedule needs --schedule-option num_decay_steps=N")
    try:
        s.lr([0, s.warmup, s.total or s.warmup + 1])
    except (TypeError, KeyError, ValueError, ZeroDivisionError) as e:
        raise ForecastError(f"the stated {name} schedule cannot be evaluated ({type(e).__name__}: {e}); check its options") from e
    return s


def facts_key(facts: dict | None) -> str:
    """A digest of schedule facts: a reading of them (``reading``) holds only for the same facts."""
    return hashlib.sha1(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def reading(facts: dict | None) -> dict:
    """``from_facts`` as JSON, with the digest of the facts it read: ingest records it in the store,
    so that every fit, backtest and emit does not infer the schedule again (thousands of candidate
    warm-ups: a fifth of a small run's fit)."""
    schedule, source, why = from_facts(facts)
    return {"facts": facts_key(facts), "schedule": schedule.to_json() if schedule else None,
            "source": source, "why": why}


def choose(requested: str, stated: dict | None, facts: dict | None, recorded: dict | None = None) -> TimeAxis:
    """The axis to use: ``requested`` is auto, steps or lr; auto takes lr whenever the schedule is known.

    ``recorded``: a ``reading`` of the facts made earlier, used when it read these same facts.
    """
    if requested not in AXES:
        raise ForecastError(f"--axis must be one of {', '.join(AXES)}, got {requested!r}")
    if stated:
        schedule, source, why = stated_schedule(stated), "the stated schedule", ""
    elif recorded and recorded.get("facts") == facts_key(facts):
        schedule = Schedule.from_json(recorded["schedule"]) if recorded["schedule"] else None
        source, why = recorded["source"], recorded["why"]
    else:
        schedule, source, why = from_facts(facts)
    if requested == "steps":
        return TimeAxis("steps", schedule, source, "as asked (--axis steps)")
    if schedule is None:
        if requested == "lr":
            raise ForecastError(
                f"--axis lr needs the learning-rate schedule, which is not known: {why}. State it with "
                "--schedule NAME --total-steps N [--warmup-steps N] [--peak-lr LR]"
            )
        return TimeAxis("steps", None, "", f"learning-rate schedule unknown ({why})")
    return TimeAxis("lr", schedule, source)


def _with_lr_init(s: Schedule) -> Schedule:
    """transformers' polynomial schedule is relative to the optimizer's initial lr: the peak."""
    if s.name != "polynomial":
        return s
    return Schedule(s.name, s.peak_lr, s.warmup, s.total, {"lr_init": s.peak_lr, **s.options}, s.peak_known)


def training_args_schedule(args: dict, total: int | None = None) -> Schedule:
    """The schedule a Hugging Face Trainer's arguments (as ``storage.layouts.huggingface.training_args``
    reads them from training_args.bin) give; its name may be one farcast does not know (not in NAMES)."""
    s = Schedule(args["lr_scheduler_type"], float(args["learning_rate"]), int(args.get("warmup_steps") or 0),
                 total or args.get("max_steps"), dict(args.get("lr_scheduler_kwargs") or {}))
    return _with_lr_init(s)


# ----------------------------------------------------------------- what checkpoints recorded


def from_facts(facts: dict | None) -> tuple[Schedule | None, str, str]:
    """(schedule, where from, why not) from the facts ingest recorded for the newest checkpoint."""
    if not facts:
        return None, "", "the checkpoints record no learning rates (state the schedule with --schedule)"
    if facts.get("format") == "hf":
        return _from_hf(facts)
    if facts.get("format") == "torch":
        return _from_torch(facts)
    return None, "", f"unrecognised schedule record {facts.get('format')!r}"


def _from_hf(facts: dict) -> tuple[Schedule | None, str, str]:
    total = facts.get("max_steps") or None
    points = [(int(k) - 1, float(lr)) for k, lr in facts.get("logged", [])]  # logged at step k: lr(k - 1)
    if facts.get("last_epoch") is not None and facts.get("last_lr"):
        points.append((int(facts["last_epoch"]), float(facts["last_lr"][0])))
    peak = facts["base_lrs"][0] if facts.get("base_lrs") else None
    args = facts.get("training_args")
    if args:
        s = training_args_schedule(args, total)
        if s.name in NAMES:
            bad = _misfit(s, points)
            if bad is None:
                return s, "training_args.bin", ""
            return None, "", f"training_args.bin's {s.name} schedule does not match the logged learning rate at step {bad + 1}"
    if len(points) < 2:
        return None, "", "fewer than two learning rates logged in trainer_state.json (set logging_steps, or state the schedule)"
    if total is None:
        return None, "", "trainer_state.json has no max_steps"
    fits = _infer(points, peak, int(total))
    if not fits:
        return None, "", ("the learning rates logged in trainer_state.json fit none of "
                          f"{', '.join(INFERABLE)} (state the schedule with --schedule)")
    chosen = fits[0]
    for other in fits[1:]:
        if not _same_future(chosen, other, points):
            return None, "", (f"the logged learning rates fit both {chosen.describe()} and {other.describe()}, which "
                              "differ ahead; state the schedule with --schedule")
    return chosen, f"trainer_state.json (learning rates logged at {len(points)} steps, max_steps {total})", ""


def _misfit(s: Schedule, points) -> int | None:
    """The first point the schedule misses (relative tolerance), or None."""
    for step, lr in points:
        want = s.lr([step])[0]
        if abs(want - lr) > REL_TOL * max(abs(lr), abs(want), 1e-30):
            return step
    return None


def _warmups(points, peak_hint: float, total: int) -> list[int]:
    """Warm-up lengths worth trying: small ones exhaustively, others solved from each point."""
    cands = set(range(0, min(total, 2048) + 1))
    for s, lr in points:
        if lr <= 0 or peak_hint <= 0:
            continue
        m = min(lr / peak_hint, 1.0)
        guesses = [s / m if m > 0 else None, total - (total - s) / m if m > 0 else None]
        prog = math.acos(max(-1.0, min(1.0, 2 * m - 1))) / math.pi
        if prog < 1:
            guesses.append((s - prog * total) / (1 - prog))
        for g in guesses:
            if g is not None and math.isfinite(g):
                cands.update(w for w in (math.floor(g) - 1, math.floor(g), math.ceil(g), math.ceil(g) + 1) if 0 <= w <= total)
    return sorted(cands)


def _infer(points, peak: float | None, total: int) -> list[Schedule]:
    """Every (name, warm-up, peak) among the Trainer's schedules that reproduces the logged rates."""
    steps = np.array([p[0] for p in points])
    lrs = np.array([p[1] for p in points])
    probe = np.unique(np.linspace(0, len(points) - 1, 4).round().astype(int))  # cheap rejection first
    fits = []
    for name in INFERABLE:
        # a fit must reproduce every point, so the warm-ups solved from the probe points are enough
        for w in _warmups([points[i] for i in probe], peak or float(lrs.max()), total):
            if name in ("linear", "cosine", "polynomial") and w >= total:
                continue
            if name == "constant" and w:
                break
            opts = {"lr_init": peak or float(lrs.max())} if name == "polynomial" else {}
            p = _fit_peak(name, w, total, opts, steps[probe], lrs[probe], peak)
            if p is None or _fit_peak(name, w, total, opts, steps, lrs, peak) is None:
                continue
            fits.append(Schedule(name, p, w, total, opts))
    # of each name, the shortest and the longest fitting warm-up bound the ambiguity
    ends = []
    for name in INFERABLE:
        mine = [f for f in fits if f.name == name]
        ends += mine[:1] + mine[1:][-1:]
    return ends


def _fit_peak(name, w, total, opts, steps, lrs, peak) -> float | None:
    """The peak learning rate with which (name, w) reproduces ``lrs`` at ``steps``, or None.

    Plain Python floats, not numpy: this runs for thousands of candidate warm-ups per fit, on a
    handful of points each, where numpy's per-call overhead was most of a fit's time.
    """
    try:
        m = [multiplier(name, int(s), w, total, **opts) for s in steps]
    except (ValueError, ZeroDivisionError):
        return None
    lrs = [float(x) for x in lrs]
    p = peak if peak else sum(a * b for a, b in zip(m, lrs)) / max(sum(a * a for a in m), 1e-300)
    # np.allclose(p * m, lrs, rtol=REL_TOL, atol=1e-30), NaN never close
    if not p > 0 or not all(abs(p * a - b) <= 1e-30 + REL_TOL * abs(b) for a, b in zip(m, lrs)):
        return None
    return float(p)


def _same_future(a: Schedule, b: Schedule, points) -> bool:
    """Do two fitting schedules agree from the first logged step on (to 0.1% of the peak)?"""
    first = min(p[0] for p in points)
    steps = np.unique(np.linspace(first, a.total, 512).round().astype(int))
    return bool(np.max(np.abs(a.lr(steps) - b.lr(steps))) < 1e-3 * a.peak_lr)


def _from_torch(facts: dict) -> tuple[Schedule | None, str, str]:
    """A per-step torch scheduler saved in a Lightning (or plain torch) checkpoint."""
    states = facts.get("schedulers") or []
    if len(states) != 1:
        return None, "", f"{len(states)} learning-rate schedulers saved (farcast reads exactly one)"
    st = states[0]
    if st.get("last_epoch") != facts.get("global_step"):
        return None, "", (f"the saved scheduler is at epoch/step {st.get('last_epoch')}, not the global step "
                          f"{facts.get('global_step')}: it is stepped per epoch, and the lr axis needs per-step schedules")
    base = st.get("base_lrs") or [1.0]
    if "T_max" in st:
        groups = [Schedule("torch_cosine_annealing", b, 0, None,
                           {"T_max": st["T_max"], "eta_min_ratio": st.get("eta_min", 0.0) / b}) for b in base]
        name = "CosineAnnealingLR"
    elif "start_factor" in st:
        groups = [Schedule("torch_linear", b, 0, None, {k: st[k] for k in ("start_factor", "end_factor", "total_iters")})
                  for b in base]
        name = "LinearLR"
    elif "step_size" in st:
        groups = [Schedule("torch_step", b, 0, None, {"step_size": st["step_size"], "gamma": st["gamma"]}) for b in base]
        name = "StepLR"
    elif "factor" in st and "total_iters" in st:
        groups = [Schedule("torch_constant", b, 0, None, {"factor": st["factor"], "total_iters": st["total_iters"]})
                  for b in base]
        name = "ConstantLR"
    elif set(st) >= {"gamma"} and "milestones" not in st:
        groups = [Schedule("torch_exponential", b, 0, None, {"gamma": st["gamma"]}) for b in base]
        name = "ExponentialLR"
    else:
        return None, "", ("the saved scheduler's type cannot be read from its state (e.g. LambdaLR saves no "
                          "function); state the schedule with --schedule")
    probe = np.arange(0, int(st["last_epoch"]) * 4 + 2)
    shapes = [g.lr(probe) / g.peak_lr for g in groups]
    if any(np.max(np.abs(s - shapes[0])) > 1e-9 for s in shapes[1:]):
        return None, "", (f"the {len(groups)} parameter groups follow differently shaped {name} schedules; "
                          "per-group time axes are not supported, so the steps axis is used")
    return groups[0], f"the saved torch {name} state", ""
