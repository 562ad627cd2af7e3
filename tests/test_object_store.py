"""A real object store: a local S3-compatible server (moto's server mode) holds the run's store; the
flow ingests into it, fits on a 2-worker Dask cluster whose worker processes read it by URL, and
emits the same bytes as from a local store."""

import os

import pytest

from farcast.examples import write_digits_run

ANY = {"allow_worse": True}


@pytest.fixture
def s3(monkeypatch):
    """An empty bucket on a moto server on a free local port; AWS settings in the environment (workers inherit it)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "farcast", "AWS_SECRET_ACCESS_KEY": "farcast", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import fsspec.config
    import s3fs

    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})  # fsspec read the env at import
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir("farcast-test")
    yield env
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.mark.slow  # a Dask cluster of processes and an S3 server: about a minute
def test_flow_on_s3_with_a_dask_cluster_matches_a_local_store(prefect_harness, s3, tmp_path, monkeypatch):
    from farcast.flows.flows import farcast_flow, local_cluster, with_runner
    from farcast.storage.store import RunStore

    monkeypatch.setenv("FARCAST_HOME", str(tmp_path / "home"))
    run = write_digits_run(tmp_path / "run", steps=40, every=5, optimizer="adam", lr=1e-3)
    from farcast_core.forecaster import FitConfig

    fit_config = FitConfig(batch_chunks=2).to_json()  # several fit tasks, spread over the workers
    with local_cluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0",
                       env=dict(s3)) as cluster:
        flow = with_runner(farcast_flow, "dask", address=cluster.scheduler_address)
        remote = flow(str(run), str(tmp_path / "o-s3"), ratio=1.5, store="s3://farcast-test/run-store",
                      fit_config=fit_config, emit_config=ANY)
        from distributed import Client

        with Client(cluster) as client:  # the fit tasks ran in both worker processes, reading the store by URL
            executed = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert len(executed) == 2 and all(n > 0 for n in executed.values()), executed
    assert remote["status"] == "emitted" and remote["target_step"] == 60
    local = with_runner(farcast_flow, "threads")(str(run), str(tmp_path / "o-local"), ratio=1.5,
                                                 store=str(tmp_path / "local-store"), fit_config=fit_config,
                                                 emit_config=ANY)
    assert RunStore.open("s3://farcast-test/run-store").steps == RunStore.open(tmp_path / "local-store").steps
    name = "step_000060.safetensors"
    assert (tmp_path / "o-s3" / name).read_bytes() == (tmp_path / "o-local" / name).read_bytes()
    assert remote["backtest"]["methods"] == local["backtest"]["methods"]
    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir()) and not os.path.exists("s3:")
