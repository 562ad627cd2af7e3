"""Emit benchmark: writing the forecast checkpoint against safetensors.torch.save_file.

Makes a ~50M-parameter float32 run (13 checkpoints), ingests it, fits the forecasters (timed and
reported apart: fitting is its own arrow), then measures in the same run:
  - emit with those forecasters (forecast every chunk, cast, stream into a safetensors file),
    in a child process, with its own peak RSS (VmHWM)
  - safetensors.torch.save_file of the same tensors, already in memory (the reference)
and prints emit / save_file and the peak RSS.

    python bench/emit.py [--params 50e6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from farcast_core.forecaster import FitConfig  # noqa: E402
from farcast.pipelines.fit import fit  # noqa: E402
from farcast.pipelines.ingest import ingest  # noqa: E402
from farcast.storage.writers import save_safetensors  # noqa: E402

CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from farcast.pipelines.emit import EmitConfig, emit
from farcast.storage.artifacts import load_forecasters
fc, _ = load_forecasters({fc!r})
report = {{"methods": {{"farcast": {{"mae": 0.0}}, "persistence": {{"mae": 1.0}}}}, "farcast_vs_persistence": 0.0, "backtest_from": 0}}
t = time.perf_counter()
r = emit({store!r}, {out!r}, ratio=fc.rho, config=EmitConfig(force=True), report=report, forecasters=fc)
took = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"seconds": took, "rss_kb": int(hwm), "path": str(r.path)}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=50e6)
    ap.add_argument("--work", default=str(REPO / "bench" / "out" / "emit"))
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    n_tensors = 24
    per = int(args.params) // n_tensors // 1024 * 1024
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(per // 1024, 1024, generator=g) for i in range(n_tensors)}
    drift = {k: torch.randn(v.shape, generator=g) * 1e-2 for k, v in base.items()}
    for s in range(13):
        save_safetensors({k: v + drift[k] * (s ** 0.5) for k, v in base.items()}, work / "run" / f"step_{s * 10:04d}.safetensors")
    del drift
    ingest(work / "run", work / "store")
    t = time.perf_counter()
    _, fc_path, _ = fit(work / "store", ratio=1.5, config=FitConfig(), out=work / "fc")
    fit_s = time.perf_counter() - t

    code = CHILD.format(repo=str(REPO), fc=str(fc_path), store=str(work / "store"), out=str(work / "out"))
    import json

    res = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    tensors = {k: v + 0.5 for k, v in base.items()}
    from safetensors.torch import save_file

    t = time.perf_counter()
    save_file(tensors, work / "reference.safetensors")
    ref_s = time.perf_counter() - t
    t = time.perf_counter()
    save_file(tensors, work / "reference2.safetensors")
    with open(work / "reference2.safetensors", "rb+") as f:
        os.fsync(f.fileno())  # emit fsyncs before its rename; this is the like-for-like reference
    ref_sync_s = time.perf_counter() - t
    n = sum(v.numel() for v in base.values())
    print(f"emit benchmark: {n / 1e6:.1f}M float32 parameters in {n_tensors} tensors, 13 checkpoints")
    print(f"fit (reported apart)        {fit_s:8.2f} s  ({fit_s / (n / 1e6):.3f} s per M params)")
    print(f"emit (forecast + write)     {res['seconds']:8.2f} s  peak RSS {res['rss_kb'] / 1024:.0f} MiB")
    print(f"save_file of same tensors   {ref_s:8.2f} s   (+ fsync: {ref_sync_s:.2f} s)")
    print(f"emit / save_file            {res['seconds'] / ref_s:8.2f}   (both with fsync: {res['seconds'] / ref_sync_s:.2f})")


if __name__ == "__main__":
    main()
