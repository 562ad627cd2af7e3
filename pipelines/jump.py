"""Training loop --jump--> forecast weights: farcasting during training, every K steps.

The same store, fit and forecast as the checkpoint pipeline, driven from inside a training loop:
``Jumper`` records the trainable weights every ``record_every`` steps into a small Zarr run store
(on local disk, so the history never has to fit in memory), and at a jump fits the farcaster on
that history, forecasts ratio R ahead on the time axis, and proposes the forecast. A guard
evaluates a loss at the current and the forecast weights and rejects worse forecasts. Accepted
jumps replace the weights, apply the optimizer policy and advance the step counters and the
learning-rate schedule to the target step.

The framework adapters that drive it live in ``farcast.adapters``: ``hf_callback`` (a transformers
TrainerCallback), ``lightning_callback`` (a Lightning Callback) and ``TorchJumper`` (call
``after_step`` in a plain loop).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from farcast_core.chunks import chunk_plan
from farcast_core.dtypes import dtype_of, from_storage, nonfinite, to_storage
from farcast_core.errors import ForecastError, ScheduleEndError
from farcast_core.forecaster import FitConfig
from farcast_core.schedules import Schedule
from farcast_core.timeaxis import STEPS, TimeAxis, from_facts
from farcast.pipelines.emit import TargetChunks
from farcast.pipelines.fit import fit_store, resolve_target
from farcast.storage.schedules import scheduler_state
from farcast.storage.store import MemoryRunStore, RunStore, TensorMeta, array_path, scratch_location

OPTIMIZER_POLICIES = ("keep", "reset_first", "reset_all")
HISTORIES = ("auto", "disk", "memory")
MEMORY_HISTORY_BYTES = 2**20  # history="auto": in memory when the recorded weights take at most this
MODULE_KINDS = {  # module kinds that skip_kinds names
    "norm": lambda: (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm),
    "embedding": lambda: (torch.nn.Embedding,),
}


@dataclass(frozen=True)
class JumpConfig:
    every: int = 100  # a jump every this many real optimizer steps (0: only at the steps in ``at``)
    at: tuple[int, ...] = ()  # or (also) at these global steps
    ratio: float = 2.0  # the target of a jump: t_0 + ratio (t_n - t_0) on the time axis
    record_every: int = 10  # record the weights every this many global steps
    min_records: int = 5  # records needed before the first jump
    # at a jump: reset_all (forget the state; best in bench/steps_saved.py) | reset_first (zero Adam's exp_avg /
    # SGD's momentum) | keep
    optimizer: str = "reset_all"
    skip: tuple[str, ...] = ()  # parameters whose name contains one of these are not forecast
    skip_kinds: tuple[str, ...] = ()  # "norm" and/or "embedding": parameters of such modules are not forecast
    guard: bool = True  # evaluate the loss before and after; reject a jump that makes it worse
    advance: bool = True  # advance the step count and schedule to the target (False: keep counting from here)
    # with ``advance``, on a LambdaLR schedule (every Hugging Face one): after a jump from step s to t, run the rest
    # of the schedule as it stood at s, compressed into the steps left, so the annealing is kept whole and training
    # resumes at s's learning rate (instead of t's lower one); a jump then leaves at least ``anneal`` of the steps
    # that were left at s
    retime: bool = False
    anneal: float = 0.25
    # with ``advance`` and the guard: "target" moves the step count to the (backtracked) target; "verified" only
    # as far as the loss the guard measured after the jump says plain training would have come: the guard loss
    # at the last ``verify_records`` records, a line against time on the axis, solved for the loss after the jump
    # (never past the target; no advance where the line does not fall)
    advance_by: str = "target"
    verify_records: int = 4
    backtrack: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125)  # fractions of the jump the guard tries, in order
    # jumps are frequent: a lighter fit than the pipeline's (bench/steps_saved.py measured the same jumps).
    # No shrinkage: the guard's backtracking already chooses how far along the forecast to go, by the
    # training loss; with shrink="auto" digits SGD reached the plain loss at 1.05x instead of 1.88x.
    # No Adam refinement (the least-squares forecaster): over 4 seeds of digits SGD / Adam it reached
    # the plain loss in the same steps (mean 1.88x / 2.84x against 1.90x / 2.87x with 50 iterations),
    # the GPT-2 runs likewise, and the 50 iterations were most of a digits jump's cost (3 of ~7 ms).
    # One horizon: without the refinement the intermediate horizons change nothing (each horizon's
    # least squares is its own column), and their targets are rows the fit no longer reads
    fit: FitConfig = field(default_factory=lambda: FitConfig(sample=1024, iters=0, horizons=1, shrink=1.0))
    memory_budget_mb: int = 64  # chunking of the history store
    # where the recorded weights live: "disk" (a local Zarr store: the history never has to fit in memory),
    # "memory" (numpy arrays: a record is a copy, ~1 ms per Zarr call saved), or "auto": memory for a model
    # whose recorded weights take at most 1 MiB (256 records then take 256 MiB) unless a store_dir is given,
    # else disk
    history: str = "auto"

    def __post_init__(self):
        if self.optimizer not in OPTIMIZER_POLICIES:
            raise ForecastError(f"optimizer policy must be one of {', '.join(OPTIMIZER_POLICIES)}, got {self.optimizer!r}")
        if not self.ratio > 1:
            raise ForecastError(f"the jump ratio must be > 1, got {self.ratio}")
        if self.history not in HISTORIES:
            raise ForecastError(f"history must be one of {', '.join(HISTORIES)}, got {self.history!r}")
        if self.advance_by not in ("target", "verified"):
            raise ForecastError(f"advance_by must be 'target' or 'verified', got {self.advance_by!r}")
        if not 0 < self.anneal < 1:
            raise ForecastError(f"anneal is the fraction of the steps left that a jump keeps, in (0, 1); got {self.anneal}")
        unknown = set(self.skip_kinds) - set(MODULE_KINDS)
        if unknown:
            raise ForecastError(f"skip_kinds takes {', '.join(MODULE_KINDS)}, got {sorted(unknown)}")


@dataclass
class JumpRecord:
    """One jump tried."""

    step: int  # global step it was tried at
    real_step: int  # optimizer steps actually taken by then
    target: int | None  # the step it forecast (None: no forecast)
    accepted: bool
    loss_before: float | None = None
    loss_after: float | None = None
    fraction: float = 1.0  # of the forecast jump taken (the guard may shorten it)
    seconds: float = 0.0  # fit + forecast + guard
    forecast_seconds: float = 0.0  # of which the fit and the forecast of the weights (the rest: the guard, the policy)
    reason: str = ""


class Jumper:
    """Records a model's weights and proposes jumps; framework-free (the adapters below drive it)."""

    def __init__(self, config: JumpConfig = JumpConfig(), axis: TimeAxis = STEPS, store_dir: str | Path | None = None,
                 device: torch.device | None = None, total: int | None = None, retimer: "Retimer | None" = None):
        self.config, self.axis, self.device, self.total, self.retimer = config, axis, device, total, retimer
        self.store_dir = store_dir
        self.dir = self._finalizer = None  # the history's directory, made with the first record when on disk
        self.store: RunStore | MemoryRunStore | None = None
        self.rows = 0
        self.jumps: list[JumpRecord] = []
        self.real_steps = 0
        self._last_jump_real = 0
        _blas()  # finding the process's BLAS libraries takes 10-25 ms: once, here, rather than in the first jump

    # ------------------------------------------------------------ recording

    def params(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The parameters farcast forecasts: trainable floats whose name matches no ``skip`` pattern."""
        skipped = set()
        for mod_name, mod in model.named_modules():
            if any(isinstance(mod, MODULE_KINDS[k]()) for k in self.config.skip_kinds):
                skipped.update(f"{mod_name}.{n}" if mod_name else n for n, _ in mod.named_parameters(recurse=False))
        return {n: p for n, p in model.named_parameters()
                if p.requires_grad and p.is_floating_point() and n not in skipped
                and not any(s in n for s in self.config.skip)}

    def record(self, step: int, params: dict[str, torch.Tensor]) -> None:
        """Append the weights at global ``step`` to the history (ignored if not after the newest)."""
        if self.store is None:
            self._create(params)
        elif self.store.steps and step <= self.store.steps[-1]:
            return
        if self.rows >= self._capacity:
            self._capacity = max(16, 2 * self._capacity)
            self.store.reserve(self._capacity)
        bad = []
        layout = self.store.sample_layout  # the fit's sample, kept beside the history as ingest does
        sampled = np.empty(layout.width) if layout else None
        for name, m in self.store.tensors.items():
            flat = to_storage(params[name].detach().reshape(-1).cpu())
            if nonfinite(flat, m.dtype):
                bad.append(name)
            for i in range(m.plan.n_chunks):
                a, b = m.plan.bounds(i)
                self.store.write(name, self.rows, a, flat[a:b])
                if layout:
                    layout.take(sampled, name, i, flat[a:b], m.dtype)
        if layout:
            self.store.write_sample(self.rows, sampled)
        self.store.commit(self.rows, {"step": int(step), "sources": [], "nonfinite": bad})
        self.rows += 1

    def _create(self, params: dict[str, torch.Tensor]) -> None:
        budget = self.config.memory_budget_mb * 2**20
        metas = []
        for name, p in params.items():
            numel = p.numel()
            metas.append(TensorMeta(name, tuple(p.shape), dtype_of(p.dtype).name, "float", chunk_plan(numel, budget).chunk,
                                    array_path(name)))
        nbytes = sum(p.numel() * p.element_size() for p in params.values())
        if self.config.history == "memory" or (self.config.history == "auto" and nbytes <= MEMORY_HISTORY_BYTES
                                                and self.store_dir is None):
            self.store = MemoryRunStore()
        else:  # a directory of its own is deleted with the Jumper, even if training dies
            self.dir, self._finalizer = scratch_location(self, self.store_dir, "farcast-jump-")
            self.store = RunStore.open_or_create(f"{self.dir}/history", Path(str(self.dir)), "jump",
                                                 {"memory_budget_mb": self.config.memory_budget_mb})
        self.store.define_tensors(metas, sample=(self.config.fit.sample, self.config.fit.seed))
        self._capacity = 0

    # ------------------------------------------------------------ jumping

    def due(self, global_step: int) -> bool:
        """Is a jump due now (after ``real_steps`` optimizer steps, at ``global_step``)?"""
        if self.rows < self.config.min_records or not self.store.steps or self.store.steps[-1] != global_step:
            return False
        if global_step in self.config.at:
            return True
        return bool(self.config.every) and self.real_steps - self._last_jump_real >= self.config.every

    def step(self, model: torch.nn.Module, global_step: int, loss_fn, optimizer=None) -> int | None:
        """After one optimizer step: count it, record the weights when due, jump when due.

        Returns the step the caller's counters and schedule must advance to (a jump was taken and
        ``advance`` is set), else None.
        """
        self.real_steps += 1
        if global_step % self.config.record_every == 0 or global_step in self.config.at:
            self.record(global_step, self.params(model))
        if (self.total is not None and global_step >= self.total) or not self.due(global_step):
            return None
        target = self.try_jump(model, global_step, loss_fn, optimizer)
        return target if self.config.advance else None

    def forecast(self) -> tuple[int, dict[str, torch.Tensor]]:
        """(target step, forecast weights on the CPU) from the history so far; ForecastError if none."""
        steps = self.store.steps
        end = min(e for e in (self.total, self.axis.end, 2**62) if e is not None)
        try:
            _, target = resolve_target(steps, None, self.config.ratio, self.axis)
        except ScheduleEndError:
            target = end
        if self.retimer is not None:  # keep steps to anneal in
            end = min(end, self.retimer.total - math.ceil(self.config.anneal * (self.retimer.total - steps[-1])))
        if target > end:  # past the end of training: forecast the end (the guard may shorten the jump)
            target = end
        if target <= steps[-1]:
            raise ForecastError(f"step {steps[-1]} is the end of training: nothing to jump to")
        rho, target = resolve_target(steps, target, None, self.axis)
        with one_blas_thread():
            fc = fit_store(self.store, len(steps), rho, self.config.fit, self.device, axis=self.axis)
        f = TargetChunks(self.store, fc)
        return target, {m.name: f.tensor(m) for m in self.store.tensors.values()}

    def try_jump(self, model: torch.nn.Module, global_step: int, loss_fn: Callable[[torch.nn.Module], float] | None,
                 optimizer: torch.optim.Optimizer | None = None) -> int | None:
        """Fit, forecast, guard; on success set the weights and apply the optimizer policy.

        Returns the target step when the jump was taken (the caller advances its counters and
        schedule to it), else None. Every attempt is appended to ``jumps``.
        """
        t = time.perf_counter()
        self._last_jump_real = self.real_steps
        rec = JumpRecord(global_step, self.real_steps, None, False)
        self.jumps.append(rec)
        try:
            target, new = self.forecast()
        except ForecastError as e:
            rec.reason, rec.seconds = str(e), time.perf_counter() - t
            return None
        rec.forecast_seconds = time.perf_counter() - t
        rec.target = target
        params = self.params(model)
        old = {n: p.detach().clone() for n, p in params.items()}
        if self.config.guard and loss_fn is not None:
            # the forecast, else a shorter step towards it (backtracking); the first whose loss is not higher
            with _evaluating(model):
                rec.loss_before = float(loss_fn(model))
                for frac in self.config.backtrack:
                    _assign(params, {n: torch.lerp(old[n], new[n].to(old[n]), frac) for n in params})
                    rec.loss_after = float(loss_fn(model))
                    if rec.loss_after <= rec.loss_before:
                        rec.fraction = frac
                        break
                else:
                    _assign(params, old)
                    rec.reason, rec.seconds = "the forecast's loss is higher", time.perf_counter() - t
                    return None
                times = self.axis.times([global_step, target])  # a shorter step reaches an earlier step
                target = self.axis.step_at(times[0] + rec.fraction * (times[1] - times[0]), global_step)
                if self.config.advance_by == "verified":
                    target = self._verified(model, params, loss_fn, global_step, target, rec.loss_before,
                                            rec.loss_after)
            rec.target = target
        else:
            _assign(params, new)
        if optimizer is not None:
            reset_optimizer(optimizer, list(params.values()), self.config.optimizer)
        rec.accepted = True
        if self.config.advance:
            if self.retimer is not None:
                self.axis = self.retimer.jump(global_step, target, self.axis)
            self.record(target, params)
        rec.seconds = time.perf_counter() - t
        return target

    def _verified(self, model, params, loss_fn, step: int, target: int, loss_now: float, loss_after: float) -> int:
        """The step plain training would reach ``loss_after`` at, by the guard loss of the last records
        (a least-squares line against time on the axis), between ``step`` and ``target``."""
        rows = list(range(max(0, self.rows - self.config.verify_records), self.rows - 1))  # the newest is ``step``
        if not rows:
            return step
        jumped = {n: p.detach().clone() for n, p in params.items()}
        metas = self.store.tensors
        losses = []
        for r in rows:
            _assign(params, {n: from_storage(self.store.read(n, [r])[0], metas[n].dtype) for n in params})
            losses.append(float(loss_fn(model)))  # in eval mode: try_jump calls this inside _evaluating
        _assign(params, jumped)
        recorded = self.store.steps
        steps = [recorded[r] for r in rows] + [step]
        t = np.asarray(self.axis.times(steps), dtype=np.float64)
        L = np.asarray(losses + [loss_now], dtype=np.float64)
        slope = np.polyfit(t - t[-1], L, 1)[0] if len(t) > 1 and np.ptp(t) > 0 else 0.0
        if not slope < 0:
            return step
        t_end = float(self.axis.times([target])[0])
        t_star = min(t[-1] + (loss_after - loss_now) / slope, t_end)
        if not t_star > t[-1]:  # the loss did not fall: no progress to count
            return step
        return max(step, self.axis.step_at(t_star, step))

    def summary(self) -> dict:
        return {"jumps": [vars(j) for j in self.jumps], "accepted": sum(j.accepted for j in self.jumps),
                "seconds": sum(j.seconds for j in self.jumps), "axis": self.axis.to_json()}

    def close(self) -> None:
        """Delete the history (when the Jumper made its own directory)."""
        if self._finalizer is not None:
            self._finalizer()


@functools.cache
def _blas():
    """The process's BLAS libraries (threadpoolctl's controllers of them): finding them takes 10-25 ms,
    once per process."""
    from threadpoolctl import ThreadpoolController

    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


@contextlib.contextmanager
def one_blas_thread():
    """numpy's BLAS on one thread while a jump fits. The fit's products are small (a chunk's rows x its
    sample), and in a training process BLAS's threads contend with torch's for the cores: a digits
    jump's reduction took 6.8 ms with two BLAS threads on two cores, 3.6 ms with one. The limit is
    process-wide, set and restored by the thread that jumps, through the libraries' controllers
    directly: threadpoolctl's ``limit`` also queries every other thread pool (torch's OpenMP
    included), 100-140 us a jump inside a training loop."""
    libs = _blas()
    before = [lib.num_threads for lib in libs]
    for lib in libs:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(libs, before):
            lib.set_num_threads(n)


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module):
    """The model in eval mode without gradients, for all of a guard's loss evaluations (switching modes
    walks every module: once per guard, not per evaluation), restored after."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _assign(params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(values[name].to(device=p.device, dtype=p.dtype).reshape(p.shape))


def reset_optimizer(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], policy: str) -> None:
    """keep: nothing; reset_first: zero first moments / momentum; reset_all: forget the state."""
    if policy == "keep":
        return
    for p in params:
        state = optimizer.state.get(p)
        if not state:
            continue
        if policy == "reset_all":
            del optimizer.state[p]
        else:
            for key in ("exp_avg", "momentum_buffer"):
                if isinstance(state.get(key), torch.Tensor):
                    state[key].zero_()


def advance_scheduler(scheduler, steps: int) -> None:
    """Step a torch LR scheduler ``steps`` times, setting the learning rate training would have reached."""
    if scheduler is None:
        return
    for _ in range(steps):
        scheduler.step()


class Retimer:
    """Re-times a LambdaLR after each jump (``JumpConfig.retime``): the learning rate at global step g is the
    original schedule's at position p(g). A jump from s to t maps [t, total] linearly onto [p(s), total]: the
    rest of the schedule as it stood at s, compressed into the steps left. The jumper's time axis follows:
    steps before t keep their times (the forecast's target is t's time on the axis it was made with), later
    ones accumulate the re-timed rates."""

    def __init__(self, scheduler, total: int):
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if not lambdas or not total:
            raise ForecastError("retime needs a LambdaLR-based scheduler (every Hugging Face schedule is one) and the "
                                "run's total steps; use retime=False with this scheduler")
        self.total, self.knots = total, []  # (t, p(s)) per jump taken
        originals = list(lambdas)
        scheduler.lr_lambdas = [lambda g, f=f: f(self.position(g)) for f in originals]
        self._lambda = scheduler.lr_lambdas[0]

    def position(self, g: int) -> int:
        """The original schedule's position at global step g (whole steps: a LambdaLR's function may index)."""
        for t, ps in reversed(self.knots):
            if g >= t:
                return round(ps + (g - t) * (self.total - ps) / max(self.total - t, 1))
        return g

    def jump(self, s: int, t: int, axis: TimeAxis) -> TimeAxis:
        """Record a jump from s to t; returns the jumper's time axis from here on."""
        self.knots.append((t, self.position(s)))
        if axis.name != "lr":
            return axis
        old = axis.schedule
        table = list(old.options["table"])
        table[t:] = _table(self._lambda, t, len(table))
        return TimeAxis("lr", Schedule("tabulated", old.peak_lr, 0, old.total, {"table": table}), axis.source,
                        "re-timed after each jump")


def _table(f, start: int, stop: int) -> list[float]:
    """A LambdaLR function's multipliers at steps start..stop-1 (the lr axis of a live scheduler)."""
    return [float(f(g)) for g in range(start, stop)]


def schedule_axis(scheduler, total: int | None, fit: FitConfig) -> TimeAxis:
    """The time axis for a live torch scheduler: its learning rates tabulated up to ``total`` when it is a
    LambdaLR (every Hugging Face schedule), its closed form for the torch built-ins, else steps."""
    if fit.axis == "steps" or scheduler is None:
        return TimeAxis("steps", note="no scheduler" if scheduler is None else "as asked")
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas and total:
        table = _table(lambdas[0], 0, total + 1)
        for other in lambdas[1:]:
            if any(abs(float(other(s)) - table[s]) > 1e-12 for s in range(0, total + 1, max(1, total // 64))):
                return TimeAxis("steps", note="parameter groups follow differently shaped schedules")
        sched = Schedule("tabulated", float(scheduler.base_lrs[0]), 0, total, {"table": table})
        return TimeAxis("lr", sched, "the training loop's scheduler")
    s, source, why = from_facts({"format": "torch", "schedulers": [scheduler_state(scheduler.state_dict())],
                                 "global_step": scheduler.last_epoch})
    if s is None:
        return TimeAxis("steps", note=why)
    return TimeAxis("lr", Schedule(s.name, s.peak_lr, s.warmup, total, s.options), source)


def loop_jumper(config: JumpConfig, scheduler, total: int | None, store_dir=None) -> Jumper:
    """The Jumper of a training loop whose per-step scheduler is ``scheduler`` (None: none): its time
    axis, and its Retimer when ``config.retime`` (made first: it wraps the schedule the axis tabulates)."""
    retimer = Retimer(scheduler, total) if config.retime and config.advance else None
    return Jumper(config, schedule_axis(scheduler, total, config.fit), store_dir, total=total, retimer=retimer)


__all__ = ["JumpConfig", "Jumper", "Retimer", "reset_optimizer", "advance_scheduler", "schedule_axis", "loop_jumper"]
