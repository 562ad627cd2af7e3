"""Prefect flows: the pipeline stages as tasks, composed. No logic lives here.

Tasks take references (store URL, chunk keys, config dicts) and return small dicts; retries
only on tasks that touch disk. With no PREFECT_API_URL, Prefect starts a temporary local server
for the first flow run in a process; with one set, runs go to that server.
"""

from __future__ import annotations

import contextvars
import os
import re

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines: no telemetry errors
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # 20 s default is too short on 2 cores

from prefect import flow, get_run_logger, task, unmapped  # noqa: E402
from prefect.states import Completed  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from farcast_core.baselines import METHODS  # noqa: E402
from farcast_core.errors import FarcastError  # noqa: E402
from farcast_core.forecaster import FitConfig, default_device  # noqa: E402
from farcast.pipelines import backtest as backtest_mod  # noqa: E402
from farcast.pipelines import emit as emit_mod  # noqa: E402
from farcast.pipelines import fit as fit_mod  # noqa: E402
from farcast.pipelines import ingest as ingest_mod  # noqa: E402
from farcast.storage.artifacts import default_forecaster_path, load_forecasters  # noqa: E402
from farcast.storage.runs import run_key  # noqa: E402
from farcast.storage.store import RunStore  # noqa: E402


def artifact_key(kind: str, ckpt_dir: str | None) -> str:
    """A Prefect artifact key per run directory (keys allow a-z, 0-9 and '-'): its history is that run's.
    From the run's key (``storage.runs.run_key``: its name and a hash of its path), name shortened."""
    if not ckpt_dir:
        return f"farcast-{kind}"
    name, _, digest = run_key(ckpt_dir).rpartition("-")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "run"
    return f"farcast-{kind}-{slug}-{digest}"


class _ArtifactProgress:
    """A Prefect progress artifact that follows ``(done, total)`` calls, updated at most every 2%."""

    def __init__(self, key: str, description: str):
        self.id = create_progress_artifact(0.0, key=key, description=description)
        self.shown = 0.0

    def __call__(self, done: int, total: int) -> None:
        pct = 100.0 * done / max(total, 1)
        if pct - self.shown >= 2.0 or done >= total:
            update_progress_artifact(self.id, pct)
            self.shown = pct


def _worth_retrying(task, task_run, state) -> bool:
    """Retry I/O errors only: farcast's own refusals (bad input, a locked store) fail the same way again."""
    try:
        state.result()
    except FarcastError:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


DISK_RETRIES = dict(retries=2, retry_delay_seconds=2, retry_condition_fn=_worth_retrying)


# ------------------------------------------------------------------ tasks (thin wrappers)


@task(name="ingest", **DISK_RETRIES)
def ingest_task(ckpt_dir: str, store: str, allow_pickle: bool = False) -> dict:
    progress = None

    def on_step(step, done, total):
        nonlocal progress
        if progress is None:
            progress = _ArtifactProgress(artifact_key("progress-ingest", ckpt_dir), f"Ingesting checkpoints of {ckpt_dir}")
        progress(done, total)

    r = ingest_mod.ingest(ckpt_dir, store, ingest_mod.IngestConfig(allow_pickle=allow_pickle), on_step=on_step)
    log = get_run_logger()
    if r.added:
        log.info("ingested %d new step(s) %s of %s into %s (%d already there)", len(r.added), ingest_mod.steps_text(r.added),
                 ckpt_dir, store, len(r.present))
    else:
        log.info("no new checkpoint in %s: the store already holds steps %s", ckpt_dir, ingest_mod.steps_text(r.present))
    for w in r.warnings:
        log.warning(w)
    return {"added": r.added, "present": r.present, "skipped": r.skipped, "warnings": r.warnings,
            "nonfinite": {str(k): v for k, v in r.nonfinite.items()}, "bytes": r.bytes_written}


@task(name="backtest", **DISK_RETRIES)
def backtest_task(store: str, target_step: int | None, ratio: float | None, fit_config: dict,
                  ckpt_dir: str | None = None) -> dict:
    bars: dict = {}

    def progress(stage, done, total):
        if stage not in bars:
            bars[stage] = _ArtifactProgress(artifact_key("progress-" + stage.replace(" ", "-").split("(")[0].strip("-"), ckpt_dir),
                                            f"{stage.capitalize()}: {ckpt_dir or store}")
        bars[stage](done, total)

    return backtest_mod.backtest(store, target_step, ratio, FitConfig.from_json(fit_config), progress=progress)


@task(name="plan-fit")
def plan_fit_task(store: str, target_step: int, fit_config: dict) -> fit_mod.FitPlan:
    """The fit's plan (pairs, chunk batches), made once and passed to the tasks that reduce and solve."""
    s = RunStore.open(store)
    cfg = FitConfig.from_json(fit_config)
    axis = fit_mod.time_axis(s, cfg)
    get_run_logger().info(axis.describe())
    rho, _ = fit_mod.resolve_target(s.steps, target_step, None, axis)
    return fit_mod.plan_fit(s, len(s.steps), rho, cfg, axis)


@task(name="reduce-chunks", **DISK_RETRIES)
def reduce_chunks_task(store: str, plan: fit_mod.FitPlan, fit_config: dict, keys: list):
    """Read one batch of chunks' sampled rows and reduce them to the moments the refinement needs."""
    moments = fit_mod.reduce_keys(RunStore.open(store), plan, [tuple(k) for k in keys], FitConfig.from_json(fit_config),
                                  default_device())
    return [m.numpy() for m in moments]


@task(name="solve-and-save", **DISK_RETRIES)
def save_forecasters_task(store: str, plan: fit_mod.FitPlan, target: int, fit_config: dict, parts: list) -> str:
    """Refine every chunk at once (the moments are small) and save the forecasters."""
    s = RunStore.open(store)
    fc = fit_mod.finish(s, plan, FitConfig.from_json(fit_config), parts)
    return str(fit_mod.save(s, fc, default_forecaster_path(store, target), target))


@task(name="emit", **DISK_RETRIES)
def emit_task(store: str, out: str, target_step: int, forecasters: str, report: dict, emit_config: dict,
              ckpt_dir: str | None = None) -> dict:
    fc, _ = load_forecasters(forecasters)
    bar = _ArtifactProgress(artifact_key("progress-write", ckpt_dir), f"Writing the forecast checkpoint into {out}")
    run_ctx = contextvars.copy_context()  # emit computes chunks on its own threads: update from this task's context

    def progress(stage, done, total):  # called under emit's lock, so the context is entered by one thread at a time
        run_ctx.run(bar, done, total)

    r = emit_mod.write_forecast(store, out, target_step, fc, report, emit_mod.EmitConfig(**emit_config), progress)
    get_run_logger().info("emitted the forecast of step %d: %s", r.target_step, r.path)
    return {"emitted": str(r.path), "target_step": r.target_step, "files": r.files}


@task(name="check-output")
def check_output_task(store: str, out: str, target_step: int | None, ratio: float | None, cfg: dict,
                      emit_cfg: dict) -> int:
    """Before any fit: the target resolves, --out is usable, the newest checkpoint is the one ingested."""
    return emit_mod.check_before_fit(store, out, target_step, ratio, FitConfig.from_json(cfg),
                                     emit_mod.EmitConfig(**emit_cfg))


# ------------------------------------------------------------------ flows


# The stages of the farcast flow: plain functions that call tasks (on the flow's task runner) and
# report to Prefect (artifacts, logs); each takes the previous stage's result.


def fit_stage(store: str, target_step: int, cfg: dict, ckpt_dir: str | None = None) -> dict:
    """Plan once, reduce the chunk batches in parallel tasks, solve and save: the forecasters' file."""
    plan = plan_fit_task(store, target_step, cfg)
    progress = _ArtifactProgress(artifact_key("progress-fit", ckpt_dir), f"Fitting chunk forecasters of {ckpt_dir or store}")
    futures = reduce_chunks_task.map(unmapped(store), unmapped(plan), unmapped(cfg), plan.batches)
    parts = []
    for n, fut in enumerate(futures):
        parts.append(fut.result())
        progress(n + 1, len(futures))
    path = save_forecasters_task(store, plan, target_step, cfg, parts)
    return {"forecasters": path, "target_step": target_step, "rho": plan.rho, "batches": len(parts)}


def backtest_stage(store: str, fitted: dict, cfg: dict, ckpt_dir: str | None = None) -> dict:
    """The backtest of the fitted target (its own fit on the run's earlier steps): the verdict emit obeys."""
    report = backtest_task(store, fitted["target_step"], None, cfg, ckpt_dir)
    rows = []
    for axis, r in report["axes"].items():
        if "error" in r:
            continue
        p = r["methods"]["persistence"]["mae"]
        rows += [{"axis": axis, "method": m, "MAE": f"{r['methods'][m]['mae']:.4g}",
                  "vs persistence": f"{r['methods'][m]['mae'] / p:.3f}" if p else "-"} for m in METHODS]
    create_table_artifact(
        key=artifact_key("backtest", ckpt_dir), table=rows,
        description=f"Backtest of {ckpt_dir or store}: fitted up to step {report['backtest_from']}, forecast step "
                    f"{report['backtest_target']:.6g}; forecast on the {report['axis']['name']} axis",
    )
    get_run_logger().info("backtest (fitted to step %s, forecast step %.6g): farcast / persistence %.3f, %s",
                          report["backtest_from"], report["backtest_target"], report["farcast_vs_persistence"],
                          _verdict(report))
    return report


def _verdict(report: dict) -> str:
    f, p = report["methods"]["farcast"]["mae"], report["methods"]["persistence"]["mae"]
    return (f"better than keeping the newest weights (MAE {f:.3g} vs {p:.3g})" if f < p else
            f"worse than keeping the newest weights (MAE {f:.3g} vs {p:.3g}): emit refuses unless allow_worse")


def emit_stage(store: str, out: str, fitted: dict, report: dict, emit_cfg: dict, ckpt_dir: str | None = None) -> dict:
    """The forecasters written as a checkpoint, if the backtest allows."""
    result = emit_task(store, out, fitted["target_step"], fitted["forecasters"], report, emit_cfg, ckpt_dir)
    create_markdown_artifact(
        key=artifact_key("emitted", ckpt_dir),
        markdown=f"# Forecast checkpoint of {ckpt_dir or store}\n\nStep **{result['target_step']}** written to "
                 f"`{result['emitted']}`\n\nfarcast / persistence in the backtest: "
                 f"**{report['farcast_vs_persistence']:.3f}**\n",
        description="Where the forecast checkpoint was written",
    )
    return result


@flow(name="farcast")
def farcast_flow(ckpt_dir: str, out: str, target_step: int | None = None, ratio: float | None = None,
                 store: str | None = None, fit_config: dict | None = None, emit_config: dict | None = None,
                 allow_pickle: bool = False, only_if_new: bool = False) -> dict:
    """The whole job: ingest -> fit -> backtest -> emit.

    With ``only_if_new`` (scheduled runs) a run that finds no new checkpoint does nothing.
    """
    store = store or ingest_mod.store_for(ckpt_dir)
    emit_cfg = {"allow_pickle": allow_pickle, **(emit_config or {})}
    fit_config = fit_config or FitConfig().to_json()
    FitConfig.from_json(fit_config), emit_mod.EmitConfig(**emit_cfg)  # refuse bad settings before any work
    emit_mod.check_request(ckpt_dir, out, target_step, ratio)
    ingested = ingest_task(ckpt_dir, store, allow_pickle)
    if only_if_new and not ingested["added"]:
        why = f"no new checkpoint in {ckpt_dir} since step {max(ingested['present'])}: nothing to do"
        get_run_logger().info(why)
        return Completed(message=why, data={"status": "nothing new", "steps": ingested["present"], "store": store})
    if only_if_new:
        emit_cfg["force"] = True  # a scheduled run refreshes its forecast
    target = check_output_task(store, out, target_step, ratio, fit_config, emit_cfg)  # before any fit
    fitted = fit_stage(store, target, fit_config, ckpt_dir)
    report = backtest_stage(store, fitted, fit_config, ckpt_dir)
    emitted = emit_stage(store, out, fitted, report, emit_cfg, ckpt_dir)
    return {"status": "emitted", "store": store, "ingest": ingested, **emitted, "backtest": report}


def make_deployment(ckpt_dir: str, out: str, ratio: float | None = None, target_step: int | None = None,
                    interval: float | None = None, cron: str | None = None, store: str | None = None,
                    fit_config: dict | None = None, name: str | None = None, emit_config: dict | None = None,
                    runner: str = "threads", dask_address: str | None = None, workers: int = 2,
                    dask_processes: bool = False):
    """A deployment of the end-to-end flow on a schedule; its runs only act on new checkpoints, one at a time
    (a run that finds the previous one in flight is cancelled: deployment concurrency limit 1, CANCEL_NEW)."""
    from pathlib import Path

    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    emit_config = dict(emit_config or {})
    allow_pickle = bool(emit_config.pop("allow_pickle", False))
    params = {"ckpt_dir": str(Path(ckpt_dir).resolve()), "out": str(Path(out).resolve()), "ratio": ratio,
              "target_step": target_step, "store": store or ingest_mod.store_for(ckpt_dir),
              "fit_config": fit_config or FitConfig().to_json(), "emit_config": emit_config,
              "allow_pickle": allow_pickle, "only_if_new": True}
    return with_runner(farcast_flow, runner, dask_address, workers, dask_processes).to_deployment(
        name=name or f"farcast-{Path(ckpt_dir).resolve().name}", interval=interval, cron=cron, parameters=params,
        description=f"Keep a forecast of {params['ckpt_dir']} fresh in {params['out']}",
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
    )


def task_runner(kind: str = "threads", address: str | None = None, workers: int = 2, dask_processes: bool = False):
    """threads (default), processes, or dask (a LocalCluster, of threads unless ``dask_processes``, or
    the cluster at ``address``)."""
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        quiet_dask()
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_class=local_cluster, cluster_kwargs=dask_cluster_kwargs(workers, dask_processes))
    raise ValueError(f"unknown task runner {kind!r}: threads, processes or dask")


def dask_cluster_kwargs(workers: int, processes: bool = False) -> dict:
    """A LocalCluster of ``workers`` workers running one task at a time each, no dashboard (the
    scheduler's HTTP server, which it always starts, listens on a free local port).

    By default the workers are threads of this process: worker processes would each import torch
    and Prefect again (measured ~9 s per flow run on 2 cores, which a fit of seconds never wins
    back on one machine). With ``processes`` they are processes sharing the cores between their
    torch threads (Dask's nannies set OMP_NUM_THREADS=1 otherwise: one core per worker). For
    workers on other machines, start a cluster and pass its address."""
    kw = {"n_workers": workers, "threads_per_worker": 1, "processes": processes,
          "dashboard_address": "127.0.0.1:0", "scheduler_kwargs": {"dashboard": False}}
    if processes:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        kw["env"] = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    return kw


def local_cluster(**kwargs):
    """A distributed.LocalCluster; worker processes talk to this process's Prefect API: the temporary
    server the flow started, when no PREFECT_API_URL is set (else each would start its own, ~10 s)."""
    from distributed import LocalCluster
    from prefect.settings import get_current_settings

    if not kwargs.get("processes", True):
        return LocalCluster(**kwargs)
    prefect_env = {k: v for k, v in get_current_settings().to_environment_variables(exclude_unset=True).items()
                   if k.startswith("PREFECT_API") or k.startswith("PREFECT_SERVER")}
    if not get_current_settings().api.url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the running temporary server (one per process)
        if server.server_process is not None:
            prefect_env["PREFECT_API_URL"] = server.api_url
    return LocalCluster(**{**kwargs, "env": {**prefect_env, **kwargs.get("env", {})}})


def quiet_dask() -> None:
    """Dask's INFO logs (~40 lines a run) only with FARCAST_VERBOSE=1 (what -v sets); warnings always."""
    import logging

    verbose = os.environ.get("FARCAST_VERBOSE") == "1"
    for name in ("distributed", "prefect.task_runner.dask"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def with_runner(f, kind: str = "threads", address: str | None = None, workers: int = 2, dask_processes: bool = False):
    """The flow ``f`` (and the flows it calls) on the chosen task runner."""
    return f.with_options(task_runner=task_runner(kind, address, workers, dask_processes))
