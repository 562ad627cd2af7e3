"""torch pickles: plain state dicts (``.pt``/``.bin``, raw or under ``state_dict``/``model``/``module``),
Lightning ``.ckpt`` files and plain training containers ({"model", "optimizer", "scheduler", "step"}).
Reading (memory-mapped), unwrapping the state dict (here only), and writing a copy holding the
forecast with the container's step counters, schedulers and optimizer state moved to the target."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from farcast_core.dtypes import dtype_of, to_storage
from farcast_core.errors import CheckpointError
from farcast.storage.layouts.base import DAMAGED as _DAMAGED, CheckpointReader, Forecasted, TensorInfo
from farcast.storage.writers import naming

STATE_DICT_KEYS = ("state_dict", "model", "module")  # where containers keep the model's state dict


def state_dict_in(obj) -> dict | None:
    """The dict of a torch pickle that holds the model's tensors: the object itself (a raw state dict)
    or the first of ``STATE_DICT_KEYS`` holding tensors (a container); None when there is none."""
    import torch  # here, not at the top: ingesting safetensors never imports torch

    if not isinstance(obj, dict):
        return None
    for key in STATE_DICT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return inner
    return obj if any(isinstance(v, torch.Tensor) for v in obj.values()) else None


def _tensors_of(obj, path: Path) -> dict:
    sd = state_dict_in(obj)
    if sd is None:
        raise CheckpointError(
            f"{path}: holds no state dict (expected tensors at the top level or under 'state_dict'/'model')"
        )
    import torch

    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


class TorchReader(CheckpointReader):
    """Plain torch and Lightning pickles, memory-mapped; sliced per read."""

    def __init__(self, files: tuple[Path, ...], allow_pickle: bool):
        self.tensors, self._data = {}, {}
        for path in files:
            obj = self._load(path, allow_pickle)
            for name, t in _tensors_of(obj, path).items():
                try:
                    dtype = dtype_of(t.dtype).name
                except KeyError as e:
                    raise CheckpointError(f"{path}: tensor '{name}': unsupported dtype {t.dtype}") from e
                self.tensors[name] = TensorInfo(name, tuple(t.shape), dtype, str(path))
                self._data[name] = t

    @staticmethod
    def _load(path: Path, allow_pickle: bool):
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the shard index but missing; {_DAMAGED}")
        return load_torch_file(path, allow_pickle, mmap=True)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return to_storage(self._data[name].reshape(-1)[start:stop])

    def close(self) -> None:
        self._data = {}


def load_torch_file(path: Path, allow_pickle: bool = False, mmap: bool = False):
    """``torch.load`` on the CPU (tensors only unless ``allow_pickle``); every failure a CheckpointError."""
    import pickle

    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=not allow_pickle)
        except RuntimeError as e:
            if not mmap or "mmap" not in str(e):
                raise
            # legacy (pre-zip) torch.save format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: vanished while being read (rotated by the trainer?); rerun") from e
    except PermissionError as e:
        raise PermissionError(e.errno, e.strerror, str(path)) from e
    except Exception as e:  # torch raises many types for one cause: the file is not loadable
        if isinstance(e, pickle.UnpicklingError) and "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path}: holds pickled Python objects beyond tensors; if you trust this file, "
                f"rerun with --allow-pickle"
            ) from e
        raise CheckpointError(f"{path}: cannot be loaded by torch.load ({type(e).__name__}); {_DAMAGED}") from e


def save_torch(obj, path: Path) -> None:
    """torch.save to ``path`` (callers write inside a temporary directory that is renamed later)."""
    import torch

    with naming(path):
        torch.save(obj, path)


def write_like(src: Path, dst: Path, fc: Forecasted) -> None:
    """A copy of the torch pickle ``src`` (raw state dict, or a container) with the forecast in its
    state dict and, in a container, the step counters, schedulers and optimizer state moved on."""
    obj = load_torch_file(src, fc.allow_pickle)
    sd = state_dict_in(obj)
    if sd is None:
        raise CheckpointError(f"{src}: holds no state dict to write the forecast into; {_DAMAGED}")
    for name in list(sd):
        if name in fc.specs:
            sd[name] = fc.tensor(name)
    if sd is not obj:
        patch_container(fc, obj)
    save_torch(obj, dst)


def patch_container(fc: Forecasted, obj: dict) -> None:
    """Advance step counters of a Lightning checkpoint or training container, apply the optimizer policy."""
    delta = fc.target - fc.newest_step
    if isinstance(obj.get("global_step"), int):
        obj["global_step"] += delta
    if isinstance(obj.get("step"), int):
        obj["step"] += delta
    schedulers = list(obj.get("lr_schedulers", []) or [])  # Lightning's
    if isinstance(obj.get("scheduler"), dict):  # a plain training container's
        schedulers.append(obj["scheduler"])
    optimizers = list(obj.get("optimizer_states", []) or [])
    if isinstance(obj.get("optimizer"), dict) and "param_groups" in obj["optimizer"]:
        optimizers.append(obj["optimizer"])
    per_step = any(isinstance(s, dict) and s.get("last_epoch") == fc.newest_step for s in schedulers)
    fit_loop = (obj.get("loops") or {}).get("fit_loop")
    if isinstance(fit_loop, dict):  # Lightning keeps its counters under flat dotted keys
        counters = fit_loop.get("epoch_loop.state_dict", {})
        if "_batches_that_stepped" in counters:
            counters["_batches_that_stepped"] += delta
        _add_ints(fit_loop.get("epoch_loop.batch_progress", {}), delta)
        _add_ints(fit_loop.get("epoch_loop.automatic_optimization.optim_progress", {}), delta)
        if per_step:
            _add_ints(fit_loop.get("epoch_loop.scheduler_progress", {}), delta)
    for sched in schedulers:
        advance_scheduler(sched, fc.newest_step, fc.target, fc.lr_factor)
    if per_step and fc.lr_factor is not None:  # the first resumed step uses the optimizer's own lr
        for opt in optimizers:
            set_lr(opt, fc.lr_factor)
    if fc.optimizer == "reset":
        for opt in optimizers:
            opt["state"] = {}


def _add_ints(d: dict, delta: int) -> None:
    for k, v in d.items():
        if isinstance(v, dict):
            _add_ints(v, delta)
        elif isinstance(v, int) and not isinstance(v, bool):
            d[k] = v + delta


def advance_scheduler(sched: dict, newest: int, target: int, lr_factor: float | None = None) -> None:
    """A torch LR scheduler state stepped per optimizer step continues from ``target``."""
    if isinstance(sched, dict) and sched.get("last_epoch") == newest:
        sched["last_epoch"] = target
        if "_step_count" in sched:
            sched["_step_count"] = target + 1
        if lr_factor is not None and "base_lrs" in sched:
            sched["_last_lr"] = [b * lr_factor for b in sched["base_lrs"]]


def set_lr(optimizer_state: dict, factor: float) -> None:
    """Each parameter group's learning rate: its schedule's base (initial_lr) times ``factor``."""
    for group in optimizer_state.get("param_groups", []):
        if "initial_lr" in group:
            group["lr"] = group["initial_lr"] * factor
