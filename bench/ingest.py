"""Ingest benchmark: wall time against `cp` of the same files, peak RSS, store size.

Makes a synthetic sequence of float32 checkpoints (a transformer-like set of tensors) for
each model size, then measures in the same run, on the same disk:
  - `cp -r` of the checkpoint directory (twice: before and after ingest; the mean is the reference)
  - `farcast ingest` in a child process (its wall time and peak RSS from wait4)
and prints ingest / cp, peak RSS, and store size / input size.

    python bench/ingest.py                      # 25M and 50M parameters, 10 checkpoints each
    python bench/ingest.py --sizes 5e6 --steps 4  # quick look
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from farcast.storage.writers import save_safetensors  # noqa: E402


def make_run(d: Path, params: int, steps: int) -> int:
    """A run of ``steps`` checkpoints with ~``params`` float32 values; returns its byte size."""
    width = 1024
    layer = 4 * width * width + 2 * width  # one "block": a 4x MLP-ish matrix pair and norms
    n_layers = max(1, params // layer)
    g = torch.Generator().manual_seed(0)
    base = {}
    for i in range(n_layers):
        base[f"blocks.{i}.mlp.up.weight"] = torch.randn(2 * width, width, generator=g)
        base[f"blocks.{i}.mlp.down.weight"] = torch.randn(width, 2 * width, generator=g)
        base[f"blocks.{i}.norm.weight"] = torch.ones(width)
        base[f"blocks.{i}.norm.bias"] = torch.zeros(width)
    base["step_counter"] = torch.zeros(1, dtype=torch.int64)
    d.mkdir(parents=True, exist_ok=True)
    for s in range(steps):
        sd = {k: (v * (1 - 0.01 * s) if v.is_floating_point() else v + s) for k, v in base.items()}
        save_safetensors(sd, d / f"step_{s * 100:06d}.safetensors")
    return sum(f.stat().st_size for f in d.iterdir())


def timed_cp(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=True)
    took = time.perf_counter() - t
    shutil.rmtree(dst)
    return took


def timed_ingest(src: Path, store: Path, budget_mb: int) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of `farcast ingest` in a child process."""
    shutil.rmtree(store, ignore_errors=True)
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from farcast.pipelines.ingest import ingest, IngestConfig\n"
        "ingest(%r, %r, IngestConfig(memory_budget_mb=%d))\n"
        # VmHWM of this process's own memory; ru_maxrss from wait4 would include the
        # benchmark's memory at fork time, which Linux carries across exec
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
        % (str(REPO), str(src), str(store), budget_mb)
    )
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    subprocess.run(["sync"], check=True)
    took = time.perf_counter() - t
    return took, int(out.split()[-1]) * 1024


def du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="25e6,50e6", help="model sizes in parameters, comma separated")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--budget-mb", type=int, default=512)
    ap.add_argument("--work", default=str(REPO / "bench" / "out" / "ingest"))
    args = ap.parse_args()
    work = Path(args.work)
    rows = []
    for size in (int(float(s)) for s in args.sizes.split(",")):
        shutil.rmtree(work, ignore_errors=True)
        run, store = work / "run", work / "store"
        nbytes = make_run(run, size, args.steps)
        cp1 = timed_cp(run, work / "copy")
        ing, rss = timed_ingest(run, store, args.budget_mb)
        cp2 = timed_cp(run, work / "copy")
        cp = (cp1 + cp2) / 2
        rows.append((nbytes / 4 / args.steps / 1e6, nbytes / 2**30, cp, ing, ing / cp, rss / 2**20, du(store) / nbytes))
        shutil.rmtree(work)
    print(f"ingest benchmark: {args.steps} checkpoints per run, memory budget {args.budget_mb} MiB, cp -r + sync as reference")
    print(f"{'params (M)':>10} {'input GiB':>9} {'cp s':>6} {'ingest s':>8} {'ingest/cp':>9} {'peak RSS MiB':>12} {'store/input':>11}")
    for r in rows:
        print(f"{r[0]:>10.1f} {r[1]:>9.2f} {r[2]:>6.2f} {r[3]:>8.2f} {r[4]:>9.2f} {r[5]:>12.0f} {r[6]:>11.3f}")


if __name__ == "__main__":
    main()
