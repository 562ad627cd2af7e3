"""Prefect flows: same bytes as the pipelines, Dask identical to threads, CLI, scheduling, artifacts."""

import asyncio
import json

import pytest
from click.testing import CliRunner

from farcast.flows.cli import main
from farcast.examples import write_digits_run
from farcast.pipelines.emit import EmitConfig, emit
from farcast.pipelines.fit import fit
from farcast.pipelines.ingest import ingest

ANY = {"allow_worse": True}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_digits_run(tmp_path_factory.mktemp("flowrun") / "run", steps=60, every=5, optimizer="adam", lr=1e-3, hidden=96)


def test_flow_writes_the_same_bytes_as_the_pipelines(prefect_harness, run_dir, tmp_path):
    from farcast.flows.flows import farcast_flow

    r = farcast_flow(str(run_dir), str(tmp_path / "flow"), ratio=1.5, store=str(tmp_path / "s1"), emit_config=ANY)
    assert r["status"] == "emitted" and r["target_step"] == 90
    ingest(run_dir, tmp_path / "s2")
    direct = emit(tmp_path / "s2", tmp_path / "direct", ratio=1.5, config=EmitConfig(allow_worse=True))
    assert (tmp_path / "flow" / direct.path.name).read_bytes() == direct.path.read_bytes()
    # the forecasters the flow fitted task by task equal the ones fitted in one call
    from farcast.storage.artifacts import default_forecaster_path, load_forecasters

    _, path, _ = fit(tmp_path / "s2", ratio=1.5)
    a, _ = load_forecasters(default_forecaster_path(str(tmp_path / "s1"), 90))
    b, _ = load_forecasters(path)
    assert a.keys == b.keys and bool((a.A == b.A).all()) and bool((a.b == b.b).all())


@pytest.mark.slow  # ~20 s: a Dask LocalCluster (the object-store test runs one of processes too)
def test_dask_local_cluster_matches_threads(prefect_harness, run_dir, tmp_path):
    from farcast.flows.flows import farcast_flow, with_runner

    cfg = {"lam": 1.0, "batch_chunks": 2, "iters": 40}  # several mapped fit tasks
    from farcast_core.forecaster import FitConfig

    fit_cfg = FitConfig.from_json(cfg).to_json()
    t = with_runner(farcast_flow, "threads")(str(run_dir), str(tmp_path / "t"), ratio=1.5, store=str(tmp_path / "st"),
                                             fit_config=fit_cfg, emit_config=ANY)
    d = with_runner(farcast_flow, "dask", workers=2, dask_processes=True)(str(run_dir), str(tmp_path / "d"), ratio=1.5,
                                                     store=str(tmp_path / "sd"), fit_config=fit_cfg, emit_config=ANY)
    name = "step_000090.safetensors"
    assert (tmp_path / "t" / name).read_bytes() == (tmp_path / "d" / name).read_bytes()
    assert t["backtest"]["methods"] == d["backtest"]["methods"]


def test_run_command_through_the_flow(prefect_harness, run_dir, tmp_path):
    r = CliRunner().invoke(main, ["run", str(run_dir), "--out", str(tmp_path / "o"), "--ratio", "1.5",
                                  "--store", str(tmp_path / "s"), "--allow-worse", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["emitted"].endswith("step_000090.safetensors") and out["target_step"] == 90
    assert set(out["backtest"]["methods"]) == {"farcast", "persistence", "chord", "linear", "linefit"}
    assert "farcast_vs_persistence" in out["backtest"]
    r = CliRunner().invoke(main, ["run", str(run_dir), "--out", str(tmp_path / "o"), "--ratio", "1.5",
                                  "--store", str(tmp_path / "s"), "--allow-worse"])
    assert r.exit_code == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    r = CliRunner().invoke(main, ["run", str(tmp_path / "missing"), "--out", str(tmp_path / "o2"), "--ratio", "2"])
    assert r.exit_code == 2 and "no such directory" in r.stderr


def test_serve_deployment_schedule_and_nothing_new(prefect_harness, run_dir, tmp_path):
    from prefect.client.orchestration import get_client

    from farcast.flows.flows import farcast_flow, make_deployment

    d = make_deployment(str(run_dir), str(tmp_path / "out"), ratio=1.5, interval=600, store=str(tmp_path / "s"))
    dep_id = d.apply()

    async def read():
        async with get_client() as client:
            return await client.read_deployment(dep_id)

    dep = asyncio.run(read())
    assert dep.parameters["only_if_new"] is True and dep.parameters["ratio"] == 1.5
    assert dep.schedules and dep.schedules[0].schedule.interval.total_seconds() == 600

    params = {**dep.parameters, "emit_config": ANY}
    first = farcast_flow(**params)
    assert first["status"] == "emitted"
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    second = farcast_flow(**params, return_state=True)
    assert second.result()["status"] == "nothing new"
    assert second.is_completed() and "no new checkpoint" in second.message  # a no-op run says so in its state
    # scheduled runs never overlap: a run that finds one in flight is cancelled
    assert dep.global_concurrency_limit.limit == 1
    assert dep.concurrency_options.collision_strategy == "CANCEL_NEW"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == written


def test_serve_command_refuses_bad_schedules(tmp_path, monkeypatch):
    r = CliRunner().invoke(main, ["serve", str(tmp_path), "--out", str(tmp_path / "o"), "--ratio", "2"])
    assert r.exit_code == 2 and "exactly one of --interval or --cron" in r.stderr
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    r = CliRunner().invoke(main, ["serve", str(tmp_path), "--out", str(tmp_path / "o"), "--ratio", "2", "--interval", "60"])
    assert r.exit_code == 2 and "prefect server start" in r.stderr


def test_artifacts_are_created(prefect_harness, run_dir, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from farcast.flows.flows import farcast_flow

    state = farcast_flow(str(run_dir), str(tmp_path / "o"), ratio=1.5, store=str(tmp_path / "s"), emit_config=ANY,
                         return_state=True)
    run_id = state.state_details.flow_run_id

    async def read(key):
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))

    from farcast.flows.flows import artifact_key

    key = artifact_key("backtest", str(run_dir))
    assert key.startswith("farcast-backtest-run-") and key != artifact_key("backtest", str(tmp_path / "run"))
    table = asyncio.run(read(key))
    assert table and table[0].type == "table"
    rows = json.loads(table[0].data) if isinstance(table[0].data, str) else table[0].data
    farcast_row = next(r for r in rows if r["method"] == "farcast")
    assert len(farcast_row["vs persistence"]) == 5 and float(farcast_row["vs persistence"]) > 0  # 0.459, not 0.45912...
    md = asyncio.run(read(artifact_key("emitted", str(run_dir))))
    assert md and str(tmp_path / "o") in md[0].data
    for stage in ("ingest", "fit", "backtest-fit", "write"):  # progress artifacts, each at 100% when the run ends
        bar = asyncio.run(read(artifact_key("progress-" + stage, str(run_dir))))
        assert bar and bar[0].type == "progress" and float(bar[0].data) == 100.0, stage
