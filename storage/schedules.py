"""What a checkpoint records about its learning-rate schedule, as JSON-able "facts".

Ingest keeps the newest checkpoint's facts in the store; ``farcast_core.timeaxis`` turns them
into a schedule. Read here: Hugging Face ``trainer_state.json`` (logged learning rates,
max_steps), ``scheduler.pt`` (base and last learning rates; tensors and numbers only, so no
pickle), ``training_args.bin`` only when pickles are allowed, and the ``lr_schedulers`` state a
Lightning (or plain torch) checkpoint file holds. Anything unreadable just means "not known".
"""

from __future__ import annotations

import math
from pathlib import Path

from farcast_core.errors import CheckpointError
from farcast.storage.checkpoints import Checkpoint
from farcast.storage.layouts import huggingface
from farcast.storage.layouts.torch_files import load_torch_file


def read_schedule_facts(ckpt: Checkpoint, allow_pickle: bool = False) -> dict | None:
    """The schedule facts of one checkpoint, or None when it records none."""
    if ckpt.path.is_dir():
        return _hf_facts(ckpt.path, allow_pickle)
    if ckpt.format == "torch":
        return _torch_facts(ckpt.path, allow_pickle)
    return None


def _hf_facts(d: Path, allow_pickle: bool) -> dict | None:
    state = huggingface.read_state(d)
    if state is None:
        return None
    facts = {
        "format": "hf",
        "logged": [[h["step"], h["learning_rate"]] for h in state.get("log_history", [])
                   if isinstance(h.get("learning_rate"), (int, float)) and isinstance(h.get("step"), int)],
        "max_steps": state.get("max_steps"),
        "global_step": state.get("global_step"),
    }
    for name in huggingface.SCHEDULER_FILES:
        sched = _load(d / name, False)
        if isinstance(sched, dict) and "base_lrs" in sched:
            facts.update(base_lrs=_floats(sched.get("base_lrs")), last_lr=_floats(sched.get("_last_lr")),
                         last_epoch=sched.get("last_epoch"))
            break
    if allow_pickle and (d / huggingface.TRAINING_ARGS).is_file():
        facts["training_args"] = huggingface.training_args(d / huggingface.TRAINING_ARGS, state.get("max_steps"))
    return facts


def _torch_facts(path: Path, allow_pickle: bool) -> dict | None:
    """Lightning's ``lr_schedulers`` list, or a plain training container's ``scheduler`` state
    ({"model", "optimizer", "scheduler", "step"})."""
    obj = _load(path, allow_pickle)
    if not isinstance(obj, dict):
        return None
    states = obj.get("lr_schedulers")
    if not isinstance(states, list):
        states = [obj["scheduler"]] if isinstance(obj.get("scheduler"), dict) else None
    if states is None:
        return None
    step = obj.get("global_step", obj.get("step"))
    return {"format": "torch", "schedulers": [scheduler_state(s) for s in states if isinstance(s, dict)],
            "global_step": step}


def scheduler_state(state: dict) -> dict:
    """The JSON-able part of a torch LR scheduler's state_dict: numbers, strings, lists of numbers."""
    keep = (int, float, bool, str)
    return {k: (_floats(v) if isinstance(v, list) else v) for k, v in state.items()
            if isinstance(v, keep) or (isinstance(v, list) and all(isinstance(x, (int, float)) for x in v))}


def _load(path: Path, allow_pickle: bool):
    if not path.is_file():
        return None
    try:
        return load_torch_file(path, allow_pickle, mmap=True)
    except CheckpointError:
        return None


def _floats(v) -> list[float] | None:
    if not isinstance(v, (list, tuple)):
        return None
    out = [float(x) for x in v]
    return out if all(math.isfinite(x) for x in out) else None
