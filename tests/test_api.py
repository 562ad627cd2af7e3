"""`import farcast`: the public API, used the way the README shows, on a real (small) training run."""

import json

from safetensors import safe_open

import farcast
from farcast.examples import write_digits_run


def test_the_readme_pipeline_through_import_farcast(tmp_path):
    run = write_digits_run(tmp_path / "run", steps=60, every=5, optimizer="adam", lr=1e-3)
    store = str(tmp_path / "run.farcast")
    report = farcast.ingest(run, store)
    assert report.added == list(range(0, 61, 5))

    fc, path, target = farcast.fit(store, ratio=1.5)
    assert target == 90 and path.name == "target_90.safetensors" and path.is_file()
    verdict = farcast.backtest(store, target_step=target)
    assert verdict["methods"]["farcast"]["mae"] < verdict["methods"]["persistence"]["mae"]  # Adam, constant rate

    emitted = farcast.write_forecast(store, tmp_path / "forecasts", target, fc, verdict)
    assert emitted.path == tmp_path / "forecasts" / "step_000090.safetensors"
    with safe_open(str(emitted.path), "pt") as f:
        meta = json.loads(f.metadata()["farcast"])
        assert set(f.keys()) == set(safe_open(str(run / "step_000060.safetensors"), "pt").keys())
    assert meta["target_step"] == 90 and meta["source_steps"] == list(range(0, 61, 5))

    # the one-call form writes the same bytes (same default settings, same fit)
    again = farcast.emit(store, tmp_path / "again", target_step=90)
    assert again.path.read_bytes() == emitted.path.read_bytes()


def test_the_settings_and_adapters_are_reachable_from_the_package():
    assert farcast.FitConfig().sample == 4096 and farcast.EmitConfig().optimizer == "keep"
    assert farcast.JumpConfig(every=50).every == 50
    assert callable(farcast.hf_callback) and callable(farcast.lightning_callback) and farcast.TorchJumper
    assert farcast.farcast_flow.name == "farcast"
    assert set(farcast.__all__) <= set(dir(farcast))
