"""A small real training run for the demo, the tests and the benchmarks (no downloads).

An MLP on scikit-learn's digits (shipped with the package), trained for real, with a
BatchNorm layer so the checkpoints hold non-float buffers too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from farcast.storage.writers import save_safetensors


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


# ---------------------------------------------------------------- the demo's language model


def text_blocks(seq: int = 64, max_bytes: int = 200_000) -> torch.Tensor:
    """Byte-level blocks of Python's own documentation (pydoc_data ships with Python)."""
    import pydoc_data.topics

    text = "".join(pydoc_data.topics.topics.values()).encode("utf-8", "ignore")[:max_bytes]
    data = torch.tensor(list(text), dtype=torch.long)
    return data[: len(data) // seq * seq].reshape(-1, seq)


def tiny_gpt2(seq: int = 64, width: int = 64, layers: int = 2):
    """A GPT-2 over bytes (default 2 layers, 64 wide), built from a config (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=seq, n_embd=width, n_layer=layers, n_head=4,
                                      bos_token_id=0, eos_token_id=0))


def eval_loss(model, blocks: torch.Tensor) -> float:
    """Mean language-model loss on held-out blocks."""
    model.eval()
    with torch.no_grad():
        losses = [float(model(input_ids=b, labels=b).loss) for b in blocks.split(32)]
    model.train()
    return sum(losses) / len(losses)


# ---------------------------------------------------------------- the demo: Trainer on digits


class DigitsMLP(torch.nn.Module):
    """The digits MLP with the interface the Hugging Face Trainer expects (loss in the output)."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
        )

    def forward(self, pixels, labels=None):
        logits = self.net(pixels)
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def digits_split() -> tuple[list[dict], tuple[torch.Tensor, torch.Tensor]]:
    """(training examples for the Trainer, (held-out pixels, labels)): 1497 / 300 of the 1797 digits."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    x = torch.tensor(x / 16.0, dtype=torch.float32)[order]
    y = torch.tensor(y)[order]
    train = [{"pixels": a, "labels": b} for a, b in zip(x[300:], y[300:])]
    return train, (x[:300], y[:300])


def trainer_args(out_dir: str | os.PathLike, max_steps: int, every: int, lr: float = 3e-4, schedule: str = "constant",
                 warmup: int = 0):
    """Trainer settings of the demo: AdamW (at a constant learning rate), a checkpoint every ``every`` steps."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, save_steps=every, per_device_train_batch_size=64,
        learning_rate=lr, lr_scheduler_type=schedule, warmup_steps=warmup, weight_decay=0.0, report_to=[], use_cpu=True,
        logging_steps=every, disable_tqdm=True, seed=0, data_seed=0,
    )


def train_with_trainer(out_dir: Path, max_steps: int, every: int, resume: Path | None = None, hidden: int = 64,
                       **args):
    """Train (or resume) the digits MLP with the real Trainer, writing checkpoint-N/ dirs."""
    import logging

    from transformers import Trainer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers.trainer").setLevel(logging.ERROR)
    train, _ = digits_split()
    torch.manual_seed(0)
    model = DigitsMLP(hidden)
    if resume is None:  # the initial weights, as save_pretrained would leave them: step 0 of the run
        save_safetensors(model.state_dict(), Path(out_dir) / "checkpoint-0" / "model.safetensors", {"format": "pt"})
    trainer = Trainer(model=model, args=trainer_args(out_dir, max_steps, every, **args), train_dataset=train)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    return trainer


def checkpoint_losses(run_dir: Path, hidden: int = 64, steps: set[int] | None = None) -> dict[int, float]:
    """Held-out loss of every checkpoint-N/ (or of those in ``steps``) in ``run_dir``."""
    from farcast.storage.checkpoints import discover, open_checkpoint
    from farcast_core.dtypes import from_storage

    _, (x, y) = digits_split()
    out = {}
    for c in discover(run_dir).checkpoints:
        if steps is not None and c.step not in steps:
            continue
        model = DigitsMLP(hidden)
        with open_checkpoint(c) as r:
            sd = {n: from_storage(r.read(n), i.dtype).reshape(i.shape) for n, i in r.tensors.items()}
        model.load_state_dict(sd)
        out[c.step] = held_out_loss(model, x, y)
    return out


def held_out_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(x, y)["loss"])


def steps_to_reach(losses: dict[int, float], target: float) -> int | None:
    """The first step whose loss is at or below ``target`` (None if none is)."""
    return next((s for s in sorted(losses) if losses[s] <= target), None)


def summarise(plain: dict[int, float], resumed: dict[int, float], observed_until: int, target_step: int) -> dict:
    """Steps saved: optimizer steps to reach the plain run's final loss, plain vs through the forecast."""
    final_step = max(plain)
    goal = plain[final_step]
    plain_steps = steps_to_reach(plain, goal)
    hit = steps_to_reach(resumed, goal)
    farcast_steps = None if hit is None else observed_until + (hit - target_step)
    return {
        "goal_loss": goal,
        "plain_steps": plain_steps,
        "farcast_steps": farcast_steps,  # real steps: observed ones + resumed ones (the jump is free)
        "steps_saved": None if farcast_steps is None else plain_steps - farcast_steps,
        "speedup": None if not farcast_steps else plain_steps / farcast_steps,
        "observed_until": observed_until,
        "target_step": target_step,
        "loss_at_observed": plain[observed_until],
        "loss_of_forecast": resumed.get(target_step),
        "plain_loss_at_target": plain.get(target_step),
    }
