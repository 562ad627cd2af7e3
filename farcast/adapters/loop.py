"""Farcasting in a plain torch training loop: ``TorchJumper``."""

from __future__ import annotations

from farcast.pipelines.jump import JumpConfig, advance_scheduler, loop_jumper


class TorchJumper:
    """For a plain training loop: call ``step = jumper.after_step(step)`` after each optimizer step.

    ``step`` is the global step just completed (1 after the first optimizer step); the return
    value is the global step to continue from (the target after a jump). ``loss_fn(model)``
    evaluates the guard loss (a few held batches). The initial weights are recorded at step 0.
    """

    def __init__(self, model, optimizer, scheduler=None, loss_fn=None, config: JumpConfig = JumpConfig(),
                 total_steps: int | None = None, store_dir=None):
        self.model, self.optimizer, self.scheduler, self.loss_fn = model, optimizer, scheduler, loss_fn
        self.jumper = loop_jumper(config, scheduler, total_steps, store_dir)
        self.jumper.record(0, self.jumper.params(model))

    def summary(self) -> dict:
        return self.jumper.summary()

    def close(self) -> None:
        self.jumper.close()

    def after_step(self, step: int) -> int:
        target = self.jumper.step(self.model, step, self.loss_fn, self.optimizer)
        if target is None:
            return step
        advance_scheduler(self.scheduler, target - step)
        return target
