"""The fit on CUDA (float32) against the CPU (float64): run by bench/gpu_check.sh on a machine with a GPU."""

import pytest
import torch

from farcast.pipelines.emit import EmitConfig, emit
from farcast.pipelines.fit import fit_store, resolve_target, time_axis
from farcast.pipelines.ingest import ingest
from farcast.storage.store import RunStore

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]


def test_cuda_fit_agrees_with_the_cpu_fit(tmp_path):
    from farcast_core.calibration import feature_interps
    from farcast_core.forecaster import FitConfig
    from farcast.examples import write_digits_run

    run = write_digits_run(tmp_path / "run", steps=60, every=5, optimizer="adam", lr=1e-3, hidden=512)
    ingest(run, tmp_path / "store")
    store = RunStore.open(tmp_path / "store")
    cfg = FitConfig()
    axis = time_axis(store, cfg)
    rho, _ = resolve_target(store.steps, None, 1.5, axis)
    fits = {d: fit_store(store, len(store.steps), rho, cfg, torch.device(d), axis=axis) for d in ("cpu", "cuda")}
    app = feature_interps(fits["cpu"].times, fits["cpu"].feature_ratios)
    rows = sorted({r for it in app for r in (it.lo, it.hi)})
    for k, (name, i) in enumerate(fits["cpu"].keys):
        m = store.tensors[name]
        lo, hi = m.plan.bounds(i)
        v = torch.from_numpy(store.read(name, rows, lo, hi)).to(torch.float64)
        feats = torch.stack([(1 - it.w) * v[rows.index(it.lo)] + it.w * v[rows.index(it.hi)] for it in app], -1)
        pred = {d: feats @ torch.from_numpy(f.A[k, :, -1]) + float(f.b[k, -1]) for d, f in fits.items()}
        moved = (v[-1] - v[0]).abs().mean() + 1e-12
        assert (pred["cuda"] - pred["cpu"]).abs().mean() < 0.05 * moved, name


def test_emit_from_a_cuda_fit_is_finite(tmp_path):
    from farcast.examples import write_digits_run
    from safetensors.torch import load_file

    run = write_digits_run(tmp_path / "run", steps=60, every=5, optimizer="adam", lr=1e-3)
    ingest(run, tmp_path / "store")
    r = emit(tmp_path / "store", tmp_path / "out", ratio=1.5, config=EmitConfig(allow_worse=True))
    assert all(torch.isfinite(t).all() for t in load_file(r.path).values() if t.is_floating_point())
