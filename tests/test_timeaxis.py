"""Time measured in cumulative learning rate: the ODE, schedules read from real checkpoints, refusals."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from farcast_core.errors import ForecastError
from farcast_core.forecaster import FitConfig
from farcast_core.schedules import Schedule
from farcast_core.series import forecast_series
from farcast_core.timeaxis import choose, from_facts
from farcast.flows.cli import main
from farcast.pipelines.backtest import backtest, format_table
from farcast.pipelines.emit import EmitConfig, emit
from farcast.pipelines.fit import resolve_target, time_axis
from farcast.pipelines.ingest import ingest
from farcast.storage.checkpoints import discover
from farcast.storage.schedules import read_schedule_facts
from farcast.storage.store import RunStore
from farcast.storage.writers import save_safetensors
from tests.conftest import tiny_gpt2, token_data
from tests.test_emit import StopAt

ANY = EmitConfig(allow_worse=True)


def gd_run(schedule: Schedule, curvature=0.005, params=3000, until=200, every=20):
    """Real gradient descent on a quadratic, w <- w - lr(k) c (w - w*): the ODE w' = -lr(t) c (w - w*)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(params, generator=g, dtype=torch.float64)
    target = torch.randn(params, generator=g, dtype=torch.float64)
    lr = schedule.lr(np.arange(schedule.total))
    traj = [w.clone()]
    for k in range(schedule.total):
        w = w - lr[k] * curvature * (w - target)
        traj.append(w.clone())
    steps = list(range(0, until + 1, every))
    return steps, torch.stack([traj[s] for s in steps]), traj


@pytest.mark.parametrize("name, warmup", [("linear", 0), ("cosine", 20)])
def test_the_ode_under_a_decaying_schedule_is_forecast_on_the_lr_axis(name, warmup):
    sched = Schedule(name, 1.0, warmup, 400)
    steps, W, traj = gd_run(sched)
    truth = traj[400]  # the end of training, from step 200: ratio 2 in steps
    moved = (W[-1] - truth).abs().mean().item()
    err, default = {}, {}
    for axis, times in (("steps", np.array(steps, float)), ("lr", sched.tau(steps))):
        T = 400.0 if axis == "steps" else sched.tau([400])[0]
        rho = (T - times[0]) / (times[-1] - times[0])
        # the axis alone: every calibration cut alike (the default weights the later cuts more, which
        # also rescues the steps axis here: measured 0.13% for the linear schedule, 4.6% for the cosine)
        err[axis] = (forecast_series(W, times, rho, FitConfig(recency=0.0)) - truth).abs().mean().item() / moved
        default[axis] = (forecast_series(W, times, rho) - truth).abs().mean().item() / moved
    assert err["lr"] < 0.02, err  # measured 0.4% (linear) and 1.2% (cosine) of persistence's error
    assert err["steps"] > 5 * err["lr"] and err["steps"] > 0.05, err  # measured 6.9% and 24%
    assert default["lr"] < 0.02, default  # measured 1.6% (linear) and 1.5% (cosine)


def test_a_stated_schedule_drives_fit_backtest_and_emit(tmp_path):
    """End to end on files: the stated schedule, a target at the schedule's end, both axes reported."""
    sched = Schedule("cosine", 1.0, 20, 400)
    steps, W, traj = gd_run(sched)
    run = tmp_path / "run"
    for s, w in zip(steps, W):
        save_safetensors({"w": w.to(torch.float32).reshape(60, 50)}, run / f"step_{s:05d}.safetensors")
    ingest(run, tmp_path / "store")
    cfg = FitConfig(schedule={"name": "cosine", "warmup": 20, "total": 400})
    axis = time_axis(RunStore.open(tmp_path / "store"), cfg)
    assert axis.name == "lr" and axis.source == "the stated schedule"
    assert resolve_target(steps, 400, None, axis)[1] == 400

    report = backtest(tmp_path / "store", target_step=400, config=cfg)
    assert report["axis"]["name"] == "lr" and set(report["axes"]) == {"lr", "steps"}
    lr, st = report["axes"]["lr"], report["axes"]["steps"]
    # measured: 0.0047 vs 0.0073 x persistence (fitted up to step 160, forecast 200); with every cut alike
    # and no shrinkage 0.00013 vs 0.055 (the test above compares the axes so); the shrinkage chose
    # alpha 0.996 on this exact path, which is most of the lr axis's 0.0047
    assert lr["farcast_vs_persistence"] < 0.01 and st["farcast_vs_persistence"] > lr["farcast_vs_persistence"]
    table = format_table(report)
    assert "time axis: lr" in table and "MAE lr" in table and "MAE steps" in table

    r = emit(tmp_path / "store", tmp_path / "out", target_step=400, fit_config=cfg, config=ANY)
    assert r.path.name == "step_00400.safetensors"
    from safetensors import safe_open

    with safe_open(str(r.path), "pt") as f:
        got = f.get_tensor("w").reshape(-1).double()
        meta = json.loads(f.metadata()["farcast"])
    assert meta["axis"]["name"] == "lr" and meta["axis"]["schedule"]["name"] == "cosine"
    assert 0 <= meta["shrink"]["alpha"] <= 1 and meta["shrink"]["chosen"].startswith("backtest: fitted on steps up to")
    assert meta["config"]["shrink"] == "auto" and meta["config"]["recency"] == 2.0
    truth = traj[400]
    assert (got - truth).abs().mean() < 0.05 * (W[-1] - truth).abs().mean()


# ------------------------------------------------------------------ schedules read from real runs


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory):
    """Trainer: cosine with 5 warm-up steps over 30, lr 5e-3, logging every 3 steps, stopped at 20."""
    from transformers import Trainer, TrainingArguments

    out = tmp_path_factory.mktemp("cosine") / "out"
    model = tiny_gpt2()
    model.save_pretrained(out / "checkpoint-0")
    args = TrainingArguments(
        output_dir=str(out), max_steps=30, save_steps=4, per_device_train_batch_size=8, learning_rate=5e-3,
        lr_scheduler_type="cosine", warmup_steps=5, report_to=[], use_cpu=True, logging_steps=3, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=token_data(), callbacks=[StopAt(20)]).train()
    return out


def test_schedule_inferred_from_a_real_trainer_state(cosine_run, tmp_path):
    ingest(cosine_run, tmp_path / "store")
    store = RunStore.open(tmp_path / "store")
    assert store.schedule["format"] == "hf" and store.schedule["max_steps"] == 30
    axis = time_axis(store, FitConfig())
    s = axis.schedule
    assert axis.name == "lr" and "trainer_state.json" in axis.source
    assert (s.name, s.warmup, s.total) == ("cosine", 5, 30) and s.peak_lr == pytest.approx(5e-3)
    # the inferred schedule reproduces every learning rate the Trainer logged (step k used lr(k - 1))
    state = json.loads((cosine_run / "checkpoint-20" / "trainer_state.json").read_text())
    logged = [(h["step"], h["learning_rate"]) for h in state["log_history"] if "learning_rate" in h]
    assert len(logged) >= 6
    for k, lr in logged:
        assert s.lr([k - 1])[0] == pytest.approx(lr, rel=1e-9)

    # ingest recorded that reading of the facts: a fit reuses it rather than inferring again, and
    # facts that differ from the ones it read are inferred afresh
    import farcast_core.timeaxis as ta

    assert store.schedule_reading["facts"] == ta.facts_key(store.schedule)
    real, calls = ta.from_facts, []
    ta.from_facts = lambda f: calls.append(f) or real(f)
    try:
        assert time_axis(store, FitConfig()).schedule == s and not calls
        changed = {k: v for k, v in store.schedule.items() if k != "base_lrs"}
        assert ta.choose("auto", None, changed, store.schedule_reading).schedule == s and len(calls) == 1
    finally:
        ta.from_facts = real

    # without scheduler.pt (save_only_model) the logs alone still pin it down
    facts = dict(store.schedule)
    for key in ("base_lrs", "last_lr", "last_epoch"):
        facts.pop(key)
    alone = from_facts(facts)[0]
    assert (alone.name, alone.warmup, alone.total) == ("cosine", 5, 30) and alone.peak_lr == pytest.approx(5e-3)


def test_training_args_are_read_only_when_pickles_are_allowed(cosine_run):
    ckpt = [c for c in discover(cosine_run).checkpoints if c.step == 20][0]
    assert "training_args" not in read_schedule_facts(ckpt, allow_pickle=False)
    args = read_schedule_facts(ckpt, allow_pickle=True)["training_args"]
    assert args["lr_scheduler_type"] == "cosine" and args["warmup_steps"] == 5 and args["max_steps"] == 30
    s, source, _ = from_facts(read_schedule_facts(ckpt, allow_pickle=True))
    assert source == "training_args.bin" and (s.name, s.warmup, s.total) == ("cosine", 5, 30)


def test_forecasting_the_end_of_training_and_refusing_past_it(cosine_run, tmp_path):
    ingest(cosine_run, tmp_path / "store")
    with pytest.raises(ForecastError, match="last step is 30"):
        emit(tmp_path / "store", tmp_path / "out", target_step=31, config=ANY)
    with pytest.raises(ForecastError, match="beyond the learning-rate schedule's end: its last step is 30"):
        emit(tmp_path / "store", tmp_path / "out", ratio=5.0, config=ANY)
    assert not (tmp_path / "out").exists()
    r = emit(tmp_path / "store", tmp_path / "out", target_step=30, config=ANY)
    assert r.path.name == "checkpoint-30"
    assert json.loads((r.path / "trainer_state.json").read_text())["global_step"] == 30
    sched = torch.load(r.path / "scheduler.pt", weights_only=True)
    assert sched["last_epoch"] == 30 and sched["_last_lr"] == [0.0, 0.0]  # cosine ends at 0
    assert "lr" in r.backtest["axes"]


def test_a_ratio_landing_exactly_on_the_schedule_end():
    """Constant rate, 400 steps, seen to 200, ratio 2: step 400 (tau rounds a hair past tau(400))."""
    axis = choose("auto", {"name": "constant", "peak_lr": 3e-4, "total": 400}, None)
    steps = list(range(0, 201, 20))
    assert resolve_target(steps, None, 2.0, axis) == (pytest.approx(2.0), 400)


def test_ambiguous_or_missing_logs_fall_back_to_steps_and_say_why():
    # one logged rate cannot tell a schedule
    axis = choose("auto", None, {"format": "hf", "logged": [[10, 1e-3]], "max_steps": 100})
    assert axis.name == "steps" and "fewer than two learning rates" in axis.note
    # two points on a constant rate fit constant and a warm-up that ended before them: same ahead -> accepted
    axis = choose("auto", None, {"format": "hf", "logged": [[50, 1e-3], [100, 1e-3]], "max_steps": 200})
    assert axis.name == "lr" and axis.schedule.name == "constant"
    # no facts at all
    axis = choose("auto", None, None)
    assert axis.name == "steps" and "no learning rates" in axis.note
    with pytest.raises(ForecastError, match="--axis lr needs the learning-rate schedule"):
        choose("lr", None, None)
    with pytest.raises(ForecastError, match="unknown learning-rate schedule 'cosinus'"):
        choose("auto", {"name": "cosinus", "total": 10}, None)
    with pytest.raises(ForecastError, match="needs the run's total steps"):
        choose("auto", {"name": "linear"}, None)


@pytest.mark.parametrize(
    "make",
    [
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50, eta_min=0.0),
        lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=40),
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.97),
    ],
)
def test_torch_scheduler_state_in_a_checkpoint_file(make, tmp_path):
    """What Lightning saves: per-step scheduler states in the .ckpt; the schedule read back matches torch."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.05}], lr=0.1)
    sched = make(opt)
    lrs = []
    for _ in range(25):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    torch.save({"state_dict": model.state_dict(), "global_step": 25, "lr_schedulers": [sched.state_dict()]},
               tmp_path / "epoch=0-step=25.ckpt")
    torch.save({"state_dict": model.state_dict(), "global_step": 0}, tmp_path / "epoch=0-step=0.ckpt")
    ckpt = discover(tmp_path).checkpoints[-1]
    s, source, why = from_facts(read_schedule_facts(ckpt))
    assert s is not None, why
    assert "torch" in source
    ahead = []
    for _ in range(25):
        ahead.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(s.lr(np.arange(50)), lrs + ahead, rtol=1e-9)


def test_lambda_schedulers_are_unknown(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
    torch.save({"state_dict": model.state_dict(), "global_step": 0, "lr_schedulers": [sched.state_dict()]},
               tmp_path / "epoch=0-step=0.ckpt")
    ckpt = discover(tmp_path).checkpoints[0]
    s, _, why = from_facts(read_schedule_facts(ckpt))
    assert s is None and "LambdaLR" in why


def test_cli_axis_options(cosine_run, tmp_path):
    runner = CliRunner()
    ingest(cosine_run, tmp_path / "store")
    store = str(tmp_path / "store")
    r = runner.invoke(main, ["backtest", store, "--target-step", "28"])
    assert r.exit_code == 0, r.output
    assert "time axis: lr (cumulative learning rate; cosine" in r.output and "MAE steps" in r.output
    r = runner.invoke(main, ["backtest", store, "--target-step", "28", "--axis", "steps", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["axis"]["name"] == "steps"
    r = runner.invoke(main, ["backtest", store, "--target-step", "28", "--schedule", "cosinus", "--total-steps", "30"])
    assert r.exit_code == 2 and "unknown learning-rate schedule 'cosinus'" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["emit", store, "--target-step", "45", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "last step is 30" in r.output
    r = runner.invoke(main, ["fit", store, "--target-step", "30", "--schedule", "linear", "--total-steps", "30"])
    assert r.exit_code == 0, r.output
    assert "linear" in r.output and "the stated schedule" in r.output
    assert "peak lr not stated" in r.output and "peak lr 1," not in r.output  # no made-up peak rate
    r = runner.invoke(main, ["fit", store, "--target-step", "30", "--schedule", "linear", "--total-steps", "30",
                             "--peak-lr", "3e-4", "--force"])
    assert r.exit_code == 0 and "peak lr 0.0003" in r.output


def test_lr_axis_refused_when_the_run_records_no_schedule(tmp_path):
    run = tmp_path / "run"
    for s in range(0, 50, 10):
        save_safetensors({"w": torch.full((4,), float(s))}, run / f"step_{s}.safetensors")
    ingest(run, tmp_path / "store")
    r = CliRunner().invoke(main, ["backtest", str(tmp_path / "store"), "--ratio", "1.3", "--axis", "lr"])
    assert r.exit_code == 2 and "--schedule NAME --total-steps N" in r.output
    shutil.rmtree(run)
