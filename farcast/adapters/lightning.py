"""Farcasting inside a Lightning ``Trainer``: ``lightning_callback`` makes the Callback."""

from __future__ import annotations

from typing import Callable

from farcast.pipelines.jump import JumpConfig, Jumper, advance_scheduler, loop_jumper


def lightning_callback(config: JumpConfig = JumpConfig(), loss_fn: Callable | None = None, store_dir=None):
    """A Lightning ``Callback`` that jumps the LightningModule (automatic optimization, one optimizer).

    ``loss_fn(module)`` is the guard loss. A taken jump advances the trainer's optimizer-step
    counter (``trainer.global_step``) and every step-interval scheduler to the target.
    """
    import lightning as L

    class FarcastJumpCallback(L.Callback):
        def __init__(self):
            self.jumper: Jumper | None = None

        def on_train_start(self, trainer, pl_module):
            sched = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
            per_step = bool(trainer.lr_scheduler_configs) and trainer.lr_scheduler_configs[0].interval == "step"
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            self.jumper = loop_jumper(config, sched if per_step else None, total, store_dir)
            self.jumper.record(trainer.global_step, self.jumper.params(pl_module))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            target = self.jumper.step(pl_module, step, loss_fn, trainer.optimizers[0] if trainer.optimizers else None)
            if target is None:
                return
            delta = target - step
            progress = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step
            progress.total.ready += delta
            progress.total.completed += delta
            trainer.fit_loop.epoch_loop._batches_that_stepped += delta
            for cfg in trainer.lr_scheduler_configs:
                if cfg.interval == "step":
                    advance_scheduler(cfg.scheduler, delta)

        def on_train_end(self, trainer, pl_module):
            if self.jumper is not None:
                self.summary = self.jumper.summary()
                self.jumper.close()

    return FarcastJumpCallback()
