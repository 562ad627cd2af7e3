"""Zarr store --fit--> forecasters: one (A, b) per chunk, fitted as batched problems.

Reads the store chunk by chunk (only the rows the calibration plan needs, only the sampled
parameters), so memory is bounded by the sample and the batch, never the model or the run.
On the CPU the fit is numpy and never imports torch; on a GPU the reduction runs in torch there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from farcast_core import timeaxis
from farcast_core.calibration import PairPlan, backtest_row, feature_interps, plan_pairs
from farcast_core.dtypes import widen_np
from farcast_core.errors import ForecastError
from farcast_core.forecaster import (FitConfig, Forecasters, Moments, default_device, forecast_rows, on_cpu,
                                     reduce_many, shrink_factor, solve)
from farcast_core.sampling import chunk_seed, sample_index
from farcast_core.timeaxis import STEPS, TimeAxis
from farcast.storage.artifacts import forecaster_path, save_forecasters
from farcast.storage.lock import StoreLock
from farcast.storage.store import RunStore


def time_axis(store: RunStore, config: FitConfig) -> TimeAxis:
    """The time axis for this run: config.axis, with the schedule stated or recorded at ingest."""
    axis = timeaxis.choose(config.axis, config.schedule, store.schedule, store.schedule_reading)
    why = standstill(axis, store.steps)
    if why:
        if config.axis == "lr":
            raise ForecastError(f"--axis lr: {why}; use --axis steps")
        return TimeAxis("steps", axis.schedule, axis.source, why)
    return axis


def standstill(axis: TimeAxis, steps: list[int]) -> str | None:
    """Why ``axis`` cannot order these checkpoints (time stands still between two), or None."""
    if axis.name != "lr" or len(steps) < 2:
        return None
    flat = np.flatnonzero(np.diff(axis.times(steps)) <= 0)
    if not flat.size:
        return None
    a, b = steps[flat[0]], steps[flat[0] + 1]
    return f"the learning rate is zero between steps {a} and {b}, so cumulative learning rate stands still there"


MAX_STEP = 2**53  # steps beyond are not exact as floats (time axes are float64)


def resolve_target(
    steps: list[int], target_step: int | None, ratio: float | None, axis: TimeAxis = STEPS
) -> tuple[float, int]:
    """(ratio on ``axis``, target step) from whichever of the two the user gave."""
    if (target_step is None) == (ratio is None):
        raise ForecastError("give exactly one of --target-step or --ratio")
    if len(steps) < 3:
        raise ForecastError(f"farcasting needs at least 3 checkpoints; the store has {len(steps)} ({steps})")
    sn = steps[-1]
    t0, tn = axis.times([steps[0], sn])
    if ratio is not None:
        if not (ratio > 1 and math.isfinite(ratio)):
            raise ForecastError(f"--ratio must be a finite number > 1 (the target lies after step {sn}), got {ratio}")
        t = t0 + ratio * (tn - t0)
        if axis.name == "steps" and t > MAX_STEP:
            raise ForecastError(f"--ratio {ratio:g} puts the target past step {MAX_STEP}; ask for a nearer target")
        target = axis.step_at(t, sn)
    else:
        if target_step > MAX_STEP:
            raise ForecastError(f"--target-step {target_step} is past step {MAX_STEP}; ask for a nearer target")
        if target_step <= sn:
            raise ForecastError(f"--target-step {target_step} is not after the newest checkpoint, step {sn}")
        axis.check_step(target_step)
        target = int(target_step)
    return float((axis.times([target])[0] - t0) / (tn - t0)), target


@dataclass
class FitPlan:
    """What fitting one target on a run involves: the pairs, and the chunk batches to fit."""

    rho: float
    n_rows: int  # fit on the first n_rows committed steps
    steps: list[int]
    axis: TimeAxis
    times: list[float]  # the steps on the axis
    pairs: PairPlan
    excluded: list[str]  # float tensors with NaN/Inf: not forecast
    chunks: dict[str, int]  # tensor -> chunk length, of the tensors forecast
    batches: list[list[tuple[str, int]]]  # (tensor, chunk) keys, one batched problem each
    # shrink "auto": the plan of the backtest that chooses the shrinkage (the same chunks, unshrunk, on
    # the steps up to s_b; reduced in the same pass over the same rows), or None and why there is none
    inner: "FitPlan | None" = None
    why_no_inner: str = ""

    @property
    def rows(self) -> list[int]:
        """Every stored row the fit reads: the pairs', and the inner backtest's (its forecast's rows too)."""
        return sorted({*self.pairs.rows, *(self.inner.pairs.rows if self.inner else ())})

    def problems(self) -> list["FitPlan"]:
        """The fits each batch of chunks is reduced for: this plan's, then the inner backtest's."""
        return [self] + ([self.inner] if self.inner else [])


def excluded_tensors(store: RunStore, n_rows: int | None = None) -> set[str]:
    """The float tensors a fit on the first ``n_rows`` steps leaves unforecast: NaN/Inf at one of them."""
    return {n for n in store.nonfinite(n_rows) if store.tensors[n].kind == "float"}


def plan_fit(
    store: RunStore, n_rows: int, rho: float, config: FitConfig = FitConfig(), axis: TimeAxis | None = None
) -> FitPlan:
    axis = axis or time_axis(store, config)
    steps = store.steps[:n_rows]
    times = axis.times(steps)
    pairs_plan = plan_pairs(times, rho, config.horizons, config.max_cuts, config.extra_features, axis.unit,
                            config.recency)
    excluded = sorted(excluded_tensors(store, n_rows))
    metas = [m for m in store.tensors.values() if m.kind == "float" and m.name not in excluded]
    if not metas:
        raise ForecastError(f"{store.url}: no float tensor to forecast (excluded for NaN/Inf: {excluded})")
    keys = [(m.name, i) for m in metas for i in range(m.plan.n_chunks)]
    # largest chunks first, so a batch pads its chunks to a similar size (a LayerNorm's 96 values
    # in a batch of 4096-value samples would cost as much as one of them); stable, so deterministic
    size = {(m.name, i): -min(config.sample, m.plan.bounds(i)[1] - m.plan.bounds(i)[0]) for m in metas
            for i in range(m.plan.n_chunks)}
    keys.sort(key=size.__getitem__)
    batches = [keys[i : i + config.batch_chunks] for i in range(0, len(keys), config.batch_chunks)]
    plan = FitPlan(float(rho), n_rows, list(steps), axis, [float(t) for t in times], pairs_plan, excluded,
                   {m.name: m.chunk for m in metas}, batches)
    if config.shrink != "auto":
        return plan
    inner, why = _backtest_plan(store, plan, replace(config, shrink=1.0))
    if inner is not None:  # the same chunks (a tensor NaN only after s_b is not forecast: nothing to backtest)
        inner = replace(inner, excluded=plan.excluded, chunks=plan.chunks, batches=plan.batches)
    return replace(plan, inner=inner, why_no_inner=why)


def reduce_keys(
    store: RunStore, plan: FitPlan, keys: list[tuple[str, int]], config: FitConfig, device,
    sampled: Sampled | None = None,
) -> list[Moments]:
    """The reduced fitting problems of one batch of chunk keys, one Moments per ``plan.problems()``
    (the rows are read here, once, for all of them).

    ``sampled``: ``read_sampled``'s result covering these keys and ``plan.rows``, when the caller read it.
    """
    rows = plan.rows
    W, mask = _reduction_rows(store, keys, rows, config, device, sampled)
    problems = [(p.pairs.coefficients(rows), p.pairs.cut_weights) for p in plan.problems()]
    return reduce_many(W, mask, problems, refine=config.iters > 0)


def _reduction_rows(store: RunStore, keys: list[tuple[str, int]], rows: list[int], config: FitConfig, device,
                    sampled: Sampled | None = None):
    """(W, mask) for ``reduce_many``: on the CPU, each chunk's columns of the sample array as read (views:
    no padded copy); else (a GPU, or a store without the sample array) the padded rows, on the device."""
    if sampled is None:
        sampled = read_sampled(store, rows, config, keys)
    if sampled is not None and on_cpu(device):
        return _sampled_columns(store, keys, sampled, rows), None
    return _on_device(*sampled_values(store, keys, rows, config, sampled), device)


@dataclass
class Sampled:
    """Rows of a store's sample array, as read: ``values`` (len(rows), columns), its column 0 being the
    array's column ``start``."""

    values: np.ndarray
    start: int
    rows: list[int]


def sampled_values(store: RunStore, keys: list[tuple[str, int]], rows: list[int], config: FitConfig,
                   sampled: Sampled | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(W (K, R, P) float64, mask (K, P)): the sampled parameters of each chunk of ``keys`` at ``rows``,
    zero-padded to the longest; from the store's sample array where it serves the config (``sampled``:
    ``read_sampled``'s result when the caller read it already, covering ``rows``), else from the chunks
    themselves."""
    if sampled is None:
        sampled = read_sampled(store, rows, config, keys)
    if sampled is not None:
        values = _sampled_columns(store, keys, sampled, rows)
    else:
        metas = store.tensors
        values = [_chunk_values(store, rows, metas[name], i, config) for name, i in keys]
    # copied straight into one array (no full-size temporaries: in a fresh process their first touch
    # costs as much as the copy)
    lens = [v.shape[1] for v in values]
    W = np.zeros((len(values), len(rows), max(lens)), dtype=np.float64)
    for k, v in enumerate(values):
        W[k, :, : v.shape[1]] = v
    mask = np.arange(W.shape[2])[None, :] < np.asarray(lens)[:, None]  # (K, P)
    return W, mask


def _sampled_columns(store: RunStore, keys: list[tuple[str, int]], sampled: Sampled, rows: list[int]) -> list[np.ndarray]:
    """Each chunk of ``keys``' sampled values at ``rows`` (R, P_k) from ``read_sampled``'s columns (a
    contiguous span per chunk): views where it read exactly these rows, else each chunk's own copy."""
    at = {r: i for i, r in enumerate(sampled.rows)}
    take = [at[r] for r in rows]
    pick = slice(None) if take == list(range(len(sampled.rows))) else take
    spans = (store.sample_layout.spans[k] for k in keys)
    return [sampled.values[pick, a - sampled.start : b - sampled.start] for a, b in spans]


def _on_device(W: np.ndarray, mask: np.ndarray, device):
    """The sampled rows where they are reduced: float64 numpy on the CPU, float32 tensors on a GPU
    (the features are normalised first)."""
    if on_cpu(device):
        return W, mask
    import torch

    return torch.from_numpy(W).to(device, torch.float32), torch.from_numpy(mask).to(device)


def assemble(plan: FitPlan, config: FitConfig, parts: list[tuple[np.ndarray, np.ndarray]]) -> Forecasters:
    """The run's forecasters from the fitted batches, in plan order."""
    return Forecasters(
        keys=[k for batch in plan.batches for k in batch], chunks=plan.chunks,
        A=np.concatenate([a for a, _ in parts]), b=np.concatenate([b for _, b in parts]), config=config, rho=plan.rho,
        ratios=plan.pairs.ratios, feature_ratios=plan.pairs.feature_ratios, steps=plan.steps, excluded=plan.excluded,
        times=plan.times, axis=plan.axis.to_json(),
    )


def fit_store(
    store: RunStore,
    n_rows: int,
    rho: float,
    config: FitConfig = FitConfig(),
    device=None,
    progress: Callable[[int, int], None] | None = None,
    axis: TimeAxis | None = None,
) -> Forecasters:
    """Fit forecasters for ratio ``rho`` (on ``axis``) on the first ``n_rows`` committed steps of ``store``."""
    plan = plan_fit(store, n_rows, rho, config, axis)
    device = device or default_device()
    sampled = read_sampled(store, plan.rows, config)  # once, for every batch, the inner backtest included
    return finish(store, plan, config, _reduce_all(store, plan, config, device, progress, sampled), sampled)


def _reduce_all(store: RunStore, plan: FitPlan, config: FitConfig, device,
                progress: Callable[[int, int], None] | None = None,
                sampled: Sampled | None = None) -> list[list[Moments]]:
    per = device_batch(device, len(plan.rows), config.sample, config.batch_chunks)
    if per != config.batch_chunks:  # the order of the chunks stays (the inner plan's follows it)
        keys = [k for batch in plan.batches for k in batch]
        plan = replace(plan, batches=[keys[i : i + per] for i in range(0, len(keys), per)])
    parts = []
    for n, keys in enumerate(plan.batches):  # read and reduce batch by batch; then refine all chunks at once
        parts.append(reduce_keys(store, plan, keys, config, device, sampled))
        if progress:
            progress(n + 1, len(plan.batches))
    return parts


# A chunk's reduction holds about this many float32 copies of its (rows x sample) values at once
# (the values, delta, V, the normaliser products, their absolute values, the kappa subsets).
COPIES_PER_CHUNK = 16


def device_batch(device, rows: int, sample: int, default: int) -> int:
    """Chunks per reduction batch: ``default`` on the CPU; on a GPU as many as a quarter of its free
    memory holds (the rows move to the device once per batch, so fewer, larger batches pay there)."""
    if on_cpu(device):
        return default
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    return max(default, int(free // 4 // (rows * sample * 4 * COPIES_PER_CHUNK)))


def finish(store: RunStore, plan: FitPlan, config: FitConfig, parts: list[list[Moments]],
           sampled: Sampled | None = None) -> Forecasters:
    """Refine every chunk of the reduced batches at once (``solve``) and assemble the run's forecasters,
    shrunk towards the newest weights as config.shrink says (docs/method.md, "Shrinkage"). ``parts``:
    ``reduce_keys``' results, one per batch (numpy, or tensors on the GPU that reduced them: the
    refinement measures its kappas there); ``sampled``: the rows read for them, when the caller has them.

    shrink "auto": a backtest of the fit on the run's own history, on the sampled parameters: fit (the
    same config, unshrunk) on the steps up to s_b, the checkpoint from which the plan's ratio reaches
    the newest step (``plan.inner``, reduced beside the plan's own fit), forecast the newest step, and
    take the alpha in [0, 1] that minimises the L1 error (each sampled parameter weighted by its
    chunk's size over its sample). That fit is refined in the same loop as the target's (its chunks
    are more rows of the batch). Too few checkpoints for the backtest: alpha = 1 (no shrinkage), and
    the forecasters say why.
    """
    by_problem = [[part[i] for part in parts] for i in range(len(plan.problems()))]  # the plan's, then the inner's
    moments = Moments.cat([m for group in by_problem for m in group])
    K = sum(part[0].G.shape[0] for part in parts)
    ratios = np.concatenate([np.broadcast_to(np.asarray(p.pairs.ratios), (K, len(p.pairs.ratios)))
                             for p in plan.problems()])
    fitted = solve(moments, ratios, config)
    A, b = fitted.A, fitted.b
    fc = assemble(plan, config, [(A[:K], b[:K])])
    if config.shrink != "auto":
        return fc.shrunk(float(config.shrink), "stated") if config.shrink != 1 else fc
    inner = plan.inner
    if inner is None:
        return fc.shrunk(1.0, f"none: too few checkpoints for a backtest ({plan.why_no_inner})")
    moved, needed, weights = _backtest_sampled(store, assemble(inner, replace(config, shrink=1.0), [(A[K:], b[K:])]),
                                               fc.keys, inner.n_rows - 1, plan.n_rows - 1, config, sampled)
    return fc.shrunk(shrink_factor(moved, needed, weights),
                     f"backtest: fitted on steps up to {plan.steps[inner.n_rows - 1]}, forecast step {plan.steps[-1]}")


def _backtest_plan(store: RunStore, plan: FitPlan, config: FitConfig) -> tuple[FitPlan | None, str]:
    """The plan of the fit that the shrinkage's backtest needs (on the steps up to s_b), or (None, why not)."""
    times = np.asarray(plan.times)
    b = backtest_row(times, plan.rho)
    if b >= plan.n_rows - 1:
        return None, f"no checkpoint between the first and the newest leaves a ratio above 1 ({plan.n_rows} checkpoints)"
    try:
        return plan_fit(store, b + 1, (times[-1] - times[0]) / (times[b] - times[0]), config, plan.axis), ""
    except ForecastError as e:
        return None, str(e)


def _backtest_sampled(store: RunStore, fc: Forecasters, keys: list[tuple[str, int]], b: int, newest: int,
                      config: FitConfig, sampled: Sampled | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(forecast step, real step, weight) of every sampled parameter of ``keys`` when ``fc`` (fitted on
    rows 0..b) forecasts row ``newest`` (``forecast_rows``, as emit and the backtest do): the steps are
    from row b; the weight is chunk size / sample size."""
    app = feature_interps(fc.times or [float(s) for s in fc.steps], fc.feature_ratios)
    rows = sorted({newest, b, *(r for it in app for r in (it.lo, it.hi))})
    W, mask = sampled_values(store, keys, rows, config, sampled)  # (K, R, P), zero-padded
    row_of = fc.row()
    k = [row_of[key] for key in keys]
    start = W[:, rows.index(b)]
    moved = forecast_rows(fc.A[k], fc.b[k], app, rows, W) - start
    needed = W[:, rows.index(newest)] - start
    bounds = [store.tensors[name].plan.bounds(i) for name, i in keys]
    size = np.array([hi - lo for lo, hi in bounds], dtype=np.float64)
    weights = np.broadcast_to((size / mask.sum(-1))[:, None], start.shape)
    return tuple(x[mask] for x in (moved, needed, weights))


def read_sampled(store: RunStore, rows: list[int], config: FitConfig, keys=None) -> Sampled | None:
    """``rows`` x the span of sample-array columns that ``keys`` use (default all), or None where the
    store keeps no sample for this config's size and seed."""
    layout = store.sample_layout
    if layout is None or not layout.serves(config.sample, config.seed):
        return None
    if keys is None:
        return Sampled(store.read_sample(rows), 0, list(rows))
    spans = [layout.spans[k] for k in keys]
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    return Sampled(store.read_sample(rows, lo, hi), lo, list(rows))


def _chunk_values(store: RunStore, rows: list[int], m, i: int, config: FitConfig):
    """Chunk i of tensor m's sampled parameters at ``rows``, (R, l) float64, read from the chunk
    itself (stores without the sample array, or another sample size or seed)."""
    a, b = m.plan.bounds(i)
    idx = sample_index(b - a, config.sample, chunk_seed(config.seed, m.name, i))
    return widen_np(store.read(m.name, rows, cols=a + idx), m.dtype).astype(np.float64)


def fit(
    store_url: str | os.PathLike,
    target_step: int | None = None,
    ratio: float | None = None,
    config: FitConfig = FitConfig(),
    out: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
    force: bool = False,
) -> tuple[Forecasters, Path, int]:
    """Fit on every committed step and save the forecasters; returns (forecasters, path, target step).

    The file is ``target_<step>.safetensors`` in the directory ``out`` (default: beside the store,
    ``<store>.forecasters/``, where a refit replaces it). ``out`` is checked before fitting: never
    inside the run's directory or the store, and an existing file is replaced only with ``force``.
    """
    store = RunStore.open(store_url)
    axis = time_axis(store, config)
    rho, target = resolve_target(store.steps, target_step, ratio, axis)
    path = forecaster_path(out, store.url, store.source, target, force)
    fc = fit_store(store, len(store.steps), rho, config, progress=progress, axis=axis)
    save(store, fc, path, target)
    return fc, path, target


def save(store: RunStore, fc: Forecasters, path: Path, target: int) -> Path:
    """Save forecasters fitted on ``store`` (holding the store's writer lock: one writer of its files)."""
    with StoreLock(store.url):
        return save_forecasters(fc, path, {"store": str(store.url), "target_step": target, "source": store.source})
