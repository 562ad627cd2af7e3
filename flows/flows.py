"""Prefect flows: the pipeline stages as tasks, composed. No logic lives here.

Tasks take references (store URL, chunk keys, config dicts) and return small dicts; retries
only on tasks that touch disk. With no PREFECT_API_URL, Prefect starts a temporary local server
for the first flow run in a process; with one set, runs go to that server.
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines: no telemetry errors
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # 20 s default is too short on 2 cores

import torch  # noqa: E402
from prefect import flow, get_run_logger, task, unmapped  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from farcast_core.baselines import METHODS  # noqa: E402
from farcast_core.errors import FarcastError  # noqa: E402
from farcast_core.forecaster import FitConfig, default_device  # noqa: E402
from farcast_core.timeaxis import TimeAxis  # noqa: E402
from pipelines import backtest as backtest_mod  # noqa: E402
from pipelines import emit as emit_mod  # noqa: E402
from pipelines import fit as fit_mod  # noqa: E402
from pipelines import ingest as ingest_mod  # noqa: E402
from storage.artifacts import default_forecaster_path  # noqa: E402
from storage.store import RunStore  # noqa: E402

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
        pct = 100.0 * done / total
        if progress is None:
            progress = create_progress_artifact(pct, key="farcast-ingest", description="Ingesting checkpoints")
        else:
            update_progress_artifact(progress, pct)

    r = ingest_mod.ingest(ckpt_dir, store, ingest_mod.IngestConfig(allow_pickle=allow_pickle), on_step=on_step)
    return {"added": r.added, "present": r.present, "skipped": r.skipped, "warnings": r.warnings,
            "nonfinite": {str(k): v for k, v in r.nonfinite.items()}, "bytes": r.bytes_written}


@task(name="backtest", **DISK_RETRIES)
def backtest_task(store: str, target_step: int | None, ratio: float | None, fit_config: dict) -> dict:
    return backtest_mod.backtest(store, target_step, ratio, FitConfig.from_json(fit_config))


@task(name="plan-fit")
def plan_fit_task(store: str, target_step: int | None, ratio: float | None, fit_config: dict) -> dict:
    s = RunStore.open(store)
    cfg = FitConfig.from_json(fit_config)
    axis = fit_mod.time_axis(s, cfg)
    get_run_logger().info(axis.describe())
    rho, target = fit_mod.resolve_target(s.steps, target_step, ratio, axis)
    plan = fit_mod.plan_fit(s, len(s.steps), rho, cfg, axis)
    return {"rho": rho, "target_step": target, "n_rows": len(s.steps), "batches": plan.batches, "axis": axis.to_json()}


@task(name="reduce-chunks", **DISK_RETRIES)
def reduce_chunks_task(store: str, n_rows: int, rho: float, fit_config: dict, axis: dict, keys: list):
    """Read one batch of chunks' sampled rows and reduce them to the moments the refinement needs."""
    s = RunStore.open(store)
    cfg = FitConfig.from_json(fit_config)
    plan = fit_mod.plan_fit(s, n_rows, rho, cfg, TimeAxis.from_json(axis))
    device = default_device()
    return fit_mod.reduce_keys(s, plan, [tuple(k) for k in keys], cfg, device).to(torch.device("cpu"), torch.float64)


@task(name="solve-and-save", **DISK_RETRIES)
def save_forecasters_task(store: str, n_rows: int, rho: float, target: int, fit_config: dict, axis: dict,
                          parts: list) -> str:
    """Refine every chunk at once (the moments are small) and save the forecasters."""
    s = RunStore.open(store)
    cfg = FitConfig.from_json(fit_config)
    plan = fit_mod.plan_fit(s, n_rows, rho, cfg, TimeAxis.from_json(axis))
    fc = fit_mod.finish(plan, cfg, parts)
    return str(fit_mod.save(s, fc, default_forecaster_path(store, target), target))


@task(name="emit", **DISK_RETRIES)
def emit_task(store: str, out: str, target_step: int, fit_config: dict, emit_config: dict, report: dict, forecasters: str) -> dict:
    from storage.artifacts import load_forecasters

    fc, _ = load_forecasters(forecasters)
    r = emit_mod.emit(store, out, target_step=target_step, fit_config=FitConfig.from_json(fit_config),
                      config=emit_mod.EmitConfig(**emit_config), report=report, forecasters=fc)
    return {"emitted": str(r.path), "target_step": r.target_step, "files": r.files}


# ------------------------------------------------------------------ flows


# Stage bodies: plain functions that call tasks, so they run on whichever flow's task runner.


def _fit(store: str, target_step: int | None, ratio: float | None, cfg: dict) -> dict:
    plan = plan_fit_task(store, target_step, ratio, cfg)
    progress = create_progress_artifact(0.0, key="farcast-fit", description="Fitting chunk forecasters")
    futures = reduce_chunks_task.map(unmapped(store), unmapped(plan["n_rows"]), unmapped(plan["rho"]), unmapped(cfg),
                                  unmapped(plan["axis"]), plan["batches"])
    parts = []
    for n, fut in enumerate(futures):
        parts.append(fut.result())
        update_progress_artifact(progress, 100.0 * (n + 1) / len(futures))
    path = save_forecasters_task(store, plan["n_rows"], plan["rho"], plan["target_step"], cfg, plan["axis"], parts)
    return {"forecasters": path, "target_step": plan["target_step"], "rho": plan["rho"], "batches": len(parts)}


def _backtest(store: str, target_step: int | None, ratio: float | None, cfg: dict) -> dict:
    report = backtest_task(store, target_step, ratio, cfg)
    rows = []
    for axis, r in report["axes"].items():
        if "error" in r:
            continue
        p = r["methods"]["persistence"]["mae"]
        rows += [{"axis": axis, "method": m, "mae": r["methods"][m]["mae"],
                  "vs_persistence": r["methods"][m]["mae"] / p if p else None} for m in METHODS]
    create_table_artifact(
        key="farcast-backtest", table=rows,
        description=f"Backtest: fitted up to step {report['backtest_from']}, forecast step {report['backtest_target']:.6g}; "
                    f"forecast on the {report['axis']['name']} axis",
    )
    return report


@task(name="check-output")
def check_output_task(store: str, out: str, target_step: int | None, ratio: float | None, cfg: dict,
                      emit_cfg: dict) -> int:
    """Before any fit: the target resolves, --out is usable, the newest checkpoint is the one ingested."""
    return emit_mod.check_before_fit(store, out, target_step, ratio, FitConfig.from_json(cfg),
                                     emit_mod.EmitConfig(**emit_cfg))


def _emit(store: str, out: str, target_step: int | None, ratio: float | None, cfg: dict, emit_cfg: dict) -> dict:
    check_output_task(store, out, target_step, ratio, cfg, emit_cfg)
    fitted = _fit(store, target_step, ratio, cfg)
    report = _backtest(store, fitted["target_step"], None, cfg)
    result = emit_task(store, out, fitted["target_step"], cfg, emit_cfg, report, fitted["forecasters"])
    create_markdown_artifact(
        key="farcast-emitted",
        markdown=f"# Forecast checkpoint\n\nStep **{result['target_step']}** written to `{result['emitted']}`\n\n"
                 f"farcast / persistence in the backtest: **{report['farcast_vs_persistence']:.3f}**\n",
        description="Where the forecast checkpoint was written",
    )
    return {**result, "backtest": report}


@flow(name="farcast-ingest")
def ingest_flow(ckpt_dir: str, store: str, allow_pickle: bool = False) -> dict:
    return ingest_task(ckpt_dir, store, allow_pickle)


@flow(name="farcast-backtest")
def backtest_flow(store: str, target_step: int | None = None, ratio: float | None = None, fit_config: dict | None = None) -> dict:
    return _backtest(store, target_step, ratio, fit_config or FitConfig().to_json())


@flow(name="farcast-fit")
def fit_flow(store: str, target_step: int | None = None, ratio: float | None = None, fit_config: dict | None = None) -> dict:
    return _fit(store, target_step, ratio, fit_config or FitConfig().to_json())


@flow(name="farcast-emit")
def emit_flow(store: str, out: str, target_step: int | None = None, ratio: float | None = None,
              fit_config: dict | None = None, emit_config: dict | None = None) -> dict:
    return _emit(store, out, target_step, ratio, fit_config or FitConfig().to_json(), emit_config or {})


@flow(name="farcast")
def farcast_flow(ckpt_dir: str, out: str, target_step: int | None = None, ratio: float | None = None,
                 store: str | None = None, fit_config: dict | None = None, emit_config: dict | None = None,
                 allow_pickle: bool = False, only_if_new: bool = False) -> dict:
    """The whole job: ingest -> fit -> backtest -> emit.

    With ``only_if_new`` (scheduled runs) a run that finds no new checkpoint does nothing.
    """
    store = store or str(ingest_mod.default_store(ckpt_dir))
    emit_cfg = {"allow_pickle": allow_pickle, **(emit_config or {})}
    fit_config = fit_config or FitConfig().to_json()
    FitConfig.from_json(fit_config), emit_mod.EmitConfig(**emit_cfg)  # refuse bad settings before any work
    emit_mod.check_request(ckpt_dir, out, target_step, ratio)
    ingested = ingest_task(ckpt_dir, store, allow_pickle)
    if only_if_new and not ingested["added"]:
        get_run_logger().info("no new checkpoint in %s since step %s: nothing to do", ckpt_dir, max(ingested["present"]))
        return {"status": "nothing new", "steps": ingested["present"], "store": store}
    if only_if_new:
        emit_cfg["force"] = True  # a scheduled run refreshes its forecast
    return {"status": "emitted", "store": store, "ingest": ingested,
            **_emit(store, out, target_step, ratio, fit_config, emit_cfg)}


def make_deployment(ckpt_dir: str, out: str, ratio: float | None = None, target_step: int | None = None,
                    interval: float | None = None, cron: str | None = None, store: str | None = None,
                    fit_config: dict | None = None, name: str | None = None):
    """A deployment of the end-to-end flow on a schedule; its runs only act on new checkpoints."""
    from pathlib import Path

    params = {"ckpt_dir": str(Path(ckpt_dir).resolve()), "out": str(Path(out).resolve()), "ratio": ratio,
              "target_step": target_step, "store": store or str(ingest_mod.default_store(ckpt_dir)),
              "fit_config": fit_config or FitConfig().to_json(), "only_if_new": True}
    return farcast_flow.to_deployment(
        name=name or f"farcast-{Path(ckpt_dir).resolve().name}", interval=interval, cron=cron, parameters=params,
        description=f"Keep a forecast of {params['ckpt_dir']} fresh in {params['out']}",
    )


def task_runner(kind: str = "threads", address: str | None = None, workers: int = 2):
    """threads (default), processes, or dask (a LocalCluster, or the cluster at ``address``)."""
    if kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers)
    if kind == "dask":
        from prefect_dask import DaskTaskRunner

        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "dashboard_address": None})
    raise ValueError(f"unknown task runner {kind!r}: threads, processes or dask")


def with_runner(f, kind: str = "threads", address: str | None = None, workers: int = 2):
    """The flow ``f`` (and the flows it calls) on the chosen task runner."""
    return f.with_options(task_runner=task_runner(kind, address, workers))
