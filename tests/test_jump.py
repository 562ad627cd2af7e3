"""Farcast jumps during training: the Jumper, the guard, optimizer policies, and the three adapters."""

import pytest
import torch

from farcast_core.errors import ForecastError
from farcast.examples import DigitsMLP, digits_split
from farcast.adapters import TorchJumper, hf_callback, lightning_callback
from farcast.pipelines.jump import JumpConfig, Jumper, reset_optimizer
from farcast.storage.store import MemoryRunStore, RunStore
from tests.conftest import tiny_gpt2, token_data

NO_GUARD = dict(guard=False, every=10, record_every=5)


@pytest.mark.parametrize("history", ["disk", "memory"])
def test_forecast_of_a_linear_trajectory_is_exact(tmp_path, history):
    j = Jumper(JumpConfig(ratio=2.0, history=history), store_dir=tmp_path)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 7, generator=g), torch.randn(300, 7, generator=g)
    for s in range(0, 51, 10):
        j.record(s, {"w": a + b * s})
    target, new = j.forecast()
    assert target == 100
    assert torch.allclose(new["w"], a + b * 100, rtol=1e-4, atol=1e-4)
    j.record(30, {"w": a})  # not after the newest: ignored
    assert j.store.steps == [0, 10, 20, 30, 40, 50]
    if history == "memory":
        assert isinstance(j.store, MemoryRunStore) and j.dir is None and not any(tmp_path.iterdir())
    else:
        assert (tmp_path / "history" / "zarr.json").is_file()


def test_a_jumps_fit_runs_with_numpys_blas_on_one_thread_and_restores_it(monkeypatch):
    """In a training process BLAS's threads contend with torch's: a jump fits with numpy's BLAS on one
    thread (threadpoolctl) and gives the setting back afterwards."""
    from threadpoolctl import ThreadpoolController

    import farcast.pipelines.jump as J

    def blas_threads():
        return [lib["num_threads"] for lib in ThreadpoolController().info() if lib["user_api"] == "blas"]

    fit_store, during = J.fit_store, []
    monkeypatch.setattr(J, "fit_store", lambda *a, **k: during.append(blas_threads()) or fit_store(*a, **k))
    before = blas_threads()
    j = Jumper(JumpConfig(ratio=2.0))
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 7, generator=g), torch.randn(300, 7, generator=g)
    for s in range(0, 51, 10):
        j.record(s, {"w": a + b * s})
    j.forecast()
    assert before and during == [[1] * len(before)] and blas_threads() == before


def test_memory_and_disk_histories_give_the_same_jumps(tmp_path):
    """The in-memory history (numpy) stands in for the Zarr store: the same records, forecasts and jumps,
    bit for bit, on a real training loop (and "auto" picks memory for a model this small)."""
    runs = {}
    for history in ("disk", "memory", "auto"):
        cfg = JumpConfig(history=history, **NO_GUARD)
        model, _, _, jumper, step = digits_loop(cfg, tmp_path / history if history == "disk" else None)
        runs[history] = (step, [(j.step, j.target, j.accepted) for j in jumper.jumper.jumps],
                         {n: p.detach().clone() for n, p in model.named_parameters()}, type(jumper.jumper.store))
        jumper.close()
    assert runs["disk"][3] is RunStore and runs["memory"][3] is MemoryRunStore and runs["auto"][3] is MemoryRunStore
    assert runs["disk"][1] and any(accepted for _, _, accepted in runs["disk"][1])
    for history in ("memory", "auto"):
        assert runs[history][:2] == runs["disk"][:2]
        assert all(torch.equal(runs[history][2][n], w) for n, w in runs["disk"][2].items())


def digits_loop(cfg, store_dir, steps=60, optimizer="adam", scheduler=None, loss_fn=None):
    train, _ = digits_split()
    x = torch.stack([t["pixels"] for t in train])
    y = torch.stack([t["labels"] for t in train])
    torch.manual_seed(0)
    model = DigitsMLP(16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3) if optimizer == "adam" else torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9)
    sched = scheduler(opt) if scheduler else None
    loss_fn = loss_fn or (lambda m: torch.nn.functional.cross_entropy(m(x[:128])["logits"], y[:128]))
    jumper = TorchJumper(model, opt, sched, loss_fn, cfg, total_steps=steps * 4 if sched else None, store_dir=store_dir)
    g = torch.Generator().manual_seed(0)
    step, real = 0, 0
    while real < steps:
        idx = torch.randint(0, len(x), (32,), generator=g)
        model(x[idx], y[idx])["loss"].backward()
        opt.step()
        opt.zero_grad()
        if sched:
            sched.step()
        step, real = jumper.after_step(step + 1), real + 1
    return model, opt, sched, jumper, step


def test_torch_jumps_advance_the_step_and_the_schedule(tmp_path):
    lam = lambda s: max(0.0, 1 - s / 240)  # noqa: E731  linear decay over 240 steps
    model, opt, sched, jumper, step = digits_loop(
        JumpConfig(**NO_GUARD), tmp_path, scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lam))
    s = jumper.summary()
    taken = [j for j in s["jumps"] if j["accepted"]]
    assert taken and s["axis"]["name"] == "lr" and s["axis"]["schedule"]["name"] == "tabulated"
    assert step > 60  # fewer real steps than the global step count
    assert sched.last_epoch == step  # the schedule continues from the jumped step
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * lam(step))
    # each accepted jump is in the history at its target
    assert all(j["target"] in jumper.jumper.store.steps for j in taken)


def test_retimed_jumps_resume_at_the_jump_start_rate_and_keep_the_annealing(tmp_path):
    """retime: after a jump from s to t the rest of the schedule as it stood at s runs compressed into
    the steps left, so the rate right after the jump is s's (not t's lower one), it still anneals to 0
    at the end, and each jump leaves at least ``anneal`` of the steps that were left."""
    total = 320  # digits_loop's total_steps: 4 x its real steps
    lam = lambda s: max(0.0, 1 - s / total)  # noqa: E731
    cfg = JumpConfig(**NO_GUARD, retime=True, anneal=0.5)
    model, opt, sched, jumper, step = digits_loop(
        cfg, tmp_path, steps=80, scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lam))
    taken = [j for j in jumper.summary()["jumps"] if j["accepted"]]
    assert taken
    first = taken[0]
    s, t = first["step"], first["target"]
    assert t > s and t <= total - 0.5 * (total - s)  # the annealing cap
    rt = jumper.jumper.retimer
    assert rt.position(t) == s  # the schedule resumes where it stood at the jump
    assert rt.position(total) == total  # and still ends at its end: rate 0
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * lam(rt.position(step)))
    assert lam(rt.position(step)) > lam(step)  # higher than the plain advance's rate at this step
    # the jumper's time axis counts the re-timed rates after the jump, the original ones before it
    axis = jumper.jumper.axis
    assert axis.schedule.options["table"][: t] == [lam(g) for g in range(t)]
    assert axis.schedule.options["table"][t + 1] == pytest.approx(lam(rt.position(t + 1)))


def test_retime_needs_a_lambda_schedule():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ForecastError, match="LambdaLR"):
        TorchJumper(model, opt, torch.optim.lr_scheduler.StepLR(opt, 10), None, JumpConfig(retime=True), total_steps=50)


def _drifting(cfg: JumpConfig, tmp_path):
    """(Jumper, model): a digits MLP whose weights drifted by 0.01 per record, recorded at steps 0..30,
    its Jumper at real step 30 (a jump is due)."""
    j = Jumper(cfg, store_dir=tmp_path)
    model = DigitsMLP(8)
    with torch.no_grad():
        for s in range(0, 31, 5):
            for p in model.parameters():
                p.add_(0.01)
            j.record(s, j.params(model))
    j.real_steps = 30
    return j, model


def test_the_guard_rejects_a_worse_forecast_and_restores_the_weights(tmp_path):
    j, model = _drifting(JumpConfig(every=10, record_every=5, backtrack=(1.0, 0.5)), tmp_path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {}

    def guarded(m):  # a guard loss only the pre-jump weights minimise: every jump is worse
        w = m.net[0].weight.detach()
        if "ref" not in state:
            state["ref"] = w.clone()
        return float((w - state["ref"]).abs().sum())

    assert j.try_jump(model, 30, guarded) is None
    rec = j.jumps[-1]
    assert not rec.accepted and rec.loss_after > rec.loss_before and "higher" in rec.reason
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert j.store.steps[-1] == 30  # nothing recorded


@pytest.mark.parametrize("worse,advance_by", [(True, "target"), (False, "target"), (False, "verified")])
def test_the_guard_evaluates_in_eval_mode_without_gradients_and_restores_training(tmp_path, worse, advance_by):
    """Every loss the guard evaluates (before, after each backtracking step, the verified advance's
    records) sees the model in eval mode (BatchNorm's running statistics) without gradients; the
    model is back in training mode after the jump, taken or rejected."""
    j, model = _drifting(JumpConfig(every=10, record_every=5, backtrack=(1.0, 0.5), advance_by=advance_by), tmp_path)
    seen, state = [], {}

    def guarded(m):
        seen.append((m.training, torch.is_grad_enabled()))
        w = m.net[0].weight.detach()
        state.setdefault("ref", w.clone())
        return float((w - state["ref"]).abs().sum()) * (1 if worse else -1)

    model.train()
    taken = j.try_jump(model, 30, guarded)
    assert (taken is None) == worse and len(seen) >= 2 + (advance_by == "verified")
    assert seen == [(False, False)] * len(seen)
    assert model.training and all(m.training for m in model.modules())


def test_optimizer_policies():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    reset_optimizer(opt, [p], "reset_first")
    assert torch.equal(opt.state[p]["exp_avg"], torch.zeros(3)) and opt.state[p]["exp_avg_sq"].abs().sum() > 0
    reset_optimizer(opt, [p], "reset_all")
    assert p not in opt.state or not opt.state[p]
    sgd = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    sgd.step()
    reset_optimizer(sgd, [p], "reset_first")
    assert torch.equal(sgd.state[p]["momentum_buffer"], torch.zeros(3))
    with pytest.raises(ForecastError, match="optimizer policy"):
        JumpConfig(optimizer="zero")
    with pytest.raises(ForecastError, match="skip_kinds"):
        JumpConfig(skip_kinds=("conv",))


def test_skipped_norm_parameters_are_not_forecast(tmp_path):
    model, _, _, jumper, step = digits_loop(JumpConfig(skip_kinds=("norm",), **NO_GUARD), tmp_path)
    assert "net.1.weight" not in jumper.jumper.store.tensors and "net.0.weight" in jumper.jumper.store.tensors
    assert any(j["accepted"] for j in jumper.summary()["jumps"])


@pytest.mark.parametrize("retime", [False, True])
def test_hugging_face_callback_jumps_the_trainer(tmp_path, retime):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Count(TrainerCallback):
        real = 0
        rates = []

        def on_step_end(self, args, state, control, lr_scheduler=None, **kw):
            Count.real += 1
            Count.rates.append((state.global_step, lr_scheduler.get_last_lr()[0]))

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=60, per_device_train_batch_size=8, learning_rate=5e-3,
                             lr_scheduler_type="linear", report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    jump = hf_callback(JumpConfig(**NO_GUARD, retime=retime), store_dir=tmp_path / "history")
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=token_data(), callbacks=[jump, Count()])
    trainer.train()
    taken = [j for j in jump.summary["jumps"] if j["accepted"]]
    assert taken and jump.summary["axis"]["name"] == "lr"
    assert trainer.state.global_step == 60 and Count.real < 60  # the jumps saved real steps
    assert trainer.lr_scheduler.last_epoch == 60  # the schedule was advanced with the step count
    # the rate after the first jump: the target's on the linear schedule, or (retime) the jump start's
    s, t = taken[0]["step"], taken[0]["target"]
    if not retime:  # here the first jump reaches the schedule's end (ratio 2 of the rate's area is past it)
        assert t == 60
        return
    assert t <= 60 - 0.25 * (60 - s)  # a re-timed jump leaves steps to anneal in
    g, after = next((g, lr) for g, lr in Count.rates if g > t)
    # the rest of the schedule as it stood at s, compressed into the steps left: a higher rate than t's
    assert after == pytest.approx(5e-3 * (1 - round(s + (g - t) * (60 - s) / (60 - t)) / 60)) and after > 5e-3 * (1 - g / 60)


def test_lightning_callback_jumps_the_trainer(tmp_path):
    import lightning as L

    from tests.conftest import LitNet, digits_loader

    class Count(L.Callback):
        real = 0

        def on_train_batch_end(self, *a):
            Count.real += 1

    jump = lightning_callback(JumpConfig(**NO_GUARD), store_dir=tmp_path / "history")
    trainer = L.Trainer(max_steps=50, callbacks=[jump, Count()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=str(tmp_path))
    trainer.fit(LitNet(), digits_loader())
    assert any(j["accepted"] for j in jump.summary["jumps"])
    assert trainer.global_step == 50 and Count.real < 50
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 50


@pytest.mark.parametrize("advance_by, saturate, expected", [("target", None, 80), ("verified", None, 80),
                                                            ("verified", 0.6, 60), ("verified", 0.4, 40)])
def test_verified_advance_moves_the_step_only_as_far_as_the_loss_went(tmp_path, advance_by, saturate, expected):
    """Weights moving on a straight line (exactly forecast: step 40 -> 80 at ratio 2) under a loss that falls
    with them, linearly, or only until the weights reach 0.6 (step 60) or 0.4 (step 40, no progress past
    the newest step): "verified" advances the step to where the recorded losses' line reaches the loss
    after the jump; "target" to the forecast's step whatever the loss did."""
    model = torch.nn.Linear(4, 1, bias=False)

    def loss_fn(m):  # falls as the weights grow (a saturating loss stops falling at ``saturate``)
        w = m.weight.mean()
        return -(w if saturate is None else torch.clamp(w, max=saturate))

    cfg = JumpConfig(ratio=2.0, advance_by=advance_by, optimizer="keep", backtrack=(1.0,), history="memory")
    j = Jumper(cfg)
    for s in range(0, 41, 10):
        with torch.no_grad():
            model.weight.fill_(s / 100)
        j.record(s, j.params(model))
    target = j.try_jump(model, 40, loss_fn)
    rec = j.jumps[-1]
    assert rec.accepted and torch.allclose(model.weight, torch.full((1, 4), 0.8), atol=1e-4)
    assert target == expected == rec.target
