"""Held-out loss at the offline forecasts of the language-model runs, against the loss at the newest
weights the forecast starts from and at the real target weights (the backtest cut of ratio 2).

The runs are bench/forecast_quality.py's (run it first: they are read from bench/out/quality). For
three configurations (every cut alike and unshrunk; recency 2 unshrunk; the default, recency 2 and
shrink 'auto') it prints the loss on held-out text at the newest weights, at the real step, and at
1/4, 1/2 and all of the way from the newest weights to the forecast: whether weights closer to the
target in mean absolute error (bench/forecast_quality.py) are also lower in loss.

    python bench/forecast_loss.py [gpt2-linear,gpt2-const,gpt2-cosine]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from farcast_core.forecaster import FitConfig  # noqa: E402
from farcast_core.calibration import backtest_row  # noqa: E402
from farcast.pipelines.emit import TargetChunks  # noqa: E402
from farcast.pipelines.fit import fit_store, time_axis  # noqa: E402
from farcast.storage.store import RunStore  # noqa: E402

CONFIGS = {"cuts alike, unshrunk": FitConfig(shrink=1.0, recency=0.0), "recency 2, unshrunk": FitConfig(shrink=1.0),
           "default": FitConfig()}


def held_out() -> torch.Tensor:
    """Bytes of pydoc_data past the 200 000 the runs trained on, in 64-byte blocks."""
    import pydoc_data.topics

    text = "".join(pydoc_data.topics.topics.values()).encode("utf-8", "ignore")
    return torch.tensor(list(text[200_000:232_768]), dtype=torch.long).reshape(-1, 64)


def forecast_weights(store: RunStore, cfg: FitConfig, rho: float) -> tuple[int, int, dict, float | None]:
    """(cut step, newest step, the backtest's forecast of the newest step, as emit computes it, of every
    forecast tensor, alpha)."""
    axis = time_axis(store, cfg)
    times = axis.times(store.steps)
    b = backtest_row(times, rho)
    fc = fit_store(store, b + 1, (times[-1] - times[0]) / (times[b] - times[0]), cfg, axis=axis)
    chunks = TargetChunks(store, fc)
    out = {name: chunks.tensor(store.tensors[name]).double() for name in fc.chunks}
    return store.steps[b], store.steps[-1], out, (fc.shrink or {}).get("alpha")


def main() -> None:
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    data = held_out()
    names = (sys.argv[1] if len(sys.argv) > 1 else "gpt2-linear,gpt2-const,gpt2-cosine").split(",")
    print("held-out loss: at the newest weights (the cut), at the real target, at fractions of the way to the forecast")
    for name in names:
        run = REPO / "bench" / "out" / "quality" / name
        store = RunStore.open(f"{run}.store")
        model = GPT2LMHeadModel.from_pretrained(run / f"checkpoint-{store.steps[-1]}")

        def loss(sd: dict) -> float:
            model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=False)
            with torch.no_grad():
                return model(input_ids=data, labels=data).loss.item()

        for label, cfg in CONFIGS.items():
            cut, newest_step, fcast, alpha = forecast_weights(store, cfg, 2.0)
            newest = load_file(str(run / f"checkpoint-{cut}" / "model.safetensors"))
            truth = load_file(str(run / f"checkpoint-{newest_step}" / "model.safetensors"))
            fcast = {n: fcast.get(n, newest[n].double()) for n in newest}
            fr = {f: loss({n: newest[n] + f * (fcast[n] - newest[n]) for n in newest}) for f in (0.25, 0.5, 1.0)}
            a = "" if alpha is None else f" (alpha {alpha:.2f})"
            print(f"{name:<12} {label + a:<32} step {cut}: {loss(newest):.4f}  step {newest_step}: {loss(truth):.4f}  "
                  + "  ".join(f"{f:g} of the way: {v:.4f}" for f, v in fr.items()), flush=True)


if __name__ == "__main__":
    main()
