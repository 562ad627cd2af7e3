"""Steps saved by farcast jumps during training (pipelines/jump.py), on real training runs.

Runs (CPU, no downloads), each trained plainly and then with farcast jumps (a jump every 1/12
of the run, ratio 2, records every 1/5 of that, guard on a few held training batches):
  digits-adam   digits MLP (64-128-10, BatchNorm), Adam lr 1e-3, 600 steps, plain torch loop (TorchJumper)
  digits-sgd    the same with SGD lr 0.01, momentum 0.9
  gpt2-linear   tiny GPT-2 (2 layers, 64 wide) on Python's pydoc text with the Hugging Face Trainer and
                AdamW, lr 2e-3, 300 steps, linear decay (hf_callback; the jumps advance the schedule)
  gpt2-cosine   the same, cosine decay after 30 warm-up steps
  gpt2-wsd      the same, warmup-stable-decay (15 warm-up steps, the last 60 decaying, cosine)
  gpt2-const    the same, constant rate
  gpt2small-cosine  a GPT-2 of 3 layers, 128 wide, on 128-byte blocks (a training step costs ~0.2-0.3 s
                on the 2-core machine), lr 1e-3, 200 steps, cosine decay after 20 warm-up steps
The target loss is the held-out loss plain training reaches at its last step (evaluated every
1/60 of the run on held-out data). Printed per run and jump variant: real optimizer steps and
wall time (training + fitting + jumping, not the benchmark's own evaluations) to first reach it,
and plain / jumped; and the cost of one jump (fit + forecast + guard, seconds per jump) against
the time of 5 plain training steps (issue 13's goal: <= 1), and how much of a jump is the fit and
the forecast of the weights (fit+fc; the rest is the guard's loss evaluations and the policy). Variants: the optimizer policy at a jump (keep, reset_first, reset_all) and
forecasting or skipping normalisation and embedding parameters (or the MLP weights), advancing the schedule or not, and
re-timing the rest of the schedule after a jump (JumpConfig.retime).

    python bench/steps_saved.py [--quick] [--only gpt2-wsd,gpt2-const] [--variants "reset_all;reset_all, retime"]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from farcast.examples import DigitsMLP, digits_split, eval_loss, text_blocks, tiny_gpt2  # noqa: E402
from farcast.adapters import TorchJumper, hf_callback  # noqa: E402
from farcast.pipelines.jump import JumpConfig  # noqa: E402
from farcast_core.errors import ForecastError  # noqa: E402


def variants(every: int) -> dict[str, JumpConfig | None]:
    base = JumpConfig(every=every, record_every=max(1, every // 5))
    return {
        "plain": None,
        "keep": replace(base, optimizer="keep"),
        "reset_first": replace(base, optimizer="reset_first"),
        "reset_all": replace(base, optimizer="reset_all"),
        "reset_all, skip norm+emb": replace(base, optimizer="reset_all", skip_kinds=("norm", "embedding")),
        "reset_all, skip mlp": replace(base, optimizer="reset_all", skip=("mlp",)),
        "reset_all, no advance, skip mlp": replace(base, optimizer="reset_all", advance=False, skip=("mlp",)),
        "reset_all, no advance": replace(base, optimizer="reset_all", advance=False),
        "reset_all, verified": replace(base, optimizer="reset_all", advance_by="verified"),
        "keep, verified": replace(base, optimizer="keep", advance_by="verified"),
        "keep, no advance": replace(base, optimizer="keep", advance=False),
        "reset_all, retime": replace(base, optimizer="reset_all", retime=True),
        "keep, retime": replace(base, optimizer="keep", retime=True),
    }


def digits_run(optimizer: str, steps: int, cfg: JumpConfig | None, evals: int) -> dict:
    """A plain torch loop on digits; returns the eval history [(real steps, seconds, loss)] and jump summary."""
    train, (xv, yv) = digits_split()
    x = torch.stack([t["pixels"] for t in train])
    y = torch.stack([t["labels"] for t in train])
    torch.manual_seed(0)
    model = DigitsMLP(128)
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def guard(m):
        return torch.nn.functional.cross_entropy(m(x[:256])["logits"], y[:256])

    g = torch.Generator().manual_seed(0)
    clock = time.perf_counter()
    jumper = TorchJumper(model, opt, None, guard, cfg) if cfg else None
    step, history, paused = 0, [], 0.0
    for real in range(1, steps + 1):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = model(x[idx], y[idx])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if jumper:
            step = jumper.after_step(step)
        if real % evals == 0:
            t = time.perf_counter()
            model.eval()
            with torch.no_grad():
                history.append((real, t - clock - paused, float(model(xv, yv)["loss"])))
            model.train()
            paused += time.perf_counter() - t
    summary = jumper.summary() if jumper else None
    if jumper:
        jumper.close()
    return {"history": history, "jumps": summary, "final_step": step}


SCHEDULES = {  # lr_scheduler_type, warm-up fraction, lr_scheduler_kwargs (decay fraction for WSD)
    "linear": ("linear", 0.0, {}),
    "cosine": ("cosine", 0.1, {}),
    "wsd": ("warmup_stable_decay", 0.05, {"decay": 0.2}),
    "const": ("constant", 0.0, {}),
}


def gpt2_run(out: Path, steps: int, cfg: JumpConfig | None, evals: int, schedule: str = "linear",
             size: str = "tiny") -> dict:
    """The Trainer with AdamW on pydoc text (``schedule``: a key of SCHEDULES); evaluation by a callback
    after the jump callback. size "tiny": 2 layers 64 wide, 64-byte blocks; "small": 3 layers 128 wide,
    128-byte blocks (a training step of >= 100 ms on the 2-core machine)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    seq = 64 if size == "tiny" else 128
    blocks = text_blocks(seq=seq)
    held, train_blocks = blocks[:64], blocks[64:]
    ds = [{"input_ids": b, "labels": b} for b in train_blocks]
    guard_batches = [{"input_ids": train_blocks[i : i + 16], "labels": train_blocks[i : i + 16]} for i in (0, 16)]

    class Evaluate(TrainerCallback):
        def __init__(self):
            self.real, self.history, self.paused, self.clock = 0, [], 0.0, None

        def on_train_begin(self, args, state, control, **kw):
            self.clock = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            self.real += 1
            if self.real % evals == 0 or control.should_training_stop or state.global_step >= state.max_steps:
                t = time.perf_counter()
                self.history.append((self.real, t - self.clock - self.paused, eval_loss(model, held)))
                self.paused += time.perf_counter() - t

    model = tiny_gpt2() if size == "tiny" else tiny_gpt2(seq=seq, width=128, layers=3)
    kind, warm, kw = SCHEDULES[schedule]
    kw = {"num_decay_steps": int(kw["decay"] * steps)} if "decay" in kw else {}
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=16,
        learning_rate=2e-3 if size == "tiny" else 1e-3, lr_scheduler_type=kind, lr_scheduler_kwargs=kw,
        warmup_steps=int(warm * steps), report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0, data_seed=0,
    )
    jump = hf_callback(cfg, guard_batches=guard_batches) if cfg else None
    ev = Evaluate()
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[c for c in (jump, ev) if c])
    trainer.train()
    return {"history": ev.history, "jumps": getattr(jump, "summary", None), "final_step": trainer.state.global_step}


def reach(history, goal: float):
    """(real steps, seconds) at the first evaluation at or below ``goal``, or None."""
    return next(((r, s) for r, s, loss in history if loss <= goal), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="half-length runs (a smoke check)")
    ap.add_argument("--only", help="comma-separated runs to run (digits-adam, digits-sgd, gpt2-linear, gpt2-cosine, "
                                   "gpt2-wsd, gpt2-const, gpt2small-cosine)")
    ap.add_argument("--variants", help="variant names to run, separated by semicolons (plain always runs)")
    ap.add_argument("--work", default=str(REPO / "bench" / "out" / "steps_saved"))
    args = ap.parse_args()
    k = 2 if args.quick else 1
    runs = {
        "digits-adam": (600 // k, lambda cfg, n: digits_run("adam", n, cfg, 10 // k)),
        "digits-sgd": (600 // k, lambda cfg, n: digits_run("sgd", n, cfg, 10 // k)),
        **{f"gpt2-{sched}": (300 // k, lambda cfg, n, sched=sched: gpt2_run(Path(args.work) / "gpt2", n, cfg,
                                                                            5 // k or 1, sched))
           for sched in SCHEDULES},
        "gpt2small-cosine": (200 // k, lambda cfg, n: gpt2_run(Path(args.work) / "gpt2", n, cfg, 5 // k or 1, "cosine",
                                                               "small")),
    }
    if args.only:
        runs = {n: runs[n] for n in args.only.split(",")}
    print("steps saved by farcast jumps: real optimizer steps (and wall seconds) to reach the loss plain "
          "training reaches at its last step; ratio = plain / jumped")
    results = []
    for name, (steps, train) in runs.items():
        print(f"\n== {name}: {steps} steps, a jump every {steps // 12} steps")
        print(f"{'variant':<26} {'steps':>6} {'ratio':>6} {'seconds':>8} {'ratio':>6} {'final loss':>10} "
              f"{'jumps':>7} {'jump s':>7} {'s/jump':>7} {'/5 steps':>8} {'fit+fc':>7}  accepted jumps (step -> target, fraction)")
        goal = plain = step_s = None
        train(None, max(10, steps // 10))  # warm-up: first-call costs must not count against the plain run
        chosen = variants(steps // 12)
        if args.variants:
            keep = {"plain", *(v.strip() for v in args.variants.split(";"))}
            chosen = {k: v for k, v in chosen.items() if k in keep}
        for vname, cfg in chosen.items():
            try:
                r = train(cfg, steps)
            except ForecastError as e:  # e.g. retime on a loop without a LambdaLR schedule
                print(f"{vname:<26} not run: {e}")
                continue
            if goal is None:
                goal = r["history"][-1][2]
                plain = reach(r["history"], goal)
                step_s = r["history"][-1][1] / r["history"][-1][0]  # one plain training step, seconds
            hit = reach(r["history"], goal)
            j = r["jumps"]
            taken = [(x["step"], x["target"], x["fraction"]) for x in (j["jumps"] if j else []) if x["accepted"]]
            jumps = f"{j['accepted']}/{len(j['jumps'])}" if j else "-"
            js = f"{j['seconds']:.1f}" if j else "-"
            # the cost of one jump (fit + forecast + guard) against 5 plain training steps (goal <= 1)
            per = j["seconds"] / len(j["jumps"]) if j and j["jumps"] else None
            # of which the fit and the forecast of the weights (the rest: the guard's evaluations, the policy)
            fc = sum(x["forecast_seconds"] for x in j["jumps"]) / len(j["jumps"]) if per else None
            js += f" {per:>7.3f} {per / (5 * step_s):>8.2f} {fc:>7.3f}" if per else f" {'-':>7} {'-':>8} {'-':>7}"
            if hit:
                sr, tr = plain[0] / hit[0], plain[1] / hit[1]
                cells = f"{hit[0]:>6} {sr:>6.2f} {hit[1]:>8.1f} {tr:>6.2f}"
            else:
                sr = tr = None
                cells = f"{'never':>6} {'-':>6} {'-':>8} {'-':>6}"
            print(f"{vname:<26} {cells} {r['history'][-1][2]:>10.4f} {jumps:>7} {js:>7}  {taken[:6]}")
            results.append((name, vname, sr, tr))
    print("\n== summary: step ratio per variant (goal of issue 14: >= 1.5 on every run, >= 2 on the constant-rate "
          "and warmup-stable-decay runs)")
    for vname in variants(12):
        rows = [(n, s) for n, v, s, _ in results if v == vname]
        if vname == "plain" or not rows:  # not run (--variants)
            continue
        ok = all(s is not None and s >= (2 if n.split("-")[-1] in ("adam", "sgd", "const", "wsd")
                                                        else 1.5) for n, s in rows)
        print(f"{vname:<26} " + ", ".join(f"{n} {s:.2f}x" if s else f"{n} never" for n, s in rows)
              + f"   goal {'met' if ok else 'not met'}")


if __name__ == "__main__":
    main()
