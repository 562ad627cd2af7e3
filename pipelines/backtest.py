"""How a user learns whether to trust a forecast (method page, section 6).

Pretend the run ended at s_b, the checkpoint from which the requested ratio reaches the newest
step s_n; fit on the steps up to s_b, forecast s_n, and compare with the real s_n: MAE over all
forecast parameters and per tensor, for the farcaster and every baseline. Chunk by chunk.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from farcast_core import baselines
from farcast_core.baselines import METHODS
from farcast_core.calibration import at, backtest_row, feature_interps, interp_at, max_ratio
from farcast_core.dtypes import widen_np
from farcast_core.errors import ForecastError, ScheduleEndError
from farcast_core.forecaster import FitConfig, Forecasters, forecast_rows
from farcast_core.timeaxis import TimeAxis
from farcast.pipelines.fit import fit_store, resolve_target, standstill, time_axis
from farcast.storage.store import RunStore


def backtest(
    store_url: str | os.PathLike,
    target_step: int | None = None,
    ratio: float | None = None,
    config: FitConfig = FitConfig(),
    forecasters: Forecasters | None = None,
    compare_axes: bool = True,
    axis: TimeAxis | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """The backtest report as a JSON-able dict (see ``farcast backtest --json``).

    With ``forecasters`` (a transfer from another run) they are evaluated instead of fitted,
    at their own ratio. With ``compare_axes`` and a known schedule, the same backtest is also
    run on the other time axis (steps or lr) and both are reported under ``axes``. ``axis``:
    the run's time axis when the caller has it already (else resolved from the store and config).
    ``progress(stage, done, total)``: called as the backtest's fit ("backtest fit") and its
    evaluation ("backtest") advance, per batch and per chunk.
    """
    store = RunStore.open(store_url)
    steps = store.steps
    axis = axis or time_axis(store, config)
    try:
        rho_user, target = resolve_target(steps, target_step, ratio, axis)
    except ScheduleEndError:
        if ratio is None:
            raise
        rho_user, target = float(ratio), None  # a finished run can still be backtested at a ratio
    times = axis.times(steps)
    if forecasters is None:
        b = backtest_row(times, rho_user)
    else:
        _check_transfer(store, forecasters)
        rho, t0, tn = forecasters.rho, times[0], times[-1]
        fits = [r for r in range(2, len(times) - 1) if t0 + rho * (times[r] - t0) <= tn]
        if not fits:
            raise ForecastError(f"{store_url}: too few checkpoints to backtest forecasters of ratio {rho:.4g}")
        b = fits[-1]
    try:
        report = _evaluate(store, axis, b, config, forecasters, progress)
    except ForecastError as e:
        most = float(np.sqrt(max_ratio(times)))
        raise ForecastError(
            f"cannot backtest ratio {rho_user:.4g}: pretending the run ended at step {steps[b]} leaves too little "
            f"history ({e}); this run can backtest ratios up to about {most:.3g}"
        ) from e
    axes = {axis.name: _summary(report)}
    if compare_axes and forecasters is None and axis.schedule is not None:
        other = TimeAxis("steps") if axis.name == "lr" else TimeAxis("lr", axis.schedule, axis.source)
        try:
            why = standstill(other, steps)
            if why:
                raise ForecastError(why)
            axes[other.name] = _summary(_evaluate(store, other, b, config, None, progress, f" ({other.name} axis)"))
        except ForecastError as e:
            axes[other.name] = {"error": str(e)}
    return report | {
        "observed_until": int(steps[-1]), "backtest_from": int(steps[b]), "target_step": None if target is None else int(target),
        "ratio": float(rho_user), "transfer": forecasters is not None, "axis": axis.to_json(), "axes": axes,
    }


def _summary(report: dict) -> dict:
    keys = ("methods", "farcast_vs_persistence", "backtest_ratio")
    return {k: report[k] for k in keys}


def _evaluate(store: RunStore, axis: TimeAxis, b: int, config: FitConfig, fc: Forecasters | None,
              progress: Callable[[str, int, int], None] | None = None, label: str = "") -> dict:
    """Fit on rows 0..b (unless ``fc`` is given), forecast on ``axis``, compare with the real weights."""
    steps = store.steps
    times = axis.times(steps)
    t0, tn = times[0], times[-1]
    rho = fc.rho if fc is not None else (tn - t0) / (times[b] - t0)
    T = t0 + rho * (times[b] - t0)
    fit_progress = (lambda d, n: progress(f"backtest fit{label}", d, n)) if progress else None
    fc = fc or fit_store(store, b + 1, rho, config, axis=axis, progress=fit_progress)

    truth = interp_at(times, T)
    seen = times[: b + 1]
    app = feature_interps(seen, fc.feature_ratios)
    k = min(fc.config.linefit_k, b + 1)
    line_rows = list(range(b - k + 1, b + 1))
    rows = sorted({0, b - 1, b, truth.lo, truth.hi, *line_rows, *(r for it in app for r in (it.lo, it.hi))})
    pos = {r: i for i, r in enumerate(rows)}
    row_of = fc.row()
    line_t = np.asarray(times[line_rows], dtype=np.float64)

    excluded = sorted(set(fc.excluded) | {n for n in store.nonfinite() if store.tensors[n].kind == "float"})
    sums = {name: dict.fromkeys(METHODS, 0.0) for name, m in store.tensors.items() if m.kind == "float" and name not in excluded}
    counts = dict.fromkeys(sums, 0)
    n_chunks, done = sum(store.tensors[n].plan.n_chunks for n in sums), 0
    for name in sums:
        m = store.tensors[name]
        for i in range(m.plan.n_chunks):
            lo, hi = m.plan.bounds(i)
            v = widen_np(store.read(name, rows, lo, hi), m.dtype).astype(np.float64)  # (R, chunk)
            real = at(v, rows, truth)
            w0, wp, wb = v[pos[0]], v[pos[b - 1]], v[pos[b]]
            k_ = row_of[(name, i)]
            preds = {
                "farcast": forecast_rows(fc.A[k_], fc.b[k_], app, rows, v),  # emit's computation, in float64
                "persistence": baselines.persistence(wb),
                "chord": baselines.chord(w0, wb, t0, times[b], T),
                "linear": baselines.last_segment(wp, wb, times[b - 1], times[b], T),
                "linefit": baselines.linefit(v[[pos[r] for r in line_rows]], line_t, T),
            }
            for meth, p in preds.items():
                sums[name][meth] += float(np.abs(p - real).sum())
            counts[name] += hi - lo
            done += 1
            if progress:
                progress(f"backtest{label}", done, n_chunks)
    total = sum(counts.values())
    if not total:
        raise ForecastError(f"{store.url}: nothing to backtest (all float tensors excluded: {excluded})")
    methods = {meth: {"mae": sum(s[meth] for s in sums.values()) / total} for meth in METHODS}
    persistence = methods["persistence"]["mae"]
    return {
        "methods": methods,
        "farcast_vs_persistence": methods["farcast"]["mae"] / persistence if persistence > 0 else float("inf"),
        "backtest_target": float(np.interp(T, times, steps)),  # as a (fractional) step
        "backtest_ratio": float(rho),
        "per_tensor": {n: {meth: s[meth] / counts[n] for meth in METHODS} for n, s in sums.items()},
        "excluded": excluded,
        "config": fc.config.to_json(),
        "shrink": fc.shrink,
        "parameters": total,
    }


def _check_transfer(store: RunStore, fc: Forecasters) -> None:
    """A transferred forecaster must match this run's tensors and chunk plan."""
    for name, chunk in fc.chunks.items():
        m = store.tensors.get(name)
        if m is None:
            raise ForecastError(f"{store.url}: the forecaster covers tensor '{name}', which this run lacks; transfer needs the same architecture")
        if m.chunk != chunk:
            raise ForecastError(
                f"{store.url}: tensor '{name}' is chunked by {m.chunk} here but {chunk} in the forecaster's run; "
                "ingest with the same --memory-budget-mb"
            )


def format_table(report: dict) -> str:
    """The backtest as a small text table (both time axes side by side when the schedule is known)."""
    axis = TimeAxis.from_json(report.get("axis"))
    axes = report.get("axes") or {axis.name: report}
    names = [axis.name] + [a for a in axes if a != axis.name]
    lines = [
        axis.describe(),
        f"backtest: fitted on steps up to {report['backtest_from']}, forecast step {report['backtest_target']:.6g}, "
        "compared with the real weights",
        f"{'method':<12} " + " ".join(f"{'MAE ' + a:>14} {'/persistence':>12}" for a in names),
    ]
    for meth in METHODS:
        cells = []
        for a in names:
            r = axes[a]
            if "error" in r:
                cells.append(f"{'-':>14} {'-':>12}")
                continue
            mae, p = r["methods"][meth]["mae"], r["methods"]["persistence"]["mae"]
            cells.append(f"{mae:>14.4e} {mae / p if p else float('nan'):>12.3f}")
        lines.append(f"{meth:<12} " + " ".join(cells))
    lines.append("ratio        " + " ".join(f"{axes[a].get('backtest_ratio', float('nan')):>14.3g} {'':>12}" for a in names))
    if len(names) > 1:
        lines.append(f"(the forecast uses the {axis.name} axis; the {names[1]} column shows what the other axis would give)")
    for a in names:
        if "error" in axes[a]:
            lines.append(f"{a} axis: {axes[a]['error']}")
    if report.get("shrink"):
        lines.append(f"the backtest's forecast was shrunk towards step {report['backtest_from']}: alpha "
                     f"{report['shrink']['alpha']:.3g} ({report['shrink']['chosen']})")
    if report["excluded"]:
        lines.append(f"excluded (NaN/Inf seen): {', '.join(report['excluded'])}")
    return "\n".join(lines)
