"""Forecasters --emit--> a checkpoint at the target step, in the layout of the run's newest one.

The forecast is computed chunk by chunk from the store and cast to each tensor's source dtype;
non-float tensors and tensors excluded from forecasting are copied bit for bit from the newest
step. safetensors outputs are streamed (memory: one chunk); torch pickles and DCP need whole
tensors and hold one file's tensors at a time. Everything is built under a temporary name in
the output directory and renamed into place at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from farcast_core.calibration import feature_interps
from farcast_core.dtypes import DTYPES, from_storage, nonfinite, to_storage, widen
from farcast_core.errors import ForecastError
from farcast_core.config import EmitConfig, FitConfig
from farcast_core.forecaster import Forecasters, row_weights, weighted_rows
from farcast.pipelines.backtest import backtest
from farcast_core.schedules import NAMES as SCHEDULE_NAMES, multiplier
from farcast_core.timeaxis import training_args_schedule
from farcast.pipelines.fit import excluded_tensors, fit_store, resolve_target, time_axis
from farcast.storage import layouts, writers
from farcast.storage.layouts import huggingface
from farcast.storage.checkpoints import ingested_sources, is_inside
from farcast.storage.store import VERSION, RunStore, TensorMeta



@dataclass
class EmitResult:
    path: Path  # the emitted checkpoint (directory or file)
    target_step: int
    backtest: dict
    files: list[str] = field(default_factory=list)  # what was written, relative to path's parent


def emit(
    store_url: str | os.PathLike,
    out: str | os.PathLike,
    target_step: int | None = None,
    ratio: float | None = None,
    fit_config: FitConfig = FitConfig(),
    config: EmitConfig = EmitConfig(),
    report: dict | None = None,
    forecasters: Forecasters | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> EmitResult:
    """Forecast ``target_step`` (or ``ratio``) and write it into ``out``: the backtest (unless
    ``report`` is given), the fit (unless ``forecasters`` are given: from ``farcast fit``, fitted on
    this run's steps for this target) and ``write_forecast``, for callers that hold only a store.
    ``progress(stage, done, total)``: called as the backtest, the fit ("fit", per batch) and the
    writing ("write", per chunk written) advance.
    """
    store = RunStore.open(store_url)
    axis = time_axis(store, fit_config)
    # before any fit: a bad --out, a rewritten checkpoint or a NaN to copy costs nothing
    checked = _checks(store, axis, out, target_step, ratio, config, set(forecasters.excluded) if forecasters else None)
    rho, target = checked[:2]
    if forecasters is not None:
        _check_fitted_for(forecasters, store, rho, axis)
    report = report or backtest(store.url, target_step=target, config=fit_config, compare_axes=False, axis=axis,
                                progress=progress)
    _refuse_if_worse(report, config)
    fc = forecasters or fit_store(store, len(store.steps), rho, fit_config, axis=axis,
                                  progress=(lambda d, n: progress("fit", d, n)) if progress else None)
    return _write(store, axis, checked, fc, report, config, progress)


def write_forecast(
    store: RunStore | str | os.PathLike,
    out: str | os.PathLike,
    target_step: int,
    forecasters: Forecasters,
    report: dict,
    config: EmitConfig = EmitConfig(),
    progress: Callable[[str, int, int], None] | None = None,
) -> EmitResult:
    """The emit stage: the forecast of ``target_step`` by ``forecasters`` (fitted on this run's steps for
    this target) written into ``out``, in the layout of the run's newest checkpoint, when ``report``
    (the backtest) says the forecast beats keeping the newest weights (or ``config.allow_worse``)."""
    store = store if isinstance(store, RunStore) else RunStore.open(store)
    axis = time_axis(store, forecasters.config)
    checked = _checks(store, axis, out, target_step, None, config, set(forecasters.excluded))
    _check_fitted_for(forecasters, store, checked[0], axis)
    _refuse_if_worse(report, config)
    return _write(store, axis, checked, forecasters, report, config, progress)


def _write(store: RunStore, axis, checked: tuple, fc: Forecasters, report: dict, config: EmitConfig,
           progress: Callable[[str, int, int], None] | None) -> EmitResult:
    """Write the checked request (``_checks``' result) into place: the forecast chunk by chunk."""
    rho, target, finals, sources = checked
    forecast = TargetChunks(store, fc, config.nonfinite)
    if progress:  # every chunk is computed once per weights file written
        forecast.on_chunk = _counter(progress, "write", layouts.chunk_passes(store.layout, sources, finals)
                                     * sum(m.plan.n_chunks for m in store.tensors.values()))
    metadata = {
        "farcast": json.dumps({
            "version": VERSION, "method": "farcast-1layer", "config": fc.config.to_json(),
            "source": store.source, "source_steps": store.steps, "target_step": target, "ratio": rho,
            "axis": axis.to_json(), "shrink": fc.shrink,
            "optimizer": config.optimizer, "excluded": fc.excluded, "copied_from": forecast.copied_from,
            "backtest": {m: v["mae"] for m, v in report["methods"].items()}
            | {"farcast_vs_persistence": report["farcast_vs_persistence"], "backtest_from": report["backtest_from"]},
        })
    }
    metas = store.tensors
    checkpoint = layouts.Forecasted(
        specs={n: (m.dtype, m.shape) for n, m in metas.items()}, stream=forecast.stream,
        tensor=lambda name: forecast.tensor(metas[name]), newest_step=store.steps[-1], target=target,
        metadata=metadata, optimizer=config.optimizer, allow_pickle=config.allow_pickle,
        lr_factor=_lr_factor(axis, target, store, config),
    )
    path, files = layouts.write(store.layout, sources, finals, checkpoint, config.force)
    return EmitResult(path, target, report, files)


def _check_fitted_for(fc: Forecasters, store: RunStore, rho: float, axis) -> None:
    fc_axis = (fc.axis or {}).get("name", "steps")
    if fc.steps != store.steps or abs(fc.rho - rho) > 1e-9 or fc_axis != axis.name:
        raise ForecastError(
            f"the forecasters were fitted for ratio {fc.rho:.4g} ({fc_axis} axis) on steps "
            f"{fc.steps[0]}..{fc.steps[-1]}, not ratio {rho:.4g} ({axis.name} axis) on steps "
            f"{store.steps[0]}..{store.steps[-1]}; refit with 'farcast fit'"
        )


def _refuse_if_worse(report: dict, config: EmitConfig) -> None:
    f, p = report["methods"]["farcast"]["mae"], report["methods"]["persistence"]["mae"]
    if not f < p and not config.allow_worse:
        raise ForecastError(
            f"the backtest says the forecast is worse than keeping the newest weights: farcast MAE {f:.4e} vs "
            f"persistence MAE {p:.4e} (ratio {report['farcast_vs_persistence']:.3f}); not emitted. "
            "Try a smaller ratio, or pass --allow-worse to emit anyway"
        )


def _counter(progress: Callable[[str, int, int], None], stage: str, total: int) -> Callable[[], None]:
    """A callback that counts calls (from any thread) and reports them as ``progress(stage, n, total)``."""
    lock, n = threading.Lock(), 0

    def tick() -> None:
        nonlocal n
        with lock:
            n += 1
            progress(stage, min(n, total), total)

    return tick


def check_request(ckpt_dir: str | os.PathLike, out: str | os.PathLike, target_step: int | None,
                  ratio: float | None) -> None:
    """What can be checked of an emit before the run is even ingested: one target, --out usable and outside the run."""
    if (target_step is None) == (ratio is None):
        raise ForecastError("give exactly one of --target-step or --ratio")
    if ratio is not None and not (ratio > 1 and math.isfinite(ratio)):
        raise ForecastError(f"--ratio must be a finite number > 1, got {ratio}")
    _refuse_out_inside(out, ckpt_dir)
    writers.check_writable_dir(Path(out).resolve())


def _refuse_out_inside(out, ckpt_dir) -> None:
    if is_inside(out, ckpt_dir):
        raise ForecastError(f"--out {Path(out).resolve()} is inside the checkpoint directory {Path(ckpt_dir).resolve()}; "
                            "write the forecast elsewhere (the trainer would take it for one of its own checkpoints)")


def check_before_fit(store_url: str | os.PathLike, out: str | os.PathLike, target_step: int | None,
                     ratio: float | None, fit_config: FitConfig = FitConfig(), config: EmitConfig = EmitConfig()) -> int:
    """Every check emit makes before fitting (target, --out, provenance, NaN copies); returns the target step."""
    store = RunStore.open(store_url)
    return _checks(store, time_axis(store, fit_config), out, target_step, ratio, config)[1]


def _checks(store: RunStore, axis, out, target_step, ratio, config: EmitConfig, excluded: set[str] | None = None):
    """(ratio, target step, output paths, newest weight files), refusing what emit would refuse later."""
    rho, target = resolve_target(store.steps, target_step, ratio, axis)
    finals = check_output(store, out, target, config)
    sources = ingested_sources(store.step_records[-1], store.url, store.source)
    copy_rows(store, excluded_tensors(store) if excluded is None else excluded, config.nonfinite)
    return rho, target, finals, sources


def check_output(store: RunStore, out: str | os.PathLike, target: int, config: EmitConfig = EmitConfig()) -> list[Path]:
    """The paths emit will write for ``target``, checked: outside the run, new (or --force), writable."""
    _refuse_out_inside(out, store.source)
    out = Path(out).resolve()
    newest = layouts.newest_path(store.layout, store.step_records[-1])
    finals = layouts.output_paths(store.layout, newest, store.steps[-1], target, out, config.force)
    writers.check_writable_dir(out)
    return finals


class TargetChunks:
    """The target-step values of every tensor, chunk by chunk, in the store's representation.

    Tensors not forecast (buffers, floats excluded for NaN/Inf in the history) are copied from
    the newest step; a float among them that is NaN/Inf there is refused, or with
    ``nonfinite="last-finite"`` copied from the newest step where it is finite.
    """

    def __init__(self, store: RunStore, fc: Forecasters, nonfinite: str = "refuse"):
        self.store, self.fc = store, fc
        times = fc.times if fc.times is not None else store.steps
        self.app = feature_interps(np.array(times, dtype=np.float64), fc.feature_ratios)
        self.rows = sorted({r for it in self.app for r in (it.lo, it.hi)})
        self.weights = row_weights(fc.A, self.app, self.rows)  # every chunk's forecast as weights on the rows
        self.last = len(store.steps) - 1
        self.row_of = fc.row()
        forecast = {name for name, _ in self.row_of}
        not_forecast = {n for n, m in store.tensors.items() if m.kind == "float" and n not in forecast}
        self.copy_row = copy_rows(store, not_forecast, nonfinite)  # tensor -> row copied, where not the newest
        self.copied_from = {n: store.steps[r] for n, r in self.copy_row.items()}
        self.on_chunk: Callable[[], None] | None = None  # called after each chunk is computed (progress)

    def chunk(self, m: TensorMeta, i: int) -> np.ndarray:
        """Chunk ``i`` of tensor ``m`` at the target step, in the store's representation."""
        values = self._chunk(m, i)
        if self.on_chunk:
            self.on_chunk()
        return values

    def _chunk(self, m: TensorMeta, i: int) -> np.ndarray:
        lo, hi = m.plan.bounds(i)
        k = self.row_of.get((m.name, i))
        if k is None:  # buffers and excluded tensors: the newest (finite) values, bit for bit
            values = self.store.read(m.name, [self.copy_row.get(m.name, self.last)], lo, hi)[0]
            if m.kind == "float" and nonfinite(values, m.dtype):  # a store without per-step NaN records
                raise ForecastError(f"tensor '{m.name}': NaN/Inf in the values to copy (values {lo}..{hi}, {m.dtype}); "
                                    "nothing was written. Pass --nonfinite last-finite, or mend the run")
            return values
        # float32 arithmetic is exact enough for float32-and-narrower weights and twice as fast
        stored = self.store.read(m.name, self.rows, lo, hi)
        w, b = self.weights[k], self.fc.b[k]  # forecast_rows, its weights folded once for every chunk
        if m.dtype in ("float32", "float64"):  # in numpy (a few microseconds per operation where torch's cost tens)
            y = weighted_rows(w, b, stored, stored.dtype)
            finite = np.isfinite(y).all()
        else:  # narrower: torch rounds float32 to the stored dtype
            y = weighted_rows(w, b, widen(stored, m.dtype), torch.float32).to(DTYPES[m.dtype].torch)
            finite = torch.isfinite(y.to(torch.float64) if y.dtype.itemsize == 1 else y).all()
        if not finite:
            raise ForecastError(
                f"tensor '{m.name}': the forecast has NaN/Inf (values {lo}..{hi}, {m.dtype}); nothing was written. "
                "Ask for a nearer target, or check this tensor's history"
            )
        return y if isinstance(y, np.ndarray) else to_storage(y)

    def chunks(self, m: TensorMeta) -> Iterator[np.ndarray]:
        return (self.chunk(m, i) for i in range(m.plan.n_chunks))

    def stream(self, names: list[str], ahead: int = 2) -> Iterator[tuple[str, np.ndarray]]:
        """(name, chunk) for every chunk of ``names`` in order, computing ``ahead`` chunks in parallel."""
        metas = self.store.tensors
        jobs = [(n, i) for n in names for i in range(metas[n].plan.n_chunks)]
        with ThreadPoolExecutor(ahead) as pool:
            pending = deque()
            for n, i in jobs:
                pending.append((n, pool.submit(self.chunk, metas[n], i)))
                if len(pending) > ahead:
                    name, fut = pending.popleft()
                    yield name, fut.result()
            while pending:
                name, fut = pending.popleft()
                yield name, fut.result()

    def tensor(self, m: TensorMeta) -> torch.Tensor:
        parts = list(self.chunks(m))
        return from_storage(parts[0] if len(parts) == 1 else np.concatenate(parts), m.dtype).reshape(m.shape)


def copy_rows(store: RunStore, not_forecast: set[str], policy: str = "refuse") -> dict[str, int]:
    """{tensor: row} for unforecast tensors that are NaN/Inf at the newest step and copied from an earlier one.

    Refuses (ForecastError naming the tensor) unless ``policy`` is "last-finite" and such a row exists.
    """
    records, last, out = store.step_records, len(store.steps) - 1, {}
    for name in sorted(not_forecast):
        if name not in records[last].get("nonfinite", []):
            continue
        finite = [r for r in range(last) if name not in records[r].get("nonfinite", [])]
        if policy != "last-finite" or not finite:
            raise ForecastError(
                f"tensor '{name}' has NaN/Inf at step {store.steps[-1]}, the newest, and is not forecast (NaN/Inf in "
                "its history), so it would be copied as it is; nothing was written. "
                + (f"Pass --nonfinite last-finite to copy it from step {store.steps[finite[-1]]}, its newest finite "
                   "values, or mend the run" if finite else "It is finite at no ingested step: mend the run")
            )
        out[name] = finite[-1]
    return out


def _lr_factor(axis, target: int, store: RunStore, config: EmitConfig) -> float | None:
    """The schedule's multiplier on the base learning rate at the target step: from the known schedule,
    else (step directories) from the newest step's training_args.bin, a pickle, read only with
    --allow-pickle. The first optimizer step after resuming uses the learning rate stored in the
    optimizer state; without either that one step keeps the newest real step's rate."""
    s = axis.schedule
    if s is None and store.layout in ("hf", "dirs", "dcp"):
        args = huggingface.trainer_args_facts(layouts.newest_path(store.layout, store.step_records[-1]),
                                              config.allow_pickle)
        s = training_args_schedule(args) if args else None
        if s is not None and s.name not in SCHEDULE_NAMES:
            s = None
    if s is None:
        return None
    return multiplier(s.name, target, s.warmup, s.total, **s.options)
