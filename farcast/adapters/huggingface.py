"""Farcasting inside a Hugging Face ``Trainer``: ``hf_callback`` makes the TrainerCallback."""

from __future__ import annotations

from typing import Callable

import torch

from farcast.pipelines.jump import JumpConfig, Jumper, advance_scheduler, loop_jumper


def hf_callback(config: JumpConfig = JumpConfig(), guard_batches: list[dict] | None = None,
                loss_fn: Callable | None = None, store_dir=None):
    """A ``transformers.TrainerCallback`` that jumps the Trainer's model.

    The guard loss is ``loss_fn(model)``, or the mean of ``model(**batch).loss`` over
    ``guard_batches``. A taken jump sets ``state.global_step`` to the target and steps the
    learning-rate scheduler there, so the schedule continues from the target and training ends
    at ``max_steps`` of the jumped count (the real optimizer steps saved).
    """
    from transformers import TrainerCallback

    if loss_fn is None and guard_batches is not None:
        loss_fn = _batches_loss(guard_batches)

    class FarcastJumpCallback(TrainerCallback):
        def __init__(self):
            self.jumper: Jumper | None = None

        def on_train_begin(self, args, state, control, model=None, lr_scheduler=None, **kw):
            self.jumper = loop_jumper(config, _inner(lr_scheduler), state.max_steps, store_dir)
            self.jumper.record(state.global_step, self.jumper.params(model))

        def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
            step = state.global_step
            target = self.jumper.step(model, step, loss_fn, _inner(optimizer))
            if target is not None:
                advance_scheduler(_inner(lr_scheduler), target - step)
                state.global_step = target
                if state.global_step >= state.max_steps:
                    control.should_training_stop = True

        def on_train_end(self, args, state, control, **kw):
            if self.jumper is not None:
                self.summary = self.jumper.summary()
                self.jumper.close()

    return FarcastJumpCallback()


def _inner(obj):
    """The torch optimizer or scheduler behind accelerate's wrappers."""
    for attr in ("optimizer", "scheduler"):
        inner = getattr(obj, attr, None)
        if inner is not None and type(obj).__name__.startswith("Accelerated"):
            return inner
    return obj


def _batches_loss(batches: list[dict]) -> Callable:
    def loss(model):
        device = next(model.parameters()).device
        total = 0.0
        for b in batches:
            out = model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()})
            total += float(out["loss"] if isinstance(out, dict) else out.loss)
        return total / len(batches)

    return loss
