"""The `farcast` command. Errors print as one line and exit non-zero, never a traceback."""

from __future__ import annotations

import errno
import json
import math
import sys

import click

from farcast_core.config import AXES, NONFINITE_POLICIES, OPTIMIZER_POLICIES, EmitConfig, FitConfig, IngestConfig
from farcast_core.errors import FarcastError


def fail(message: str, code: int = 2) -> None:
    """Print one line to stderr and exit: how every failure a user can cause ends."""
    click.echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


def describe_os_error(e: OSError) -> str:
    """An OS error as one line naming the path and what to do."""
    what = e.strerror or type(e).__name__
    where = f"{e.filename}: " if e.filename else ""
    advice = {
        errno.ENOSPC: "free some space, or point --store/--out at another disk, and rerun",
        errno.EDQUOT: "free some space, or point --store/--out at another disk, and rerun",
        errno.EACCES: "check the permissions of that path, or choose another one",
        errno.EPERM: "check the permissions of that path, or choose another one",
        errno.EROFS: "that file system is read-only: choose another path",
        errno.ENOENT: "it vanished while farcast worked (rotated?): rerun",
    }.get(e.errno, "rerun once the cause is mended")
    return f"{where}{what} ({type(e).__name__}); {advice}"


class _Group(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Every failure a user can cause is one line on stderr and exit status 2, never a traceback."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        _log_to_stderr()
        try:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:  # bad option values, unknown options, missing arguments
            hint = f" (see '{e.ctx.command_path} --help')" if getattr(e, "ctx", None) else ""
            fail(e.format_message() + hint, 2)
        except click.exceptions.Abort:
            fail("interrupted", 130)
        except FarcastError as e:
            fail(str(e))
        except OSError as e:
            fail(describe_os_error(e))
        except KeyboardInterrupt:
            fail("interrupted; nothing half-written is left where a trainer would pick it up", 130)
        sys.exit(0)


def _log_to_stderr() -> None:
    """farcast's own notices (waiting for a store's lock, taking over a dead writer's) go to stderr."""
    import logging

    log = logging.getLogger("farcast")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("farcast: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class FiniteFloat(click.FloatRange):
    """A float in a range that is also finite (click's FloatRange lets inf and nan through)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value} is not a finite number", param, ctx)
        return v


def _parse_features(ctx, param, value: str) -> tuple[float, ...]:
    if value.strip().lower() in ("", "none"):
        return ()
    out = []
    for x in value.split(","):
        if not x.strip():
            continue
        try:
            f = float(x)
        except ValueError:
            raise click.BadParameter(f"{x.strip()!r} is not a number; give fractions like 0.5,0.8 or 'none'") from None
        if not 0 < f < 1:
            raise click.BadParameter(f"{f:g} is not strictly between 0 and 1; give fractions like 0.5,0.8 or 'none'")
        out.append(f)
    return tuple(out)


def _parse_shrink(ctx, param, value) -> str | float:
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        a = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither 'auto' nor a number; give auto, or alpha in [0, 1] (1: no shrinkage)") from None
    if not 0 <= a <= 1:
        raise click.BadParameter(f"{a:g} is outside [0, 1]; give auto, or alpha in [0, 1] (1: no shrinkage)")
    return a


class Bars:
    """Progress bars on stderr (tqdm), one per stage, shown only on a terminal and without --quiet.

    Called as ``bars(stage, done, total)``; a stage's bar closes when done reaches total.
    """

    def __init__(self, quiet: bool = False):
        self.off = quiet or not sys.stderr.isatty()
        self.bars: dict = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.off:
            return
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, dynamic_ncols=True,
                                          bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self.bars[stage]

    def stage(self, name: str):
        """A (done, total) callback for one stage."""
        return lambda done, total: self(name, done, total)


def quiet_option(f):
    return click.option("--quiet", "-q", is_flag=True, help="No progress bars (they show only on a terminal anyway).")(f)


POSITIVE = click.IntRange(min=1)
MAX_STEP = 2**53


def setting(config, field: str, *decls: str, text=None, **kw):
    """A click option for ``field`` of the config dataclass ``config``, defaulting to the field's default
    (stated once, in the dataclass; ``text`` turns it into the option's text form)."""
    import dataclasses

    default = next(f for f in dataclasses.fields(config) if f.name == field).default
    return click.option(*decls, default=text(default) if text else default, show_default=True, **kw)


@click.group(cls=_Group)
@click.version_option(package_name="farcast", prog_name="farcast")
def main() -> None:
    """Forecast a training run's weights far ahead from its checkpoints."""


@main.command()
@click.argument("ckpt_dir", type=click.Path(file_okay=False))
@click.option("--store", "store", required=True, help="Zarr store for this run (path or fsspec URL), outside CKPT_DIR.")
@setting(IngestConfig, "memory_budget_mb", "--memory-budget-mb", type=POSITIVE,
         help="Memory for one chunk in flight; sets the chunk length of a new store.")
@click.option("--allow-pickle", is_flag=True, help="Load torch pickles that hold Python objects beyond tensors (only for files you trust).")
@setting(IngestConfig, "workers", "--workers", type=POSITIVE, help="Threads copying chunks.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@quiet_option
def ingest(ckpt_dir, store, memory_budget_mb, allow_pickle, workers, as_json, quiet) -> None:
    """Add the new checkpoints of CKPT_DIR to the run's Zarr store.

    Later commands given CKPT_DIR (fit, backtest, emit, run, serve) use this store.
    """
    from farcast.pipelines.ingest import ingest as run_ingest, steps_text

    bars = Bars(quiet)
    cfg = IngestConfig(memory_budget_mb=memory_budget_mb, allow_pickle=allow_pickle, workers=workers)
    r = run_ingest(ckpt_dir, store, cfg, on_step=lambda step, done, total: bars("ingest", done, total))
    if as_json:
        click.echo(json.dumps(r.__dict__))
        return
    for path, why in r.skipped:
        click.echo(f"skipped {path}: {why}")
    for w in r.warnings:
        click.echo(f"warning: {w}")
    for step, names in r.nonfinite.items():
        click.echo(f"warning: step {step} has NaN/Inf in {len(names)} tensor(s), e.g. '{names[0]}' (recorded; forecasting excludes them)")
    if r.added:
        click.echo(f"added {len(r.added)} step(s) {steps_text(r.added)} x {r.tensors} tensors, "
                   f"{r.bytes_written / 2**20:.1f} MiB -> {r.store}")
    else:
        click.echo(f"nothing new: the store already holds steps {steps_text(r.present)}")
    if r.present and r.added:
        click.echo(f"already present: {len(r.present)} step(s)")


def _target_options(f):
    f = click.option("--ratio", type=FiniteFloat(min=1, min_open=True), help="Target as a ratio R on the time axis: t_0 + R (t_n - t_0) (in steps on the steps axis).")(f)
    f = click.option("--target-step", type=click.IntRange(min=1, max=MAX_STEP), help="Target global step S (after the newest checkpoint).")(f)
    return f


def _fit_options(f):
    f = setting(FitConfig, "seed", "--seed", help="Seed of the per-chunk parameter sample.")(f)
    f = setting(FitConfig, "sample", "--sample", type=POSITIVE, help="Parameters sampled per chunk to fit it.")(f)
    f = setting(FitConfig, "max_cuts", "--cuts", "cuts", type=POSITIVE, help="Calibration cuts (earlier points of the run used as examples).")(f)
    f = setting(FitConfig, "extra_features", "--features", "features", text=lambda v: ",".join(f"{x:g}" for x in v) or "none",
                callback=_parse_features,
                help="Extra feature times besides w(s_0), w(s_c), as fractions of the way to the cut; 'none' for the paper's two features.")(f)
    f = setting(FitConfig, "lam", "--lam", type=FiniteFloat(min=0), help="Weight of the deceleration regulariser.")(f)
    f = setting(FitConfig, "shrink", "--shrink", text=str, callback=_parse_shrink, metavar="auto|ALPHA",
                help="Pull the forecast towards the newest weights: w_n + alpha (forecast - w_n). auto chooses alpha "
                     "from a backtest on the run's own history; 1: the forecaster as fitted.")(f)
    f = click.option("--schedule-option", "schedule_options", multiple=True, metavar="KEY=VALUE",
                     help="Extra parameter of the stated schedule, e.g. num_cycles=2, power=2, num_decay_steps=100 (repeatable).")(f)
    f = click.option("--total-steps", type=POSITIVE, help="The stated schedule's total training steps (the Trainer's max_steps).")(f)
    f = click.option("--warmup-steps", type=click.IntRange(min=0), default=0, show_default=True, help="The stated schedule's warm-up steps.")(f)
    f = click.option("--peak-lr", type=FiniteFloat(min=0, min_open=True), help="The stated schedule's peak learning rate (only its shape matters).")(f)
    f = click.option("--schedule", "schedule_name", metavar="NAME",
                     help="State the learning-rate schedule (a transformers name: linear, cosine, constant, "
                          "constant_with_warmup, polynomial, inverse_sqrt, cosine_with_restarts, warmup_stable_decay) "
                          "instead of reading it from the checkpoints.")(f)
    f = setting(FitConfig, "axis", "--axis", type=click.Choice(AXES),
                help="Time axis: steps, or lr (cumulative learning rate); auto takes lr whenever the schedule is known.")(f)
    return f


def _fit_config(lam, features, cuts, sample, seed, axis="auto", schedule_name=None, peak_lr=None, warmup_steps=0,
                total_steps=None, schedule_options=(), shrink="auto"):
    from farcast_core.errors import ForecastError
    from farcast_core.timeaxis import stated_schedule

    extra = features  # parsed and checked by _parse_features
    schedule = None
    if schedule_name:
        opts = {}
        for kv in schedule_options:
            key, eq, value = kv.partition("=")
            if not eq:
                raise ForecastError(f"--schedule-option wants KEY=VALUE, got {kv!r}")
            try:
                opts[key.strip()] = json.loads(value)
            except ValueError:
                opts[key.strip()] = value
        schedule = {"name": schedule_name, "peak_lr": peak_lr, "warmup": warmup_steps, "total": total_steps,
                    "options": opts}
        stated_schedule(schedule)  # refuse an unusable schedule before any work
    elif peak_lr is not None or total_steps is not None or schedule_options:
        raise ForecastError("--peak-lr, --total-steps and --schedule-option describe a stated schedule: add --schedule NAME")
    return FitConfig(lam=lam, extra_features=extra, max_cuts=cuts, sample=sample, seed=seed, axis=axis, schedule=schedule,
                     shrink=shrink)


def _as_store(path: str, store: str | None, bars: Bars, allow_pickle: bool = False, echo: bool = True) -> str:
    """The store for PATH: PATH itself if it is a store, else the run directory PATH ingested (new steps
    only) into --store, or the store an earlier ingest of PATH used, or its default store."""
    from pathlib import Path

    from farcast.pipelines.ingest import ingest as run_ingest, store_for

    if _is_store(path):
        if store:
            raise FarcastError(f"{path} is a store; --store goes with a checkpoint directory")
        return path
    if not Path(path).is_dir():
        raise FarcastError(f"{path}: no such directory; give the checkpoint directory your trainer saves into, "
                           "or a store made by 'farcast ingest'")
    store = store or store_for(path)
    r = run_ingest(path, store, IngestConfig(allow_pickle=allow_pickle),
                   on_step=lambda step, done, total: bars("ingest", done, total))
    if echo:
        click.echo(f"store {store}: {len(r.added)} new step(s), {len(r.present)} already there", err=True)
    return store


def _is_store(path: str) -> bool:
    from pathlib import Path

    return "://" in path or (Path(path) / "zarr.json").is_file()


def _source_options(f):
    f = click.option("--allow-pickle", is_flag=True, help="Load torch pickles that hold Python objects beyond tensors (only for files you trust).")(f)
    f = click.option("--store", help="With a checkpoint directory: the store to ingest it into (default: the store "
                                     "an earlier 'farcast ingest' used for it, else one under ~/.cache/farcast).")(f)
    return f


@main.command()
@click.argument("ckpt_dir_or_store")
@_target_options
@click.option("--out", type=click.Path(file_okay=False), help="Directory to save the forecasters in, as target_<step>.safetensors "
              "(default: beside the store; outside the run's directory).")
@click.option("--force", is_flag=True, help="Replace an existing forecaster file in --out.")
@_source_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@quiet_option
@_fit_options
def fit(ckpt_dir_or_store, target_step, ratio, out, force, store, allow_pickle, as_json, quiet, **fit_opts) -> None:
    """Fit the forecasters of a run (a checkpoint dir or a store) for a target and save them."""
    from farcast_core.timeaxis import TimeAxis
    from farcast.pipelines.fit import fit as run_fit

    bars = Bars(quiet or as_json)
    store = _as_store(ckpt_dir_or_store, store, bars, allow_pickle, echo=not as_json)
    fc, path, target = run_fit(store, target_step, ratio, _fit_config(**fit_opts), out, bars.stage("fit"), force)
    axis = TimeAxis.from_json(fc.axis)
    if as_json:
        click.echo(json.dumps({"forecasters": str(path), "store": store, "target_step": target, "ratio": fc.rho,
                               "axis": fc.axis, "steps": fc.steps, "chunks": len(fc.keys), "excluded": fc.excluded,
                               "shrink": fc.shrink}))
        return
    click.echo(axis.describe())
    click.echo(f"fitted {len(fc.keys)} chunk forecasters for step {target} (ratio {fc.rho:.4g}) on steps "
               f"{fc.steps[0]}..{fc.steps[-1]} -> {path}")
    if fc.shrink:
        click.echo(f"shrinkage towards step {fc.steps[-1]}: alpha {fc.shrink['alpha']:.3g} ({fc.shrink['chosen']})")
    if fc.excluded:
        click.echo(f"warning: not forecast (NaN/Inf seen): {', '.join(fc.excluded)}")


@main.command()
@click.argument("ckpt_dir_or_store")
@_target_options
@_source_options
@click.option("--forecaster", type=click.Path(exists=True, dir_okay=False), help="Evaluate a saved forecaster (transfer from another run) instead of fitting.")
@click.option("--per-tensor", is_flag=True, help="Also print the MAE of every tensor.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@quiet_option
@_fit_options
def backtest(ckpt_dir_or_store, target_step, ratio, store, allow_pickle, forecaster, per_tensor, as_json, quiet,
             **fit_opts) -> None:
    """Backtest the farcaster against the baselines on a run (a checkpoint dir or a store)."""
    from farcast.pipelines.backtest import backtest as run_backtest, format_table
    from farcast.storage.artifacts import load_forecasters

    bars = Bars(quiet or as_json)
    store = _as_store(ckpt_dir_or_store, store, bars, allow_pickle, echo=not as_json)
    fc = load_forecasters(forecaster)[0] if forecaster else None
    report = run_backtest(store, target_step, ratio, _fit_config(**fit_opts), fc, progress=bars)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(format_table(report))
    if per_tensor:
        for name, row in report["per_tensor"].items():
            click.echo(f"  {name:<40} farcast {row['farcast']:.3e}  persistence {row['persistence']:.3e}")


def _emit_options(f):
    f = click.option("--allow-worse", is_flag=True, help="Emit even when the backtest says the forecast is worse than persistence.")(f)
    f = setting(EmitConfig, "nonfinite", "--nonfinite", type=click.Choice(NONFINITE_POLICIES),
                help="A tensor left unforecast (NaN/Inf in its history) that is NaN/Inf at the newest step: refuse, "
                          "or copy it from the newest step where it is finite.")(f)
    f = click.option("--force", is_flag=True, help="Replace an existing output.")(f)
    f = setting(EmitConfig, "optimizer", "--optimizer", type=click.Choice(OPTIMIZER_POLICIES),
                help="keep: copy the newest optimizer state; reset: same parameter groups, fresh state.")(f)
    f = click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory to write the forecast checkpoint into (outside the run's directory).")(f)
    return f


def _print_emitted(result, as_json: bool) -> None:
    from farcast.pipelines.backtest import format_table

    if as_json:
        click.echo(json.dumps({"emitted": str(result.path), "target_step": result.target_step,
                               "files": result.files, "backtest": result.backtest}))
        return
    click.echo(format_table(result.backtest))
    click.echo(f"emitted the forecast for step {result.target_step}: {result.path}")


@main.command()
@click.argument("ckpt_dir_or_store")
@_target_options
@_emit_options
@_source_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@quiet_option
@_fit_options
@click.option("--forecaster", type=click.Path(exists=True, dir_okay=False), help="Use forecasters saved by 'farcast fit' instead of fitting.")
def emit(ckpt_dir_or_store, target_step, ratio, out, optimizer, force, allow_worse, nonfinite, store, allow_pickle,
         as_json, quiet, forecaster, **fit_opts) -> None:
    """Write the forecast checkpoint of a run (a checkpoint dir or a store) at the target step, in the run's own layout."""
    from pathlib import Path

    from farcast.pipelines.emit import check_request, emit as run_emit
    from farcast.storage.artifacts import load_forecasters

    cfg = EmitConfig(optimizer=optimizer, force=force, allow_worse=allow_worse, allow_pickle=allow_pickle,
                     nonfinite=nonfinite)
    fc = load_forecasters(forecaster)[0] if forecaster else None
    fit_cfg = fc.config if fc else _fit_config(**fit_opts)
    bars = Bars(quiet or as_json)
    if not _is_store(ckpt_dir_or_store) and Path(ckpt_dir_or_store).is_dir():
        check_request(ckpt_dir_or_store, out, target_step, ratio)  # before any ingest or fit
    store = _as_store(ckpt_dir_or_store, store, bars, allow_pickle, echo=not as_json)
    result = run_emit(store, out, target_step, ratio, fit_cfg, cfg, forecasters=fc, progress=bars)
    _print_emitted(result, as_json)


def _emit_request(ckpt_dir: str, out: str, target_step, ratio, **emit_opts) -> dict:
    """The emit settings as the flow takes them, refused before any work if bad (with the request's
    target and --out, checked against CKPT_DIR before it is ingested)."""
    from farcast.pipelines.emit import check_request

    EmitConfig(**emit_opts)
    check_request(ckpt_dir, out, target_step, ratio)
    return emit_opts


def _verbose(verbose: bool) -> None:
    import os

    if verbose:
        os.environ["FARCAST_VERBOSE"] = "1"  # read where the Dask runner is made (flows.flows.quiet_dask)


def _flow_options(f):
    """What `run` and `serve` share: where the store is, how the flow runs, what it emits."""
    f = _fit_options(f)
    f = click.option("--allow-pickle", is_flag=True, help="Load torch pickles that hold Python objects beyond tensors.")(f)
    f = click.option("--verbose", "-v", is_flag=True, help="Also show the Dask cluster's INFO logs (--runner dask).")(f)
    f = click.option("--dask-processes", is_flag=True, help="With --runner dask and no --dask-address: the LocalCluster's "
                     "workers are processes (each imports torch and Prefect: seconds per run) instead of threads.")(f)
    f = click.option("--workers", default=2, show_default=True, type=POSITIVE, help="Threads, processes or LocalCluster workers.")(f)
    f = click.option("--dask-address", help="Scheduler address of an existing Dask cluster (with --runner dask); default: a LocalCluster.")(f)
    f = click.option("--runner", type=click.Choice(["threads", "processes", "dask"]), default="threads", show_default=True, help="Prefect task runner.")(f)
    f = click.option("--store", help="The run's Zarr store, any fsspec URL the workers reach (default: the store an "
                                     "earlier 'farcast ingest' used for CKPT_DIR, else one under ~/.cache/farcast).")(f)
    f = _emit_options(f)
    f = _target_options(f)
    return f


@main.command()
@click.argument("ckpt_dir", type=click.Path(file_okay=False))
@_flow_options
@click.option("--direct", is_flag=True, help="Call the pipeline functions without Prefect (no server, no artifacts).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@quiet_option
def run(ckpt_dir, target_step, ratio, out, optimizer, force, allow_worse, nonfinite, store, runner, dask_address, workers,
        dask_processes, verbose, direct, allow_pickle, as_json, quiet, **fit_opts) -> None:
    """The whole job: ingest CKPT_DIR, fit, backtest, emit the forecast checkpoint into OUT (a Prefect flow)."""
    _verbose(verbose)
    from farcast.pipelines.ingest import store_for

    store = store or store_for(ckpt_dir)
    fit_cfg = _fit_config(**fit_opts)
    emit_cfg = _emit_request(ckpt_dir, out, target_step, ratio, optimizer=optimizer, force=force,
                             allow_worse=allow_worse, allow_pickle=allow_pickle, nonfinite=nonfinite)
    if direct:
        from farcast.pipelines.emit import emit as run_emit

        bars = Bars(quiet or as_json)
        store = _as_store(ckpt_dir, store, bars, allow_pickle, echo=not as_json)
        result = run_emit(store, out, target_step, ratio, fit_cfg, EmitConfig(**emit_cfg), progress=bars)
        _print_emitted(result, as_json)
        return
    from farcast.flows.flows import farcast_flow, with_runner

    _quiet_user_errors()
    f = with_runner(farcast_flow, runner, dask_address, workers, dask_processes)
    r = _quiet_flow(f, as_json)(ckpt_dir, out, target_step, ratio, store, fit_cfg.to_json(), emit_cfg, allow_pickle)
    if as_json:
        click.echo(json.dumps({k: r[k] for k in ("emitted", "target_step", "files", "backtest", "store")}))
        return
    from farcast.pipelines.backtest import format_table

    click.echo(format_table(r["backtest"]))
    click.echo(f"emitted the forecast for step {r['target_step']}: {r['emitted']}")


@main.command()
@click.argument("ckpt_dir", type=click.Path(file_okay=False))
@_flow_options
@click.option("--interval", type=FiniteFloat(min=0, min_open=True), help="Seconds between scheduled runs.")
@click.option("--cron", help="Cron expression for scheduled runs, e.g. '*/30 * * * *'.")
@click.option("--name", help="Deployment name (default: farcast-<run dir name>).")
def serve(ckpt_dir, target_step, ratio, out, optimizer, force, allow_worse, nonfinite, store, runner, dask_address, workers,
          dask_processes, verbose, allow_pickle, interval, cron, name, **fit_opts) -> None:
    """Serve a scheduled deployment that re-forecasts CKPT_DIR whenever the trainer saved more.

    One run at a time: a scheduled run that finds the previous one still going is cancelled
    (Prefect's deployment concurrency limit 1, strategy CANCEL_NEW) and the next one catches up.
    """
    from farcast_core.errors import ForecastError

    _verbose(verbose)
    if (interval is None) == (cron is None):
        raise ForecastError("give exactly one of --interval or --cron")
    if (target_step is None) == (ratio is None):
        raise ForecastError("give exactly one of --target-step or --ratio")
    import os

    if not os.environ.get("PREFECT_API_URL"):
        # Prefect's temporary server runs no scheduler: served schedules would never fire
        raise ForecastError(
            "farcast serve needs a Prefect server for its schedule: run 'prefect server start' elsewhere, then "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api and rerun"
        )
    fit_cfg = _fit_config(**fit_opts)
    emit_cfg = _emit_request(ckpt_dir, out, target_step, ratio, optimizer=optimizer, force=force,
                             allow_worse=allow_worse, allow_pickle=allow_pickle, nonfinite=nonfinite)
    from prefect import serve as prefect_serve

    from farcast.flows.flows import make_deployment

    d = make_deployment(ckpt_dir, out, ratio, target_step, interval, cron, store, fit_cfg.to_json(), name,
                        emit_config=emit_cfg, runner=runner, dask_address=dask_address, workers=workers,
                        dask_processes=dask_processes)
    click.echo(f"serving deployment '{d.name}' ({'every ' + str(interval) + ' s' if interval else 'cron ' + cron}); Ctrl-C stops", err=True)
    prefect_serve(d)


def _user_error(exc) -> bool:
    while exc is not None:
        if isinstance(exc, FarcastError):
            return True
        exc = exc.__cause__
    return False


def _error_names(cls=FarcastError) -> set[str]:
    return {cls.__name__}.union(*(_error_names(c) for c in cls.__subclasses__()))


class _UserErrorFilter:
    """Keeps Prefect's console quiet about farcast's own refusals: the command prints them once, as one line.

    The Prefect API (the UI) still receives the full record.
    """

    names = tuple(_error_names())

    def filter(self, record) -> bool:
        if record.exc_info and _user_error(record.exc_info[1]):
            return False
        msg = record.getMessage()
        return not ("Failed" in msg and any(n in msg for n in self.names))


def _quiet_user_errors() -> None:
    import logging

    f = _UserErrorFilter()
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict if n.startswith("prefect"))]
    for logger in loggers:
        for h in getattr(logger, "handlers", []):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and f not in h.filters:
                h.addFilter(f)


def _quiet_flow(f, quiet: bool):
    """Run a flow; with --json, keep Prefect's logs off stdout so the output stays one JSON object."""
    if not quiet:
        return f

    def call(*args):
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):
            return f(*args)

    return call


@main.command()
@click.argument("out", default="farcast-demo", type=click.Path(file_okay=False))
@click.option("--steps", default=400, show_default=True, help="Optimizer steps of the plain training run.")
@click.option("--every", default=20, show_default=True, help="A checkpoint every this many steps.")
@click.option("--ratio", default=2.0, show_default=True, help="Forecast ratio: farcast sees steps/ratio steps.")
def demo(out, steps, every, ratio) -> None:
    """Train a small model with the HF Trainer, forecast it with the flow, resume from the forecast, plot."""
    from farcast.flows.demo import run_demo

    run_demo(out, steps, every, ratio, echo=lambda m: click.echo(m))


if __name__ == "__main__":
    main()
