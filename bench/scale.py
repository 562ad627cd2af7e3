"""farcast at model size: ingest, fit and emit of a 300M-parameter run, against copying its bytes.

The run (made here in a few minutes, no downloads): a 6-layer MLP of about 300M parameters trained
with Adam on a cheap random regression objective, a checkpoint every 2 steps, 10 checkpoints,
saved twice from the same training: float32 (about 1.2 GB per checkpoint) and bfloat16 (as
mixed-precision runs save them, about 0.6 GB). For each dtype, each stage runs in a fresh process
(imports excluded from its time) with its peak RSS (VmHWM), beside a reference on the same bytes
measured in the same run:

  ingest   `farcast ingest RUN --store STORE`          vs  cp -r of the run directory + sync
  fit      ratio 2, the default FitConfig (sampled rows, moments, refinement)  vs  ingest (the ratio
           issue 13 asks <= 0.1x of)
  emit     the forecast checkpoint, with the fitted forecasters (the backtest is skipped: it is a
           second fit and a pass over the model, measured by bench/forecast_quality.py)
                                                        vs  save_file of the newest checkpoint's
                                                            tensors (loaded beforehand) + fsync

    python bench/scale.py [--params 300e6] [--dtypes float32,bfloat16] [--keep] [--work DIR]

About 40 GB of disk at 300M (runs, stores, outputs); everything under --work is deleted at the
end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HWM = 'next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024'


def make_runs(work: Path, params: float, dtypes: list[str], checkpoints: int = 10, every: int = 2) -> dict[str, Path]:
    """Train the MLP with Adam and save each checkpoint in every dtype asked for."""
    import torch
    from safetensors.torch import save_file

    layers = 6
    width = int((params / layers) ** 0.5) // 64 * 64
    torch.manual_seed(0)
    mods = []
    for i in range(layers):
        mods += [torch.nn.Linear(width, width)] + ([torch.nn.Tanh()] if i < layers - 1 else [])
    model = torch.nn.Sequential(*mods)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(8, width), torch.randn(8, width)
    runs = {d: work / f"run-{d}" for d in dtypes}
    for step in range((checkpoints - 1) * every + 1):
        if step % every == 0:
            state = {k: v.detach() for k, v in model.state_dict().items()}
            for d, run in runs.items():
                run.mkdir(parents=True, exist_ok=True)
                save_file({k: v.to(getattr(torch, d)).contiguous() for k, v in state.items()},
                          str(run / f"step_{step:06d}.safetensors"))
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    n = sum(p.numel() for p in model.parameters())
    print(f"made: {n / 1e6:.0f}M parameters ({layers} x Linear({width}, {width})), {checkpoints} checkpoints, "
          f"dtypes {', '.join(dtypes)}", flush=True)
    return runs


def child(code: str) -> dict:
    """Run ``code`` (which prints one JSON line last) in a fresh Python; its parsed output."""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        raise SystemExit(f"stage failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


PRELUDE = f"""
import json, os, sys, time
sys.path.insert(0, {str(REPO)!r})
"""


def stage_ingest(run: Path, store: Path) -> dict:
    return child(PRELUDE + f"""
from farcast.pipelines.ingest import ingest
t = time.perf_counter()
ingest({str(run)!r}, {str(store)!r})
os.sync()
print(json.dumps({{"s": time.perf_counter() - t, "rss": {HWM}}}))
""")


def stage_copy(run: Path, dest: Path) -> dict:
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(run), str(dest)], check=True)
    os.sync()
    return {"s": time.perf_counter() - t, "rss": float("nan")}


def stage_fit(store: Path, out: Path) -> dict:
    return child(PRELUDE + f"""
from farcast.pipelines.fit import fit
t = time.perf_counter()
fc, path, target = fit({str(store)!r}, ratio=2.0, out={str(out)!r}, force=True)
print(json.dumps({{"s": time.perf_counter() - t, "rss": {HWM}, "target": target, "chunks": len(fc.keys), "path": str(path)}}))
""")


def stage_emit(store: Path, fc: Path, out: Path) -> dict:
    return child(PRELUDE + f"""
from farcast.pipelines.emit import EmitConfig, emit
from farcast.storage.artifacts import load_forecasters
fc, _ = load_forecasters({str(fc)!r})
report = {{"methods": {{"farcast": {{"mae": 0.0}}, "persistence": {{"mae": 1.0}}}}, "farcast_vs_persistence": 0.0,
          "backtest_from": 0}}
t = time.perf_counter()
r = emit({str(store)!r}, {str(out)!r}, ratio=fc.rho, config=EmitConfig(force=True), report=report, forecasters=fc)
print(json.dumps({{"s": time.perf_counter() - t, "rss": {HWM}, "bytes": sum(p.stat().st_size for p in r.path.parent.rglob("*") if p.is_file())}}))
""")


def stage_save_file(ckpt: Path, out: Path) -> dict:
    """save_file + fsync of the newest checkpoint's tensors, loaded into memory before the clock starts."""
    return child(PRELUDE + f"""
from safetensors.torch import load_file, save_file
tensors = {{k: v.clone() for k, v in load_file({str(ckpt)!r}).items()}}
t = time.perf_counter()
save_file(tensors, {str(out)!r})
fd = os.open({str(out)!r}, os.O_RDONLY); os.fsync(fd); os.close(fd)
print(json.dumps({{"s": time.perf_counter() - t, "rss": {HWM}}}))
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=300e6)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--keep", action="store_true", help="keep the runs, stores and outputs")
    ap.add_argument("--work", default=str(REPO / "bench" / "out" / "scale"))
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    t = time.perf_counter()
    runs = make_runs(work, args.params, args.dtypes.split(","))
    print(f"(training and saving took {time.perf_counter() - t:.0f} s)\n")
    print(f"{'dtype':<9} {'stage':<7} {'seconds':>8} {'reference':>10} {'ratio':>7} {'peak RSS MiB':>13}  reference"
          "   (peak RSS of the stage's process; torch's import alone is about 230 MiB: emit imports it, "
          "ingest and the CPU fit do not)")
    try:
        for d, run in runs.items():
            gb = sum(p.stat().st_size for p in run.iterdir()) / 1e9
            os.sync()
            ing = stage_ingest(run, work / f"store-{d}")
            cp = stage_copy(run, work / f"copy-{d}")
            shutil.rmtree(work / f"copy-{d}")
            fit = stage_fit(work / f"store-{d}", work / f"fc-{d}")
            emi = stage_emit(work / f"store-{d}", Path(fit["path"]), work / f"out-{d}")
            newest = sorted(run.glob("*.safetensors"))[-1]
            ref = stage_save_file(newest, work / f"save_file-{d}.safetensors")
            rows = [("ingest", ing, cp, f"cp -r of the run ({gb:.1f} GB) + sync"),
                    ("fit", fit, ing, f"the ingest above ({fit['chunks']} chunks, target step {fit['target']})"),
                    ("emit", emi, ref, f"save_file + fsync of {newest.name} ({newest.stat().st_size / 1e9:.2f} GB)")]
            for name, r, base, what in rows:
                print(f"{d:<9} {name:<7} {r['s']:>8.2f} {base['s']:>10.2f} {r['s'] / base['s']:>6.2f}x "
                      f"{r['rss']:>13.0f}  {what}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
