"""A small real training run for the demo, the tests and the benchmarks (no downloads).

An MLP on scikit-learn's digits (shipped with the package), trained for real, with a
BatchNorm layer so the checkpoints hold non-float buffers too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from storage.writers import save_safetensors


def train_digits(
    steps: int = 60,
    every: int = 5,
    optimizer: str = "adam",
    lr: float | None = None,
    dtype: torch.dtype = torch.float32,
    hidden: int = 32,
    seed: int = 0,
) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """Train the digits MLP; returns ``[(step, state_dict)]`` at step 0 and every ``every`` steps."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
    )
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr or 3e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr or 0.05, momentum=0.9 if optimizer == "momentum" else 0.0)

    def snapshot():
        return {k: v.detach().clone().to(dtype) if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}

    out = [(0, snapshot())]
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            out.append((step, snapshot()))
    return out


def write_digits_run(out_dir: str | os.PathLike, **train_kwargs) -> Path:
    """Train the digits MLP and save ``step_<N>.safetensors`` files into ``out_dir``."""
    out = Path(out_dir)
    for step, sd in train_digits(**train_kwargs):
        save_safetensors(sd, out / f"step_{step:06d}.safetensors")
    return out
