"""Zarr store -> fitted forecasters -> backtest, on real training runs."""

import json

import numpy as np

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from farcast_core.errors import ForecastError
from farcast_core.forecaster import FitConfig
from farcast.flows.cli import main
from farcast.pipelines.backtest import backtest
from farcast.examples import write_digits_run
from farcast.pipelines.fit import fit, fit_store
from farcast.pipelines.ingest import IngestConfig, ingest
from farcast.storage.artifacts import load_forecasters
from farcast.storage.store import RunStore

FAST = FitConfig(iters=60)


@pytest.fixture(scope="session")
def adam_store(tmp_path_factory):
    """A digits MLP (64-96-10) trained for real with Adam, 60 steps, a checkpoint every 5, in 4 Ki-value chunks."""
    d = tmp_path_factory.mktemp("adam")
    write_digits_run(d / "run", steps=60, every=5, optimizer="adam", lr=1e-3, hidden=96)
    ingest(d / "run", d / "store", IngestConfig(memory_budget_mb=1))
    return d / "store"


def test_real_adam_run_beats_persistence_at_ratio_2(adam_store):
    r = backtest(adam_store, ratio=2.0)
    assert (r["observed_until"], r["backtest_from"], r["target_step"]) == (60, 30, 120)
    assert set(r["methods"]) == {"farcast", "persistence", "chord", "linear", "linefit"}
    assert r["farcast_vs_persistence"] < 0.9, r["methods"]
    assert r["farcast_vs_persistence"] == pytest.approx(r["methods"]["farcast"]["mae"] / r["methods"]["persistence"]["mae"])
    assert set(r["per_tensor"]) == {n for n, m in RunStore.open(adam_store).tensors.items() if m.kind == "float"}


def test_fit_saves_forecasters_with_their_config(adam_store, tmp_path):
    fc, path, target = fit(adam_store, target_step=90, config=FAST, out=tmp_path / "fc")
    assert target == 90 and fc.rho == pytest.approx(1.5)
    store = RunStore.open(adam_store)
    floats = [m for m in store.tensors.values() if m.kind == "float"]
    assert len(fc.keys) == sum(m.plan.n_chunks for m in floats) > len(floats)  # 0.weight spans chunks
    loaded, meta = load_forecasters(path)
    assert np.array_equal(loaded.A, fc.A) and loaded.keys == fc.keys
    assert meta["config"]["lam"] == FAST.lam and meta["target_step"] == 90 and meta["steps"] == store.steps


def test_the_cpu_fit_and_backtest_commands_never_import_torch(adam_store, tmp_path):
    """`farcast fit` and `farcast backtest` on a machine without a GPU run in numpy: importing torch alone
    costs ~3 s and ~220 MiB on a small machine, more than the fit of a 300M-parameter run. Run as the
    commands run (a fresh process) and checked there; the forecasters fit saves are the ones fit_store
    computes here, and the backtest's report is the one the function returns here."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from farcast.flows.cli import main\n"
        f"sys.argv = ['farcast', 'fit', {str(adam_store)!r}, '--ratio', '1.5', '--out', {str(tmp_path / 'fc')!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        f"sys.argv = ['farcast', 'backtest', {str(adam_store)!r}, '--ratio', '1.5', '--json']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "from farcast_core.forecaster import GPU_NODES\n"
        "import os\n"
        "gpu = any(os.path.exists(n) for n in GPU_NODES)\n"
        "print('torch' in sys.modules, gpu)\n"
    )
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    imported, gpu_node = (x == "True" for x in lines[-1].split())
    assert imported == gpu_node  # a machine with a GPU device node asks torch whether it can use it
    report = json.loads(lines[-2])
    assert report["farcast_vs_persistence"] == pytest.approx(backtest(adam_store, None, 1.5)["farcast_vs_persistence"], rel=1e-12)
    saved, _ = load_forecasters(tmp_path / "fc" / "target_90.safetensors")
    store = RunStore.open(adam_store)
    here = fit_store(store, len(store.steps), 1.5, FitConfig(), "cpu")
    assert np.array_equal(saved.A, here.A) and np.array_equal(saved.b, here.b) and saved.A.dtype == np.float64


def test_farcast_device_chooses_the_fit_device(monkeypatch):
    """FARCAST_DEVICE=cpu keeps the fit on the CPU even where a GPU device node exists (a GPU busy training);
    a value that is not cpu or cuda, or cuda where torch sees no CUDA device, is a clear error."""
    import farcast_core.forecaster as FC

    monkeypatch.setattr(FC, "GPU_NODES", ("/",))  # a device node that exists
    monkeypatch.setenv("FARCAST_DEVICE", "cpu")
    assert FC.default_device() == "cpu"
    monkeypatch.setenv("FARCAST_DEVICE", "gpu0")
    with pytest.raises(ForecastError, match="FARCAST_DEVICE is 'gpu0'; set it to cpu or cuda"):
        FC.default_device()
    monkeypatch.setenv("FARCAST_DEVICE", "cuda")
    if torch.cuda.is_available():
        assert FC.default_device() == torch.device("cuda")
    else:
        with pytest.raises(ForecastError, match="torch sees no CUDA device"):
            FC.default_device()
    monkeypatch.delenv("FARCAST_DEVICE")
    assert FC.default_device() == (torch.device("cuda") if torch.cuda.is_available() else "cpu")


def test_fit_is_deterministic_and_batching_does_not_change_it(adam_store):
    store = RunStore.open(adam_store)
    n = len(store.steps)
    a = fit_store(store, n, 2.0, FAST)
    b = fit_store(store, n, 2.0, FAST)
    assert np.array_equal(a.A, b.A) and np.array_equal(a.b, b.b)
    one_by_one = fit_store(store, n, 2.0, FitConfig(iters=60, batch_chunks=1))
    assert one_by_one.keys == a.keys
    assert np.allclose(one_by_one.A, a.A, atol=1e-9) and np.allclose(one_by_one.b, a.b, atol=1e-12)


def test_transfer_a_forecaster_to_another_run(adam_store, tmp_path):
    other = tmp_path / "other"
    write_digits_run(other / "run", steps=60, every=5, optimizer="adam", lr=1e-3, hidden=96, seed=1)
    ingest(other / "run", other / "store", IngestConfig(memory_budget_mb=1))
    store = RunStore.open(adam_store)
    fc = fit_store(store, 7, 2.0, FAST)  # fitted on steps 0..30 of the first run, ratio 2
    r = backtest(other / "store", ratio=2.0, forecasters=fc)
    assert r["transfer"] and r["backtest_from"] == 30
    assert r["farcast_vs_persistence"] < 1.0, r["methods"]


def test_transfer_needs_the_same_architecture(adam_store, tmp_path):
    other = tmp_path / "other"
    write_digits_run(other / "run", steps=20, every=5, hidden=16)
    ingest(other / "run", other / "store", IngestConfig(memory_budget_mb=1))
    fc = fit_store(RunStore.open(adam_store), 7, 2.0, FAST)
    with pytest.raises(ForecastError, match="chunked by|lacks"):
        backtest(other / "store", ratio=2.0, forecasters=fc)


def test_too_far_targets_name_the_largest_ratio(adam_store):
    with pytest.raises(ForecastError, match="largest ratio this run supports is 12"):
        fit(adam_store, ratio=13.0)
    with pytest.raises(ForecastError, match="can backtest ratios up to about 3.46"):
        backtest(adam_store, ratio=5.0)
    with pytest.raises(ForecastError, match="not after the newest checkpoint"):
        fit(adam_store, target_step=60)


def test_nan_tensor_is_excluded_and_reported(tmp_path):
    run = write_digits_run(tmp_path / "run", steps=30, every=5)
    last = run / "step_000030.safetensors"
    sd = load_file(last)
    sd["3.bias"][0] = float("nan")
    save_file(sd, last)
    ingest(run, tmp_path / "store")
    r = backtest(tmp_path / "store", ratio=1.5, config=FAST)
    assert r["excluded"] == ["3.bias"] and "3.bias" not in r["per_tensor"]
    fc, _, _ = fit(tmp_path / "store", ratio=1.5, config=FAST)
    assert fc.excluded == ["3.bias"] and all(name != "3.bias" for name, _ in fc.keys)


def test_backtest_command_json_and_table(adam_store, tmp_path):
    r = CliRunner().invoke(main, ["backtest", str(adam_store), "--ratio", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    for key in ("methods", "farcast_vs_persistence", "observed_until", "backtest_from", "target_step"):
        assert key in out
    assert all("mae" in out["methods"][m] for m in ("farcast", "persistence", "chord", "linear", "linefit"))
    assert out["shrink"]["chosen"] == "backtest: fitted on steps up to 15, forecast step 30", out["shrink"]
    r = CliRunner().invoke(main, ["backtest", str(adam_store), "--target-step", "90"])
    assert r.exit_code == 0 and "persistence" in r.output and "farcast" in r.output
    assert "the backtest's forecast was shrunk towards step 40: alpha" in r.output, r.output
    r = CliRunner().invoke(main, ["backtest", str(adam_store), "--ratio", "50"])
    assert r.exit_code == 2 and "can backtest ratios up to" in r.stderr


def test_backtest_command_on_a_checkpoint_dir_and_fit_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FARCAST_HOME", str(tmp_path / "home"))
    run = write_digits_run(tmp_path / "run", steps=30, every=5)
    r = CliRunner().invoke(main, ["backtest", str(run), "--ratio", "1.5", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["target_step"] == 45
    stores = list((tmp_path / "home" / "stores").iterdir())
    assert len(stores) == 1
    r = CliRunner().invoke(main, ["fit", str(stores[0]), "--ratio", "1.5", "--out", str(tmp_path / "fc")])
    assert r.exit_code == 0 and (tmp_path / "fc" / "target_45.safetensors").is_file()
    assert "shrinkage towards step 30: alpha" in r.output and "(backtest: fitted on steps up to 20, forecast step 30)" in r.output, r.output
    r = CliRunner().invoke(main, ["fit", str(stores[0]), "--ratio", "1.5", "--out", str(tmp_path / "fc"), "--force",
                                  "--shrink", "1", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["shrink"] is None, r.output
    r = CliRunner().invoke(main, ["fit", str(stores[0])])
    assert r.exit_code == 2 and "exactly one of --target-step or --ratio" in r.stderr


def test_the_sample_ingest_keeps_is_what_the_fit_would_read_from_the_chunks(tmp_path, monkeypatch):
    """Ingest keeps each chunk's sampled values in one small array; fitting from it gives the same
    forecasters as reading the chunks themselves (bf16 weights, steps appended by a second ingest)."""
    import farcast.pipelines.fit as F

    run = tmp_path / "run"
    write_digits_run(run, steps=30, every=5, optimizer="adam", lr=1e-3, hidden=128)
    for p in run.glob("*.safetensors"):  # bf16, as many real runs save
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(p).items()}, p)
    late = sorted(run.glob("*.safetensors"))[-2:]
    for p in late:
        p.rename(p.with_suffix(".later"))
    ingest(run, tmp_path / "store", IngestConfig(memory_budget_mb=2))
    for p in late:
        p.with_suffix(".later").rename(p)
    ingest(run, tmp_path / "store", IngestConfig(memory_budget_mb=2))
    store = RunStore.open(tmp_path / "store")
    layout = store.sample_layout
    assert layout is not None and layout.serves(FitConfig().sample, FitConfig().seed) and len(store.steps) == 7
    assert store.read_sample(list(range(7))).shape == (7, layout.width)
    assert store.tensors["0.weight"].chunk == 8192 > layout.size  # a chunk the sample draws from
    cfg = FitConfig(iters=20)
    assert F.read_sampled(store, F.plan_fit(store, 7, 2.0, cfg).pairs.rows, cfg) is not None
    small = FitConfig(iters=20, sample=1000, seed=3)  # another sample: read from the chunks
    assert F.read_sampled(store, F.plan_fit(store, 7, 2.0, small).pairs.rows, small) is None
    from_sample = fit_store(store, 7, 2.0, cfg)
    monkeypatch.setattr(F, "read_sampled", lambda *a, **k: None)
    from_chunks = fit_store(store, 7, 2.0, cfg)
    # the same values both ways (the shrinkage's backtest sums them in another order: equal to rounding)
    assert from_sample.shrink["alpha"] == pytest.approx(from_chunks.shrink["alpha"], rel=1e-12)
    assert from_sample.shrink["chosen"] == from_chunks.shrink["chosen"] and from_sample.shrink["chosen"].startswith("backtest")
    assert np.allclose(from_sample.A, from_chunks.A, rtol=0, atol=1e-12) and np.allclose(from_sample.b, from_chunks.b, rtol=0, atol=1e-12)


def test_gpu_batches_are_sized_from_free_memory(monkeypatch):
    """On a GPU the reduction batch grows to a quarter of the free memory; on the CPU it is the config's."""
    import types

    import farcast.pipelines.fit as F

    assert F.device_batch(torch.device("cpu"), 13, 4096, 32) == 32
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 80 * 2**30))
    gpu = types.SimpleNamespace(type="cuda")
    per_chunk = 13 * 4096 * 4 * F.COPIES_PER_CHUNK
    assert F.device_batch(gpu, 13, 4096, 32) == 2 * 2**30 // per_chunk > 32
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 80 * 2**30))
    assert F.device_batch(gpu, 13, 4096, 32) == 32  # never below the configured batch


def test_the_gpus_float32_reduction_agrees_with_float64_on_the_cpu(adam_store, monkeypatch):
    """A GPU reduces the padded rows in float32 tensors (pipelines.fit._on_device); no GPU runs in CI, so the same
    float32 torch reduction runs here on the CPU against the float64 numpy one, with tests/test_gpu.py's criterion: each
    chunk's forecast within 5% of how far its weights moved over the run (measured: most chunks agree
    to 1e-4 of their forecast step; a chunk that the Adam loop refines can land elsewhere on the
    regulariser's kink, up to 12% of its step on bench/forecast_quality.py's runs)."""
    import farcast.pipelines.fit as F
    from farcast_core.calibration import feature_interps
    from farcast_core.forecaster import KappaRows, forecast_rows

    store = RunStore.open(adam_store)
    n = len(store.steps)
    fits = {}
    fits[torch.float64] = fit_store(store, n, 1.5, FitConfig(), "cpu")
    # as on a GPU: the rows reduced as float32 tensors, and the refinement's kappa rows kept as tensors
    # (on the CPU they would become numpy), so the torch branches run end to end
    def as_on_a_gpu(store, keys, rows, config, device, sampled=None):
        W, mask = F.sampled_values(store, keys, rows, config, sampled)  # padded, as a GPU gets them
        return torch.from_numpy(W).float(), torch.from_numpy(mask)

    monkeypatch.setattr(F, "_reduction_rows", as_on_a_gpu)
    monkeypatch.setattr(KappaRows, "of", classmethod(lambda cls, M: cls(M.X, M.Y, M.mask, M.Xa, M.app_mask)))
    fits[torch.float32] = fit_store(store, n, 1.5, FitConfig(), "cpu")
    f64, f32 = fits[torch.float64], fits[torch.float32]
    assert not np.array_equal(f64.A, f32.A)  # the float32 path did run
    app = feature_interps(f64.times, f64.feature_ratios)
    rows = sorted({r for it in app for r in (it.lo, it.hi)})
    for k, (name, i) in enumerate(f64.keys):
        lo, hi = store.tensors[name].plan.bounds(i)
        v = torch.from_numpy(store.read(name, rows, lo, hi)).to(torch.float64)
        pred = {dt: forecast_rows(f.A[k], f.b[k], app, rows, v) for dt, f in fits.items()}
        whole = torch.from_numpy(store.read(name, [0, n - 1], lo, hi)).to(torch.float64)
        moved = (whole[1] - whole[0]).abs().mean() + 1e-12
        assert (pred[torch.float32] - pred[torch.float64]).abs().mean() < 0.05 * moved, (name, i)


def test_shrinkage_is_chosen_by_a_backtest_on_the_runs_own_history(adam_store):
    """shrink='auto': alpha minimises the L1 error of the unshrunk fit on the steps up to s_b forecasting
    the newest step, on the sampled parameters (computed here independently, chunk by chunk, with the
    forecast function emit uses); the forecasters are the unshrunk ones pulled alpha of the way back."""
    import numpy as np
    from dataclasses import replace

    from farcast_core.calibration import feature_interps
    from farcast_core.forecaster import forecast_rows
    from farcast_core.sampling import chunk_seed, sample_index
    from farcast_core.calibration import backtest_row

    store = RunStore.open(adam_store)
    n = len(store.steps)
    plain = fit_store(store, n, 2.0, replace(FAST, shrink=1.0))
    auto = fit_store(store, n, 2.0, FAST)
    assert plain.shrink is None and auto.shrink["chosen"] == "backtest: fitted on steps up to 30, forecast step 60"
    times = np.asarray(store.steps, dtype=np.float64)
    b = backtest_row(times, 2.0)
    inner = fit_store(store, b + 1, (times[-1] - times[0]) / (times[b] - times[0]), replace(FAST, shrink=1.0))
    app = feature_interps(times[: b + 1], inner.feature_ratios)
    rows = sorted({b, n - 1, *(r for it in app for r in (it.lo, it.hi))})
    moved, needed, weight = [], [], []
    for k, (name, i) in enumerate(inner.keys):
        m = store.tensors[name]
        lo, hi = m.plan.bounds(i)
        idx = sample_index(hi - lo, FAST.sample, chunk_seed(FAST.seed, name, i))
        v = torch.from_numpy(np.asarray(store.read(name, rows, cols=lo + idx), dtype=np.float64))
        f = forecast_rows(inner.A[k], inner.b[k], app, rows, v)
        moved.append(f - v[rows.index(b)])
        needed.append(v[rows.index(n - 1)] - v[rows.index(b)])
        weight.append(torch.full_like(f, (hi - lo) / len(idx)))
    moved, needed, weight = (torch.cat(x).numpy() for x in (moved, needed, weight))

    def l1(a):
        return float(np.sum(weight * np.abs(needed - a * moved)))

    grid = min(l1(a) for a in np.linspace(0, 1, 2001))
    alpha = auto.shrink["alpha"]
    assert 0 < alpha < 1 and l1(alpha) <= grid and l1(alpha) < l1(1.0)
    want = plain.shrunk(alpha, auto.shrink["chosen"])
    assert np.allclose(auto.A, want.A, atol=1e-12) and np.allclose(auto.b, want.b, atol=1e-12)
    # the choice travels with the forecasters' file
    saved, _, _ = fit(adam_store, ratio=2.0, config=FAST, out=adam_store.parent / "fc-shrink", force=True)
    assert load_forecasters(adam_store.parent / "fc-shrink" / "target_120.safetensors")[0].shrink == saved.shrink


def test_shrinkage_needs_enough_checkpoints_and_can_be_stated(tmp_path):
    """Too few checkpoints for the backtest: no shrinkage, and the forecasters say why; a stated alpha is used
    as is, 0 giving the newest weights back."""
    from dataclasses import replace

    write_digits_run(tmp_path / "run", steps=4, every=2, optimizer="adam", lr=1e-3, hidden=16)
    ingest(tmp_path / "run", tmp_path / "store")
    store = RunStore.open(tmp_path / "store")
    n = len(store.steps)  # steps 0, 2, 4: no checkpoint to backtest from
    fc = fit_store(store, n, 1.9, FAST)
    assert fc.shrink["alpha"] == 1.0 and fc.shrink["chosen"].startswith("none: too few checkpoints for a backtest"), fc.shrink
    plain = fit_store(store, n, 1.9, replace(FAST, shrink=1.0))
    assert np.array_equal(plain.A, fc.A) and np.array_equal(plain.b, fc.b)
    zero = fit_store(store, n, 1.9, replace(FAST, shrink=0.0))
    assert zero.shrink == {"alpha": 0.0, "chosen": "stated"}
    assert not zero.b.any() and not zero.A[:, :-1].any()
    assert (zero.A[:, -1] == 1).all()  # the forecast is w_n itself
    with pytest.raises(Exception, match="shrink must be"):
        FitConfig(shrink=1.5)


def test_without_refinement_the_intermediate_horizons_change_nothing(adam_store):
    """A least-squares fit (iters=0, as a jump fits) of one horizon forecasts what the same fit with four
    does (each horizon's least squares is its own column), from fewer rows; the jump's config relies on it."""
    from farcast.pipelines.fit import plan_fit
    from farcast_core.calibration import feature_interps
    from farcast_core.forecaster import forecast_rows

    store = RunStore.open(adam_store)
    n = len(store.steps)
    one, four = (fit_store(store, n, 2.0, FitConfig(iters=0, horizons=h, shrink=1.0), "cpu") for h in (1, 4))
    assert one.ratios == (2.0,) and len(four.ratios) == 4 and one.keys == four.keys
    # the forecasts, against how far each chunk's weights moved over the run (the coefficients of an
    # ill-conditioned chunk differ in the rounding of its other rows: up to 3e-8 of the largest here)
    app = feature_interps(four.times, four.feature_ratios)
    rows_app = sorted({r for it in app for r in (it.lo, it.hi)})
    for k, (name, i) in enumerate(four.keys):
        lo, hi = store.tensors[name].plan.bounds(i)
        v = store.read(name, rows_app, lo, hi).astype(np.float64)
        moved = np.abs(store.read(name, [n - 1], lo, hi)[0] - store.read(name, [0], lo, hi)[0]).mean() + 1e-12
        gap = forecast_rows(one.A[k], one.b[k], app, rows_app, v) - forecast_rows(four.A[k], four.b[k], app, rows_app, v)
        assert np.abs(gap).max() <= 1e-11 * moved, (name, i)  # 4e-14 measured
    rows = {h: plan_fit(store, n, 2.0, FitConfig(iters=0, horizons=h, shrink=1.0)).rows for h in (1, 4)}
    assert set(rows[1]) < set(rows[4])
    # with the refinement the horizons are coupled by the regulariser: not the same
    refined = {h: fit_store(store, n, 2.0, FitConfig(iters=60, horizons=h, shrink=1.0), "cpu") for h in (1, 4)}
    assert not np.allclose(refined[1].A[..., -1], refined[4].A[..., -1], rtol=1e-6, atol=0)
