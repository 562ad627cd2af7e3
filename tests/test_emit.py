"""Forecasters -> checkpoints that the real frameworks resume from."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from farcast_core.errors import FarcastError, ForecastError, StoreError
from farcast.flows.cli import main
from farcast.examples import train_digits, write_digits_run
from farcast.pipelines.emit import EmitConfig, emit
from farcast.storage.layouts import rename_step
from farcast.pipelines.ingest import ingest
from tests.conftest import StopAt, bits, hf_args, tiny_gpt2, token_data

ANY = EmitConfig(allow_worse=True)  # resuming is under test here, not forecast quality


def test_rename_step_keeps_padding():
    assert rename_step("checkpoint-10", 10, 15) == "checkpoint-15"
    assert rename_step("step_000100.safetensors", 100, 250) == "step_000250.safetensors"
    assert rename_step("epoch=0-step=8.ckpt", 8, 12) == "epoch=0-step=12.ckpt"


# ------------------------------------------------------------------ Hugging Face


def resume_hf(emitted, out, stop):
    from transformers import Trainer

    trainer = Trainer(model=tiny_gpt2(), args=hf_args(out), train_dataset=token_data(), callbacks=[StopAt(stop)])
    trainer.train(resume_from_checkpoint=str(emitted))
    return trainer


def test_hugging_face_trainer_resumes_from_the_forecast(hf_long_run, tmp_path):
    from transformers import GPT2LMHeadModel

    ingest(hf_long_run, tmp_path / "store")
    # the schedule is inferred from trainer_state.json's logged learning rates: no pickle needed
    r = emit(tmp_path / "store", tmp_path / "forecast", target_step=15, config=ANY)
    assert r.path == tmp_path / "forecast" / "checkpoint-15"
    state = json.loads((r.path / "trainer_state.json").read_text())
    assert state["global_step"] == 15
    src = load_file(hf_long_run / "checkpoint-10" / "model.safetensors")
    out = load_file(r.path / "model.safetensors")
    assert set(out) == set(src) and all(out[k].shape == src[k].shape and out[k].dtype == src[k].dtype for k in src)
    assert not torch.equal(out["transformer.h.0.mlp.c_fc.weight"], src["transformer.h.0.mlp.c_fc.weight"])
    with safe_open(str(r.path / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    info = json.loads(meta["farcast"])
    assert info["target_step"] == 15 and info["source_steps"][-1] == 10 and "farcast" in info["backtest"]

    GPT2LMHeadModel.from_pretrained(r.path)  # loads as a plain model
    trainer = resume_hf(r.path, tmp_path / "resumed", stop=17)
    assert trainer.state.global_step == 17
    logged = [h for h in trainer.state.log_history if "loss" in h and h["step"] > 10]
    assert [h["step"] for h in logged] == [16, 17]  # resumed at 15: two steps ran
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
    # the linear schedule continues from 15, not from 10 (and not from 0): step k uses lr(k - 1)
    assert logged[0]["learning_rate"] == pytest.approx(5e-3 * (40 - 15) / 40, rel=1e-6)
    assert logged[1]["learning_rate"] == pytest.approx(5e-3 * (40 - 16) / 40, rel=1e-6)


def test_hugging_face_sharded_checkpoint(hf_long_run, tmp_path):
    from transformers import GPT2LMHeadModel

    run = tmp_path / "run"
    shutil.copytree(hf_long_run, run)
    for d in run.glob("checkpoint-*"):
        model = GPT2LMHeadModel.from_pretrained(d)
        (d / "model.safetensors").unlink()
        model.save_pretrained(d, max_shard_size="5KB")
    ingest(run, tmp_path / "store")
    r = emit(tmp_path / "store", tmp_path / "forecast", target_step=15, config=ANY)
    index = json.loads((r.path / "model.safetensors.index.json").read_text())
    src_index = json.loads((run / "checkpoint-10" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == src_index["weight_map"] and len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == src_index["metadata"]["total_size"]
    merged = {}
    for f in set(index["weight_map"].values()):
        merged.update(load_file(r.path / f))
    assert set(merged) == set(index["weight_map"])
    GPT2LMHeadModel.from_pretrained(r.path)
    assert resume_hf(r.path, tmp_path / "resumed", stop=16).state.global_step == 16


def test_optimizer_policy_keep_and_reset(hf_long_run, tmp_path):
    ingest(hf_long_run, tmp_path / "store")
    keep = emit(tmp_path / "store", tmp_path / "keep", target_step=15, config=ANY)
    reset = emit(tmp_path / "store", tmp_path / "reset", target_step=15, config=EmitConfig(optimizer="reset", allow_worse=True))
    src = torch.load(hf_long_run / "checkpoint-10" / "optimizer.pt", weights_only=True)
    kept = torch.load(keep.path / "optimizer.pt", weights_only=True)
    assert kept["state"].keys() == src["state"].keys()
    assert all(torch.equal(kept["state"][i][k], v) for i, st in src["state"].items() for k, v in st.items())
    opt = torch.load(reset.path / "optimizer.pt", weights_only=True)
    assert opt["state"] == {}
    # both: the same parameter groups, with the learning rate of the (inferred, linear) schedule at step 15
    for o in (kept, opt):
        for g, s in zip(o["param_groups"], src["param_groups"], strict=True):
            assert g["lr"] == pytest.approx(5e-3 * (40 - 15) / 40, rel=1e-12)
            assert {k: v for k, v in g.items() if k != "lr"} == {k: v for k, v in s.items() if k != "lr"}
    with safe_open(str(reset.path / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["farcast"])["optimizer"] == "reset"
    sched = torch.load(reset.path / "scheduler.pt", weights_only=True)
    assert sched["last_epoch"] == 15 and sched["_step_count"] == 16
    assert resume_hf(reset.path, tmp_path / "resumed", stop=16).state.global_step == 16


# ------------------------------------------------------------------ Lightning


def test_lightning_resumes_from_the_forecast(lightning_run, tmp_path):
    import lightning as L

    from tests.conftest import LitNet, digits_loader

    ingest(lightning_run, tmp_path / "store")
    r = emit(tmp_path / "store", tmp_path / "forecast", target_step=12, config=ANY)
    assert r.path.name == "epoch=0-step=12.ckpt"
    ckpt = torch.load(r.path, weights_only=False)
    assert ckpt["global_step"] == 12
    src = torch.load(lightning_run / "epoch=0-step=8.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == set(src["state_dict"])
    assert set(load_file(r.path.with_suffix(".safetensors"))) == set(src["state_dict"])
    model = LitNet()
    trainer = L.Trainer(max_steps=14, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", enable_checkpointing=False)
    trainer.fit(model, digits_loader(), ckpt_path=str(r.path))
    assert trainer.global_step == 14 and model.steps_run == 2


# ------------------------------------------------------------------ plain torch, accelerate, DCP


def test_plain_torch_files_and_bf16(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for step, sd in train_digits(steps=30, every=5, dtype=torch.bfloat16):
        torch.save({"model": sd, "step": step}, run / f"model_{step}.pt")
    ingest(run, tmp_path / "store")
    r = emit(tmp_path / "store", tmp_path / "forecast", ratio=1.5, config=ANY)
    assert r.path.name == "model_45.pt"
    obj = torch.load(r.path, weights_only=True)
    assert obj["step"] == 45
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    model.to(torch.bfloat16).load_state_dict(obj["model"], strict=True)
    plain = load_file(r.path.with_suffix(".safetensors"))
    model.load_state_dict(plain, strict=True)
    assert all(plain[k].dtype == torch.bfloat16 for k in ("0.weight", "3.bias"))
    assert plain["1.num_batches_tracked"].dtype == torch.int64
    last = torch.load(run / "model_30.pt", weights_only=True)["model"]
    assert torch.equal(plain["1.num_batches_tracked"], last["1.num_batches_tracked"])  # copied, not forecast
    for k in plain:
        assert torch.equal(bits(plain[k]), bits(obj["model"][k]))


def test_plain_torch_container_resumes_on_schedule(tmp_path):
    """A {"model", "optimizer", "scheduler", "step"} .pt emitted at 300 from a run observed to 200: the
    schedule is read from the scheduler state, and the resumed loop's learning rate at 300 and 301 is
    the real run's (it stayed at 200's before)."""
    from farcast.examples import DigitsMLP, digits_split

    train, _ = digits_split()
    x, y = torch.stack([t["pixels"] for t in train]), torch.stack([t["labels"] for t in train])

    def loop():
        torch.manual_seed(0)
        model = DigitsMLP(16)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=400)

    model, opt, sched = loop()
    run = tmp_path / "run"
    run.mkdir()
    g = torch.Generator().manual_seed(0)
    real_lr = {}
    for step in range(0, 302):
        real_lr[step] = opt.param_groups[0]["lr"]  # the rate of optimizer step ``step + 1``
        if step <= 200 and step % 20 == 0:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "step": step}, run / f"ckpt_{step}.pt")
        idx = torch.randint(0, len(x), (32,), generator=g)
        model(x[idx], y[idx])["loss"].backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    ingest(run, tmp_path / "store")
    r = emit(tmp_path / "store", tmp_path / "forecast", target_step=300, config=ANY)
    obj = torch.load(r.path, weights_only=True)
    assert obj["step"] == 300 and obj["scheduler"]["last_epoch"] == 300
    model, opt, sched = loop()
    model.load_state_dict(obj["model"])
    opt.load_state_dict(obj["optimizer"])
    sched.load_state_dict(obj["scheduler"])
    assert opt.param_groups[0]["lr"] == pytest.approx(real_lr[300], rel=1e-9)
    model(x[:32], y[:32])["loss"].backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(real_lr[301], rel=1e-9)


def test_accelerate_save_state_resumes(tmp_path):
    from accelerate import Accelerator

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.01 * s))
        acc = Accelerator(cpu=True)
        return acc, *acc.prepare(model, opt, sched)

    acc, model, opt, sched = setup()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x.sum(1, keepdim=True)
    for step in range(1, 21):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        acc.backward(loss)
        opt.step()
        sched.step()
        if step % 4 == 0:
            acc.save_state(str(tmp_path / "run" / f"step_{step}"))
    ingest(tmp_path / "run", tmp_path / "store")
    r = emit(tmp_path / "store", tmp_path / "forecast", target_step=30, config=ANY)
    assert r.path.name == "step_30"
    assert {"model.safetensors", "optimizer.bin", "scheduler.bin"} <= {p.name for p in r.path.iterdir()}
    acc2, model2, opt2, sched2 = setup()
    acc2.load_state(str(r.path))
    got = {k: v for k, v in model2.state_dict().items()}
    want = load_file(r.path / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert sched2.scheduler.last_epoch == 30


def test_dcp_output(tmp_path):
    import torch.distributed.checkpoint as dcp

    for step, sd in train_digits(steps=30, every=5):
        dcp.save(sd, checkpoint_id=tmp_path / "run" / f"step_{step}", no_dist=True)
    ingest(tmp_path / "run", tmp_path / "store")
    r = emit(tmp_path / "store", tmp_path / "forecast", target_step=45, config=ANY)
    assert r.path.name == "step_45"
    want = load_file(r.path / "forecast.safetensors")
    got = {k: torch.empty_like(v) for k, v in want.items()}
    dcp.load(got, checkpoint_id=r.path, no_dist=True)
    assert all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------ refusals


@pytest.fixture
def digits_store(tmp_path):
    run = write_digits_run(tmp_path / "run", steps=60, every=5, optimizer="adam", lr=1e-3)
    ingest(run, tmp_path / "store")
    return tmp_path / "store"


def test_refuses_output_inside_input(digits_store, tmp_path):
    with pytest.raises(ForecastError, match="inside the checkpoint directory"):
        emit(digits_store, tmp_path / "run" / "forecast", ratio=1.5, config=ANY)
    with pytest.raises(ForecastError, match="inside the checkpoint directory"):
        emit(digits_store, tmp_path / "run", ratio=1.5, config=ANY)


def test_refuses_existing_output_without_force(digits_store, tmp_path):
    first = emit(digits_store, tmp_path / "out", ratio=1.5, config=ANY)
    before = first.path.read_bytes()
    with pytest.raises(StoreError, match="already exists; pass --force"):
        emit(digits_store, tmp_path / "out", ratio=1.5, config=ANY)
    assert first.path.read_bytes() == before
    again = emit(digits_store, tmp_path / "out", ratio=1.5, config=EmitConfig(force=True, allow_worse=True))
    assert again.path == first.path and not list((tmp_path / "out").glob(".farcast-*"))


def test_refuses_a_forecast_worse_than_persistence(digits_store, tmp_path):
    report = {"methods": {"farcast": {"mae": 2e-3}, "persistence": {"mae": 1e-3}}, "farcast_vs_persistence": 2.0,
              "backtest_from": 30}
    with pytest.raises(ForecastError, match=r"farcast MAE 2.0000e-03 vs persistence MAE 1.0000e-03"):
        emit(digits_store, tmp_path / "out", ratio=1.5, report=report)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_real_backtest_guard(tmp_path):
    # weights that moved steadily, then stopped at step 25: the calibration cuts only saw motion,
    # so the forecast keeps moving while keeping the newest weights is exact
    run = tmp_path / "run"
    run.mkdir()
    c = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    for step in range(0, 65, 5):
        save_file({"w": c * min(step, 25)}, run / f"step_{step}.safetensors")
    ingest(run, tmp_path / "store")
    with pytest.raises(ForecastError, match="worse than keeping the newest weights"):
        emit(tmp_path / "store", tmp_path / "out", ratio=1.5)
    assert not (tmp_path / "out" / "step_90.safetensors").exists()


def test_nan_in_the_forecast_is_never_written(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for step in range(0, 65, 5):  # a float16 tensor heading for its largest finite value
        save_file({"ok": torch.full((64,), 0.001 * step), "big": torch.full((64,), 1000.0 * step).half()},
                  run / f"step_{step}.safetensors")
    ingest(run, tmp_path / "store")
    with pytest.raises(ForecastError, match="tensor 'big': the forecast has NaN/Inf"):
        emit(tmp_path / "store", tmp_path / "out", ratio=3.0, config=ANY)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_run_command_json_and_errors(prefect_harness, tmp_path, monkeypatch):
    monkeypatch.setenv("FARCAST_HOME", str(tmp_path / "home"))
    run = write_digits_run(tmp_path / "run", steps=60, every=5, optimizer="adam", lr=1e-3)
    r = CliRunner().invoke(main, ["run", str(run), "--out", str(tmp_path / "out"), "--ratio", "1.5", "--json", "--allow-worse"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["emitted"].endswith("step_000090.safetensors") and out["target_step"] == 90
    assert set(out["backtest"]["methods"]) == {"farcast", "persistence", "chord", "linear", "linefit"}
    r = CliRunner().invoke(main, ["run", str(run), "--out", str(tmp_path / "out"), "--ratio", "1.5"])
    assert r.exit_code == 2 and "already exists" in r.stderr
    r = CliRunner().invoke(main, ["emit", str(tmp_path / "nostore"), "--out", str(tmp_path / "o"), "--ratio", "2"])
    assert r.exit_code == 2 and "no such directory" in r.stderr and "a store made by 'farcast ingest'" in r.stderr


def test_errors_are_farcast_errors():
    assert issubclass(ForecastError, FarcastError) and issubclass(StoreError, FarcastError)


def test_the_emitted_weights_are_the_backtests_forecast(digits_store, tmp_path):
    """emit folds each chunk's forecaster into one weight per stored row (one pass over the rows);
    what it writes must be the forecaster applied to the features, in float64, up to float32 rounding."""
    from safetensors.torch import load_file

    from farcast_core.calibration import feature_interps, interp_weights
    from farcast_core.forecaster import FitConfig, apply, forecast_rows
    from farcast.pipelines.fit import fit_store, resolve_target, time_axis
    from farcast.storage.store import RunStore

    store = RunStore.open(digits_store)
    axis = time_axis(store, FitConfig())
    rho, target = resolve_target(store.steps, None, 1.5, axis)
    fc = fit_store(store, len(store.steps), rho, FitConfig(), axis=axis)
    r = emit(digits_store, tmp_path / "out", ratio=1.5, config=ANY, forecasters=fc,
             report={"methods": {"farcast": {"mae": 0.0}, "persistence": {"mae": 1.0}},
                     "farcast_vs_persistence": 0.0, "backtest_from": 0})
    out = load_file(r.path)
    app = feature_interps(fc.times, fc.feature_ratios)
    rows = sorted({x for it in app for x in (it.lo, it.hi)})
    for k, (name, i) in enumerate(fc.keys):
        m = store.tensors[name]
        lo, hi = m.plan.bounds(i)
        v = torch.from_numpy(store.read(name, rows, lo, hi)).to(torch.float64)
        feats = torch.stack([(1 - it.w) * v[rows.index(it.lo)] + it.w * v[rows.index(it.hi)] for it in app], -1)
        want = apply(fc.A[k], fc.b[k], feats)[:, -1]
        got = out[name].reshape(-1)[lo:hi].to(torch.float64)
        moved = (v[-1] - v[0]).abs().max() + 1e-12
        assert (got - want).abs().max() <= 1e-5 * (want.abs().max() + moved), name
        # the backtest computes the same function (farcast_core.forecaster.forecast_rows) in float64
        backtest_says = forecast_rows(fc.A[k], fc.b[k], app, rows, v)
        assert torch.allclose(backtest_says, want, rtol=1e-12, atol=1e-12 * float(want.abs().max())), name
        # float32 application of the folded weights w (one per row): each product and each partial sum
        # rounds once, so the error is at most (rows + 1) eps sum_r |w_r| |v_r| (plus the bias's rounding)
        w = torch.from_numpy(fc.A[k][:, -1] @ interp_weights(app, rows))
        bound = (len(rows) + 1) * torch.finfo(torch.float32).eps * ((w.abs() @ v.abs()) + abs(fc.b[k, -1]))
        assert ((got - backtest_says).abs() <= bound).all(), name


def test_learning_rate_at_the_target_from_training_args_when_no_schedule_is_known(hf_long_run, tmp_path):
    """A Trainer run whose trainer_state.json logs no learning rates: ingested without pickles, no schedule is
    known. Emit with --allow-pickle still sets the optimizer's rate for step 15 from the newest step's
    training_args.bin (linear, 40 steps, lr 5e-3; read by storage.layouts.huggingface, computed by
    farcast_core's schedule formulas); without it the newest real step's rate is kept."""
    run = tmp_path / "run"
    shutil.copytree(hf_long_run, run)
    for state in run.glob("checkpoint-*/trainer_state.json"):
        s = json.loads(state.read_text())
        state.write_text(json.dumps({**s, "log_history": []}))
    ingest(run, tmp_path / "store")
    src = torch.load(run / "checkpoint-10" / "optimizer.pt", weights_only=True)
    with_args = emit(tmp_path / "store", tmp_path / "a", target_step=15, config=EmitConfig(allow_worse=True, allow_pickle=True))
    without = emit(tmp_path / "store", tmp_path / "b", target_step=15, config=ANY)
    got = torch.load(with_args.path / "optimizer.pt", weights_only=True)
    assert all(g["lr"] == pytest.approx(5e-3 * (40 - 15) / 40, rel=1e-12) for g in got["param_groups"])
    kept = torch.load(without.path / "optimizer.pt", weights_only=True)
    assert [g["lr"] for g in kept["param_groups"]] == [g["lr"] for g in src["param_groups"]]
    assert src["param_groups"][0]["lr"] != pytest.approx(5e-3 * (40 - 15) / 40)
