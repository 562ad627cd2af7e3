"""Fit cost against ingest cost on the same run, with where the fit's time goes and its memory.

Runs (made here, no downloads):
  trainer   a small DistilBERT (masked LM) trained for real with the Hugging Face Trainer and AdamW,
            scheduled for 600 steps (linear decay), observed to step 300: a checkpoint every 25 (13)
  12M, 50M  a 12M- and a 50M-parameter two-layer MLP trained with Adam on a cheap regression
            objective, 13 checkpoints (about 0.6 and 2.6 GB on disk; --no-big skips them)

Each stage runs in a fresh process, timed after its imports: ingest of the run, then the fit of
the end of training, step 600 (what `farcast fit --target-step 600` runs; the 50M run: ratio 2)
with its time split into planning, reading + pairing the sampled rows, reducing them to second
moments, solving, saving, and the rest (opening the store, the time axis, the shrinkage's backtest,
checks), and its peak RSS above the process's RSS before the fit (imports excluded). Each stage runs
--repeat times (3) and the median is printed: ingest of the small run varies 1-3 s on this shared
machine. Printed: fit / ingest (goal <= 0.1x) and the split.

Then the same two stages as a user runs them, `farcast ingest RUN --store S` and `farcast fit S ...`,
timed whole (Python's start, the imports, the work) with each command's peak RSS: on the CPU the fit
does not import torch (~3 s and ~220 MiB on this machine), so the command costs its imports
(zarr, numpy, safetensors: ~0.8 s) plus the fit.

    python bench/fit_cost.py [--no-big] [--device cpu|cuda|auto] [--work DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from statistics import median
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def trainer_run(out: Path) -> Path:
    """A DistilBERT masked LM (about 0.5M parameters) trained with the Trainer on byte tokens."""
    import os

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import DistilBertConfig, DistilBertForMaskedLM, Trainer, TrainerCallback, TrainingArguments

    from farcast.examples import text_blocks

    blocks = text_blocks(seq=64)
    g = torch.Generator().manual_seed(0)
    data = []
    for b in blocks[:2000]:
        labels = b.clone()
        masked = torch.rand(len(b), generator=g) < 0.15
        labels[~masked] = -100
        ids = b.clone()
        ids[masked] = 1
        data.append({"input_ids": ids, "labels": labels})
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=256, max_position_embeddings=64, dim=96, n_layers=3,
                                                   n_heads=4, hidden_dim=256))
    model.save_pretrained(out / "checkpoint-0")
    args = TrainingArguments(output_dir=str(out), max_steps=600, save_steps=25, per_device_train_batch_size=16,
                             learning_rate=5e-4, report_to=[], use_cpu=True, logging_steps=25, disable_tqdm=True,
                             save_only_model=True, seed=0)

    class StopAt300(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            control.should_training_stop = state.global_step >= 300

    Trainer(model=model, args=args, train_dataset=data, callbacks=[StopAt300()]).train()
    return out


def big_run(out: Path, params: int = 50_000_000, every: int = 5, checkpoints: int = 13) -> Path:
    """An MLP of about ``params`` parameters trained with Adam on random regression data."""
    import torch

    from farcast.storage.writers import save_safetensors

    torch.manual_seed(0)
    width = int((params / 2) ** 0.5)
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, width))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, width), torch.randn(32, width)
    for step in range((checkpoints - 1) * every + 1):
        if step % every == 0:
            save_safetensors({k: v.detach().clone() for k, v in model.state_dict().items()},
                             out / f"step_{step:06d}.safetensors")
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out


CHILD = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
import farcast.pipelines.fit as F
from farcast_core.forecaster import FitConfig
from farcast.storage.store import RunStore
spent = dict(plan=0.0, read=0.0, reduce=0.0, solve=0.0, save=0.0)
def timed(key, f):
    def g(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            spent[key] += time.perf_counter() - t
    return g
F.plan_fit = timed("plan", F.plan_fit)
F.read_sampled = timed("read", F.read_sampled)
F._reduction_rows = timed("read", F._reduction_rows)  # the batch's rows from the sample array or the chunks
F.reduce_many = timed("reduce", F.reduce_many)
F.solve = timed("solve", F.solve)
F.save_forecasters = timed("save", F.save_forecasters)
if {device!r} == "cpu":
    F.default_device = lambda: "cpu"
elif {device!r} != "auto":
    import torch
    F.default_device = lambda: torch.device({device!r})
def hwm():  # peak RSS of this process image in KiB (ru_maxrss would carry the parent's peak across exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
rss0 = hwm()
t = time.perf_counter()
fc, path, target = F.fit({store!r}, target_step={target}, ratio={ratio}, config=FitConfig(**{config!r}), out={out!r}, force=True)
total = time.perf_counter() - t
rss1 = hwm()
print(json.dumps(dict(total=total, spent=spent, rss_before_mib=rss0 / 1024, rss_peak_mib=rss1 / 1024,
                      chunks=len(fc.keys), params=sum(m.numel for m in RunStore.open({store!r}).tensors.values()),
                      torch="torch" in sys.modules)))
"""


INGEST = r"""
import sys, time
sys.path.insert(0, {repo!r})
from farcast.pipelines.ingest import ingest
t = time.perf_counter()
ingest({run!r}, {store!r})
print(time.perf_counter() - t)
"""


def timed_ingest(run: Path, store: Path) -> float:
    """Seconds of ingest in a fresh process, imports excluded (as for the fit)."""
    shutil.rmtree(store, ignore_errors=True)
    p = subprocess.run([sys.executable, "-c", INGEST.format(repo=str(REPO), run=str(run), store=str(store))],
                       check=True, capture_output=True, text=True, cwd=REPO)
    return float(p.stdout.strip().splitlines()[-1])


def timed_fit(store: Path, out: Path, target: int | None, ratio: float | None, device: str = "auto",
              config: dict | None = None) -> dict:
    code = CHILD.format(repo=str(REPO), store=str(store), out=str(out), target=target, ratio=ratio, device=device,
                        config=config or {})
    p = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(p.stdout.strip().splitlines()[-1])


# Runs one command and prints its exit status and peak RSS (KiB). A small process of its own forks it:
# wait4's ru_maxrss counts the memory a child had before exec, i.e. its parent's size at the fork (this
# benchmark, after training a model, holds hundreds of MiB), so the command's figure is floored only at
# this wrapper's own few MiB.
RSS_WRAPPER = r"""
import os, sys
pid = os.fork()
if pid == 0:
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, 1)
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def timed_command(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one farcast command, run whole as a user runs it."""
    exe = str(Path(sys.executable).parent / "farcast")
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a child blocked writing stderr would never end
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-S", "-c", RSS_WRAPPER, exe, *args], stdout=subprocess.PIPE, stderr=err,
                           cwd=REPO, text=True)
        seconds = time.perf_counter() - t  # the wrapper's own start (~20 ms) included
        rc, kib = (int(x) for x in p.stdout.split())
        if rc:
            err.seek(0)
            raise SystemExit(f"farcast {' '.join(args)} failed: {err.read().decode()}")
    return seconds, kib / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-big", action="store_true", help="skip the 50M-parameter run")
    ap.add_argument("--device", default="auto", help="fit on cpu, cuda, or auto (cuda when present)")
    ap.add_argument("--work", default=str(REPO / "bench" / "out" / "fit_cost"))
    ap.add_argument("--repeat", type=int, default=3,
                    help="fresh processes per stage; the median of each is printed (this machine is shared and noisy)")
    args = ap.parse_args()
    work = Path(args.work)
    runs = {"trainer": (trainer_run, 600, None)}
    if not args.no_big:  # two sizes of the same model: the fit's memory should not grow with it
        runs["12M"] = (lambda out: big_run(out, params=12_000_000), None, 2.0)
        runs["50M"] = (big_run, None, 2.0)
    print(f"{'run':<8} {'params':>9} {'chunks':>6} {'ingest s':>9} {'fit s':>7} {'fit/ingest':>10}   "
          f"{'plan':>6} {'read':>6} {'reduce':>6} {'solve':>6} {'save':>6} {'other':>6}   "
          f"{'fit RSS MiB (peak - before)':>28}   {'unshrunk fit s':>14} {'/ingest':>8}")
    commands = {}
    for name, (make, target, ratio) in runs.items():
        run = work / name / "run"
        if not run.exists():
            make(run)
        store, out = work / name / "store", work / name / "forecasters"
        aim = ["--target-step", str(target)] if target else ["--ratio", str(ratio)]
        cli_ingest, cli_fit = [], []
        for _ in range(args.repeat):
            shutil.rmtree(store, ignore_errors=True)
            cli_ingest.append(timed_command(["ingest", str(run), "--store", str(store)]))
            os.sync()
            cli_fit.append(timed_command(["fit", str(store), *aim, "--out", str(out), "--force"]))
        commands[name] = [sorted(c)[len(c) // 2] for c in (cli_ingest, cli_fit)]
        ingest_s = median([timed_ingest(run, work / name / "store") for _ in range(args.repeat)])
        os.sync()  # write ingest's dirty pages back now, so the fit's fsync of its small file does not pay for them
        def median_fit(config=None) -> dict:  # the run of median time, with its split
            fits = [timed_fit(work / name / "store", work / name / "forecasters", target, ratio, args.device, config)
                    for _ in range(args.repeat)]
            return sorted(fits, key=lambda f: f["total"])[len(fits) // 2]

        fit, plain = median_fit(), median_fit({"shrink": 1.0})
        sp = fit["spent"]
        print(f"{name:<8} {fit['params'] / 1e6:>8.2f}M {fit['chunks']:>6} {ingest_s:>9.2f} {fit['total']:>7.2f} "
              f"{fit['total'] / ingest_s:>9.3f}x   {sp['plan']:>6.3f} {sp['read']:>6.3f} {sp['reduce']:>6.3f} "
              f"{sp['solve']:>6.3f} {sp['save']:>6.3f} {fit['total'] - sum(sp.values()):>6.3f}   "
              f"{fit['rss_peak_mib'] - fit['rss_before_mib']:>10.0f} "
              f"(peak {fit['rss_peak_mib']:.0f})   {plain['total']:>14.2f} {plain['total'] / ingest_s:>7.3f}x"
              + ("   (torch imported)" if fit["torch"] else ""))
    print(f"(fit device: {args.device}; each stage timed inside a fresh process, imports excluded, the median of "
          f"{args.repeat}; "
          "goal: fit / ingest <= 0.1x; the fit is the default, shrink='auto', which also fits the backtest that "
          "chooses the shrinkage; 'unshrunk': shrink=1, one fit)")
    print(f"\n{'run':<8} {'farcast ingest s':>16} {'farcast fit s':>14} {'fit/ingest':>10}   "
          f"{'ingest peak RSS MiB':>19} {'fit peak RSS MiB':>16}")
    for name, ((ingest_s, ingest_mib), (fit_s, fit_mib)) in commands.items():
        print(f"{name:<8} {ingest_s:>16.2f} {fit_s:>14.2f} {fit_s / ingest_s:>9.3f}x   {ingest_mib:>19.0f} {fit_mib:>16.0f}")
    print(f"(the commands as a user runs them, whole: Python's start, imports and work; the median of {args.repeat})")


if __name__ == "__main__":
    main()
