"""Hugging Face step directories: ``checkpoint-<step>/`` of the Trainer (weights beside
``trainer_state.json``, ``optimizer.pt``, ``scheduler.pt``, ``training_args.bin``), and plain
``save_pretrained`` / accelerate ``save_state`` directories. Weights are single or sharded
safetensors (``model.safetensors.index.json``) or ``pytorch_model.bin`` (and its index).

Here: which files hold the weights, when a directory is complete, what the Trainer's files record
about the schedule, and the Trainer's files of a forecast step (state, optimizer, scheduler, index)
moved to the target step. The weights themselves are written by their format's module.
"""

from __future__ import annotations

import json
from pathlib import Path

from farcast_core.dtypes import DTYPES
from farcast_core.errors import CheckpointError
from farcast.storage.layouts.base import Forecasted
from farcast.storage.layouts.torch_files import advance_scheduler, load_torch_file, save_torch, set_lr
from farcast.storage.writers import copy_file

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE = ("model.safetensors", "pytorch_model.bin")
TRAINER_STATE = "trainer_state.json"
TRAINING_ARGS = "training_args.bin"
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
SCHEDULER_FILES = ("scheduler.pt", "scheduler.bin")
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", TRAINING_ARGS)  # the Trainer writes these


def weights_of(d: Path) -> tuple[str, tuple[Path, ...]] | None:
    """("safetensors" or "torch", the weight files) of a step directory, or None if it holds none."""
    for index in INDEXES:
        p = d / index
        if p.is_file():
            try:
                weight_map = json.loads(p.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{p}: not a valid shard index ({e}); re-save the checkpoint") from e
            files = tuple(d / f for f in sorted(set(weight_map.values())))
            return ("safetensors" if index.startswith("model.safetensors") else "torch"), files
    for single in SINGLE:
        if (d / single).is_file():
            return ("safetensors" if single.endswith(".safetensors") else "torch"), (d / single,)
    return None


def is_trainer_dir(d: Path) -> bool:
    return (d / TRAINER_STATE).is_file()


def incomplete(d: Path, trainer_run: bool, step: int) -> str | None:
    """Why a step directory is not complete yet, or None if it is."""
    state = d / TRAINER_STATE
    if trainer_run and not state.is_file():
        plain = not any((d / f).exists() for f in TRAINER_FILES)
        if step == 0 and plain:
            return None  # a save_pretrained dir of the initial weights counts as step 0
        return "no trainer_state.json yet (the Trainer writes it last): still being written?"
    if state.is_file():
        try:
            if not isinstance(json.loads(state.read_bytes()), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            return f"trainer_state.json does not parse ({type(e).__name__}): still being written, or damaged?"
    return None


def read_state(d: Path) -> dict | None:
    """trainer_state.json of a step directory, or None when absent or unreadable."""
    try:
        state = json.loads((d / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def training_args(path: Path, max_steps: int | None) -> dict | None:
    """What training_args.bin (a pickle: read only when pickles are allowed) says about the schedule,
    as JSON-able facts; None when it cannot be read."""
    try:
        import torch

        args = torch.load(path, weights_only=False)
        total = max_steps or args.max_steps
        kind = args.lr_scheduler_type
        return {"lr_scheduler_type": getattr(kind, "value", str(kind)), "learning_rate": float(args.learning_rate),
                "warmup_steps": int(args.get_warmup_steps(total)), "max_steps": total,
                "lr_scheduler_kwargs": json.loads(json.dumps(getattr(args, "lr_scheduler_kwargs", None) or {}))}
    except Exception:  # an unreadable pickle is "not known", never a failed ingest or emit
        return None


# ---------------------------------------------------------------- the Trainer's files of a forecast step


def trainer_args_facts(step_dir: Path, allow_pickle: bool) -> dict | None:
    """What a step directory's training_args.bin says about the schedule (``training_args``), with the
    run's max_steps from trainer_state.json; None without pickles allowed, or without the files."""
    if not (allow_pickle and (step_dir / TRAINING_ARGS).is_file()):
        return None
    return training_args(step_dir / TRAINING_ARGS, (read_state(step_dir) or {}).get("max_steps"))


def write_trainer_file(src: Path, dst: Path, fc: Forecasted, lr: float | None) -> bool:
    """The forecast step's copy of one of the Trainer's files (``lr``: ``lr_factor``); False if ``src``
    is not one it moves on (the caller copies it)."""
    if src.name in OPTIMIZER_FILES:
        write_optimizer(src, dst, fc, lr)
    elif src.name in SCHEDULER_FILES:
        sched = load_torch_file(src, fc.allow_pickle)
        advance_scheduler(sched, fc.newest_step, fc.target, lr)
        save_torch(sched, dst)
    elif src.name == TRAINER_STATE:
        state = json.loads(src.read_text())
        if state.get("global_step") and state.get("epoch") is not None:
            state["epoch"] = state["epoch"] * fc.target / state["global_step"]
        state["global_step"] = fc.target
        dst.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    else:
        return False
    return True


def write_optimizer(src: Path, dst: Path, fc: Forecasted, lr: float | None) -> None:
    """The optimizer state per policy; with a known schedule, its learning rates set to the target step's."""
    if fc.optimizer == "keep" and lr is None:
        copy_file(src, dst)
        return
    opt = load_torch_file(src, fc.allow_pickle)
    if fc.optimizer == "reset":
        opt["state"] = {}  # same parameter groups (lr, betas, ...), fresh moments
    if lr is not None:
        set_lr(opt, lr)
    save_torch(opt, dst)


def write_index(src_dir: Path, dst: Path, fc: Forecasted) -> list[str]:
    """The shard indexes of ``src_dir``, total size recomputed; returns the names written."""
    written = []
    for index in INDEXES:
        if (src_dir / index).is_file():
            idx = json.loads((src_dir / index).read_text())
            idx.setdefault("metadata", {})["total_size"] = sum(
                _numel(fc.specs[n][1]) * DTYPES[fc.specs[n][0]].storage.itemsize for n in idx["weight_map"]
            )
            (dst / index).write_text(json.dumps(idx, indent=2, sort_keys=True) + "\n")
            written.append(index)
    return written


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
