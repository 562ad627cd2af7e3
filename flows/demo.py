"""`farcast demo`: a real training run, the end-to-end flow on it, and training resumed from the forecast."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from farcast_core.errors import FarcastError

MARKER = ".farcast-demo"
PARTS = ("plain", "observed", "forecast", "resumed", "store", "summary.json", "plot_data.json", "loss.png")


def _fresh(out: Path) -> None:
    """Clear what an earlier demo wrote in ``out``; refuse a directory the demo did not make."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise FarcastError(f"{out}: exists and was not made by 'farcast demo'; pick another directory")
    for p in PARTS:
        q = out / p
        if q.is_dir():
            shutil.rmtree(q)
        elif q.exists():
            q.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by farcast demo; rerunning the demo replaces this directory's contents\n")


def run_demo(out: str | os.PathLike = "farcast-demo", steps: int = 400, every: int = 20, ratio: float = 2.0,
             echo: Callable[[str], None] = print) -> dict:
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    import importlib.util

    missing = [m for m in ("sklearn", "transformers", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise FarcastError(f"farcast demo needs {', '.join(missing)}: pip install 'farcast[demo]' (make demo does)")
    from farcast.flows.flows import farcast_flow
    from farcast import examples as demo
    from farcast.pipelines.backtest import format_table
    from farcast.storage.plots import plot_demo

    out = Path(out).resolve()
    _fresh(out)
    observed_until = int(round(steps / ratio))
    if observed_until % every:
        raise FarcastError(f"steps / ratio = {steps / ratio:g} must be a multiple of --every {every}")
    echo(f"[1/4] training the digits MLP with the Hugging Face Trainer: {steps} steps, a checkpoint every {every}")
    demo.train_with_trainer(out / "plain", steps, every)
    echo(f"[2/4] farcast sees the run as it was at step {observed_until} and forecasts step {steps} "
         f"(ratio {ratio:g}) with the Prefect flow")
    (out / "observed").mkdir()
    for d in (out / "plain").glob("checkpoint-*"):
        if int(d.name.split("-")[1]) <= observed_until:
            shutil.copytree(d, out / "observed" / d.name)
    r = farcast_flow(str(out / "observed"), str(out / "forecast"), ratio=ratio, store=str(out / "store"))
    echo(format_table(r["backtest"]))
    echo(f"[3/4] resuming the Trainer from the forecast checkpoint {r['emitted']}")
    target = r["target_step"]
    demo.train_with_trainer(out / "resumed", target + steps - observed_until, every, resume=Path(r["emitted"]))
    echo("[4/4] held-out loss of every checkpoint, steps saved, plot")
    plain = demo.checkpoint_losses(out / "plain")
    resumed = demo.checkpoint_losses(out / "forecast", steps={target}) | demo.checkpoint_losses(out / "resumed")
    summary = demo.summarise(plain, resumed, observed_until, target)
    data = {"plain": plain, "resumed": resumed, "summary": summary, "backtest": r["backtest"]["methods"],
            "farcast_vs_persistence": r["backtest"]["farcast_vs_persistence"], "emitted": r["emitted"]}
    (out / "plot_data.json").write_text(json.dumps(data, indent=1))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot_demo(out / "loss.png", json.loads((out / "plot_data.json").read_text()))
    s = summary
    echo(f"held-out loss at step {observed_until}: {s['loss_at_observed']:.4f}; of the forecast of step {target}: "
         f"{s['loss_of_forecast']:.4f}; plain run at step {target}: {s['plain_loss_at_target']:.4f}")
    if s["farcast_steps"] is None:
        echo(f"the run resumed from the forecast did not reach the plain run's final loss {s['goal_loss']:.4f}")
    else:
        echo(f"to reach the plain run's final loss {s['goal_loss']:.4f}: plain {s['plain_steps']} optimizer steps, "
             f"through the forecast {s['farcast_steps']} ({s['steps_saved']} saved, {s['speedup']:.2f}x fewer)")
    echo(f"everything is in {out} (loss.png, summary.json, plot_data.json, checkpoints, store)")
    return data
