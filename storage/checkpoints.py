"""Find the checkpoints of a training run and read them lazily, one tensor slice at a time.

Layouts understood (see ``discover``):
- a directory of step-numbered sub-directories: Hugging Face Trainer ``checkpoint-<step>/``
  (``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, or
  ``pytorch_model.bin``), plain ``save_pretrained`` / accelerate ``save_state`` directories, or
  torch.distributed.checkpoint directories (``.metadata`` + ``*.distcp``);
- a flat directory of step-numbered files: ``.safetensors``, plain torch ``.pt``/``.pth``/``.bin``
  state dicts (raw or under ``model``/``state_dict``), Lightning ``.ckpt``.

Readers return values in the store's representation (``farcast_core.dtypes``): exact bits.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from farcast_core.dtypes import DTYPES, SAFETENSORS_DTYPES, dtype_of, to_storage
from farcast_core.errors import CheckpointError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
HF_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_SINGLE = ("model.safetensors", "pytorch_model.bin")
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")
NAMING_HELP = (
    "name each checkpoint with its global step, e.g. checkpoint-1200/, step_001200.safetensors, "
    "model_1200.pt or epoch=3-step=1200.ckpt"
)

_STEP_WORD = re.compile(r"(?:global_step|step|checkpoint|ckpt|iteration|iter)[-_=]?(\d+)", re.I)
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a checkpoint's headers describe it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # canonical name from farcast_core.dtypes
    file: str  # the file that holds it

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Checkpoint:
    """One saved step of a run."""

    step: int
    path: Path  # the step's directory or file
    kind: str  # "safetensors", "torch" or "dcp": how its weights are read
    files: tuple[Path, ...]  # the files holding its weights (for DCP: the directory)
    layout: str  # "hf", "dirs", "dcp" or "files": how the run is laid out


@dataclass
class Discovery:
    """What ``discover`` found: the complete checkpoints in step order, and what it skipped."""

    root: Path
    layout: str
    checkpoints: list[Checkpoint]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def step_of(name: str) -> int | None:
    """The global step in a file or directory name; None without any number.

    A number after a step word (step, checkpoint, global_step, iter) wins; otherwise the name
    must hold exactly one number. Anything else is ambiguous and an error.
    """
    stem = name
    for suffix in WEIGHT_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    keyed = {int(m) for m in _STEP_WORD.findall(stem)}
    if len(keyed) == 1:
        return keyed.pop()
    numbers = {int(m) for m in _NUMBER.findall(stem)}
    if not keyed and len(numbers) == 1:
        return numbers.pop()
    if not keyed and not numbers:
        return None
    raise CheckpointError(f"{name}: cannot tell which number is the step; {NAMING_HELP}")


def _dir_weights(d: Path) -> tuple[str, tuple[Path, ...]] | None:
    """How to read a step directory's weights, or None if it holds none."""
    if (d / ".metadata").is_file() or any(d.glob("*.distcp")):
        return "dcp", (d,)
    for index in HF_INDEXES:
        p = d / index
        if p.is_file():
            try:
                weight_map = json.loads(p.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{p}: not a valid shard index ({e}); re-save the checkpoint") from e
            files = tuple(d / f for f in sorted(set(weight_map.values())))
            return ("safetensors" if index.startswith("model.safetensors") else "torch"), files
    for single in HF_SINGLE:
        if (d / single).is_file():
            return ("safetensors" if single.endswith(".safetensors") else "torch"), (d / single,)
    return None


def _dir_complete(d: Path, kind: str, trainer_run: bool, step: int) -> str | None:
    """Why a step directory is incomplete, or None if it is complete."""
    if kind == "dcp":
        return None if (d / ".metadata").is_file() else "no .metadata yet (dcp.save writes it last)"
    state = d / "trainer_state.json"
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


def discover(root: str | os.PathLike) -> Discovery:
    """The complete checkpoints under ``root`` (absolute paths), in step order; raises CheckpointError if none."""
    root = Path(root).resolve()
    if not root.exists():
        raise CheckpointError(f"{root}: no such directory; point farcast at the directory your trainer saves into")
    if not root.is_dir():
        raise CheckpointError(f"{root}: is a file; point farcast at the directory that holds the checkpoints")
    subdirs, files, skipped = [], [], []
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            how = _dir_weights(p)
            if how is not None:
                subdirs.append((p, how))
        elif p.suffix in WEIGHT_SUFFIXES:
            files.append(p)
    own = _dir_weights(root)
    if own is not None and not any((p / "trainer_state.json").is_file() for p, _ in subdirs):
        raise CheckpointError(
            f"{root}: is a single checkpoint; point farcast at the directory that holds the sequence "
            f"({root.parent})"
        )
    if subdirs:
        if own is not None:  # a Trainer output_dir after trainer.save_model(): the final model beside checkpoint-N/
            skipped.append((root, f"the model files in the directory itself ({', '.join(sorted(f.name for f in files)) or 'weights'}: "
                                  "trainer.save_model()'s copy) are not part of the sequence"))
        else:
            for f in files:
                skipped.append((f, "a file beside step directories is not part of the sequence"))
        return _discover_dirs(root, subdirs, skipped)
    if files:
        return _discover_files(root, files, skipped)
    raise CheckpointError(f"{root}: no checkpoints found; {NAMING_HELP}")


def _discover_dirs(root: Path, subdirs, skipped) -> Discovery:
    kinds = {how[0] == "dcp" for _, how in subdirs}
    if len(kinds) > 1:
        raise CheckpointError(f"{root}: mixes torch.distributed.checkpoint and weight-file directories; keep one run per directory")
    trainer_run = any((p / "trainer_state.json").is_file() for p, _ in subdirs)
    layout = "dcp" if True in kinds else ("hf" if trainer_run else "dirs")
    by_step: dict[int, Checkpoint] = {}
    for p, (kind, weight_files) in subdirs:
        step = step_of(p.name)
        if step is None:
            raise CheckpointError(f"{p}: holds weights but its name has no step number; {NAMING_HELP}")
        why = _dir_complete(p, kind, trainer_run, step)
        if why:
            skipped.append((p, why))
            continue
        if step in by_step:
            raise CheckpointError(f"{p} and {by_step[step].path}: both are step {step}; keep one")
        by_step[step] = Checkpoint(step, p, kind, weight_files, layout)
    if not by_step:
        raise CheckpointError(f"{root}: no complete checkpoint yet ({skipped[0][0].name}: {skipped[0][1]})")
    return Discovery(root, layout, [by_step[s] for s in sorted(by_step)], skipped)


def _discover_files(root: Path, files, skipped) -> Discovery:
    by_step: dict[int, Checkpoint] = {}
    for p in files:
        step = step_of(p.name)
        if step is None:
            if p.suffix == ".ckpt" and p.stem.startswith("last"):
                skipped.append((p, "Lightning's copy of the newest checkpoint (no step in its name)"))
                continue
            raise CheckpointError(f"{p}: no step number in the file name; {NAMING_HELP}")
        if step in by_step:
            raise CheckpointError(f"{p} and {by_step[step].path}: both are step {step}; keep one per step")
        kind = "safetensors" if p.suffix == ".safetensors" else "torch"
        by_step[step] = Checkpoint(step, p, kind, (p,), "files")
    return Discovery(root, "files", [by_step[s] for s in sorted(by_step)], skipped)


# ---------------------------------------------------------------- provenance


def is_inside(path: str | os.PathLike, directory: str | os.PathLike) -> bool:
    """Whether ``path`` is ``directory`` or lies inside it, both resolved (outputs never land in their input)."""
    path, directory = Path(path).resolve(), Path(directory).resolve()
    return path == directory or directory in path.parents


def file_manifest(path: Path) -> dict[str, list[int]]:
    """{file: [size, mtime_ns]} of a step (its directory's files, recursively, or the step file itself).

    Recorded at ingest, so that emit and later ingests can tell the same checkpoint from a
    rewritten one (a run restarted into the same directory writes the same names again).
    """
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return {path.name: [st.st_size, st.st_mtime_ns]}
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[p.relative_to(path).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def manifest_change(path: Path, recorded: dict[str, list[int]]) -> str | None:
    """How the step at ``path`` differs from its ``recorded`` manifest, or None if it is the same."""
    path = Path(path)
    if not path.exists():
        return f"{path}: is gone"
    base = path if path.is_dir() else path.parent
    now = file_manifest(path)
    for name, (size, mtime) in recorded.items():
        if name not in now:
            return f"{base / name}: is gone"
        if now[name] != [size, mtime]:
            return (f"{base / name}: changed since it was ingested (size {size} -> {now[name][0]} bytes, "
                    f"modified {_when(mtime)} -> {_when(now[name][1])})")
    extra = sorted(set(now) - set(recorded))
    if extra:
        return f"{base / extra[0]}: appeared since the checkpoint was ingested"
    return None


def _when(ns: int) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


# ---------------------------------------------------------------- readers


class CheckpointReader:
    """Lazy access to one checkpoint: headers first, then tensor slices on demand."""

    tensors: dict[str, TensorInfo]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Values [start, stop) of the flattened tensor, in the store's representation."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(ckpt: Checkpoint, allow_pickle: bool = False) -> CheckpointReader:
    """A reader for one checkpoint; headers are parsed and validated here."""
    if ckpt.kind == "safetensors":
        return SafetensorsReader(ckpt.files)
    if ckpt.kind == "torch":
        return TorchReader(ckpt.files, allow_pickle)
    return DCPReader(ckpt.files[0])


_DAMAGED = "the file is incomplete or damaged: re-save it, or move this checkpoint aside and rerun"


MAX_HEADER = 100_000_000  # bytes; the safetensors library's own limit


def read_safetensors_header(path: Path) -> tuple[int, dict]:
    """(data start offset, header dict) of a safetensors file, validated as the safetensors library does.

    Accepted exactly when ``safetensors.safe_open`` accepts the file: a JSON object header of at
    most 100 MB that fits the file; every tensor with a known dtype, a shape and data offsets;
    the tensors, ordered by offset, tile the data section from byte 0 without gap or overlap, each
    exactly as long as its shape and dtype need, and end where the file ends.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated ({size} bytes, no safetensors header); {_DAMAGED}")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: bad safetensors header (length {n}, file size {size}); {_DAMAGED}")
            raw = f.read(n)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: vanished while being read (rotated by the trainer?); rerun") from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise CheckpointError(f"{path}: bad safetensors header (not JSON, or not an object); {_DAMAGED}") from e
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: bad safetensors header (__metadata__ is not a map of strings); {_DAMAGED}")
    spans = []
    for name, h in header.items():
        if name == "__metadata__":
            continue
        try:
            if not isinstance(h["shape"], list) or len(h["data_offsets"]) != 2:
                raise ValueError("bad shape or offsets")
            dtype = DTYPES[SAFETENSORS_DTYPES[h["dtype"]]]
            shape = tuple(_uint(d) for d in h["shape"])
            begin, end = (_uint(o) for o in h["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor '{name}': unsupported or bad header entry {h}; {_DAMAGED}") from e
        spans.append((begin, end, name, math.prod(shape) * dtype.storage.itemsize))
    pos = 0
    for begin, end, name, nbytes in sorted(spans):
        if begin != pos or end < begin:
            raise CheckpointError(
                f"{path}: tensor '{name}': data offsets [{begin}, {end}] "
                + ("overlap the previous tensor" if begin < pos else "leave a gap after the previous tensor" if begin > pos
                   else "are reversed")
                + f"; {_DAMAGED}"
            )
        if end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor '{name}': header size does not match shape and dtype; {_DAMAGED}")
        pos = end
    if 8 + n + pos > size:
        cut = next(name for _, end, name, _ in sorted(spans) if 8 + n + end > size)
        raise CheckpointError(
            f"{path}: truncated: tensor '{cut}' ends at byte {8 + n + header[cut]['data_offsets'][1]} but the file "
            f"has {size}; {_DAMAGED}"
        )
    if 8 + n + pos < size:
        raise CheckpointError(f"{path}: {size - 8 - n - pos} bytes after the last tensor; {_DAMAGED}")
    return 8 + n, header


def _uint(v) -> int:
    """A JSON non-negative integer (safetensors' usize): no bools, no floats, no negatives."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v >= 2**64:
        raise ValueError(f"{v!r} is not a non-negative integer")
    return v


class SafetensorsReader(CheckpointReader):
    """safetensors files read with plain positioned reads: memory is the slice, never the file."""

    def __init__(self, files: tuple[Path, ...]):
        self.tensors, self._where = {}, {}
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{path}: vanished (rotated by the trainer?), or named by the shard index but "
                                      "never written; rerun, or move this checkpoint aside")
            base, header = read_safetensors_header(path)  # validated: offsets tile the data exactly
            for name, h in header.items():
                if name == "__metadata__":
                    continue
                dtype = DTYPES[SAFETENSORS_DTYPES[h["dtype"]]]
                self.tensors[name] = TensorInfo(name, tuple(h["shape"]), dtype.name, str(path))
                self._where[name] = (path, base + h["data_offsets"][0], dtype.storage)
        self._fds: dict[Path, int] = {}

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        path, offset, np_dtype = self._where[name]
        stop = self.tensors[name].numel if stop is None else stop
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except FileNotFoundError as e:
                raise CheckpointError(f"{path}: vanished while being read (rotated by the trainer?); nothing of this "
                                      "step was committed: rerun") from e
        out = np.empty(stop - start, dtype=np_dtype)
        view = memoryview(out).cast("B")
        want, pos, got = view.nbytes, offset + start * np_dtype.itemsize, 0
        while got < want:
            n = os.preadv(fd, [view[got:]], pos + got)
            if n == 0:
                raise CheckpointError(f"{path}: tensor '{name}': short read (file shrank while reading); {_DAMAGED}")
            got += n
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def _state_dict_of(obj, path: Path) -> dict:
    """The tensors of a torch pickle: a raw state dict, or one under state_dict/model."""
    import torch

    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(
        f"{path}: holds no state dict (expected tensors at the top level or under 'state_dict'/'model')"
    )


class TorchReader(CheckpointReader):
    """Plain torch and Lightning pickles, memory-mapped; sliced per read."""

    def __init__(self, files: tuple[Path, ...], allow_pickle: bool):
        self.tensors, self._data = {}, {}
        for path in files:
            obj = self._load(path, allow_pickle)
            for name, t in _state_dict_of(obj, path).items():
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


class DCPReader(CheckpointReader):
    """torch.distributed.checkpoint directories: planned from .metadata, one tensor loaded at a time."""

    def __init__(self, path: Path):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        try:
            meta = FileSystemReader(str(path)).read_metadata()
        except Exception as e:
            raise CheckpointError(f"{path}/.metadata: cannot be read ({type(e).__name__}); {_DAMAGED}") from e
        self.tensors = {}
        for name, m in meta.state_dict_metadata.items():
            if isinstance(m, TensorStorageMetadata) and not name.startswith(("optim", "optimizer")):
                try:
                    dtype = dtype_of(m.properties.dtype).name
                except KeyError as e:
                    raise CheckpointError(f"{path}: tensor '{name}': unsupported dtype {m.properties.dtype}") from e
                self.tensors[name] = TensorInfo(name, tuple(m.size), dtype, str(path))
        self._cached = None  # (name, tensor): one whole tensor at a time

    def _tensor(self, name: str):
        if self._cached is None or self._cached[0] != name:
            import torch
            import torch.distributed.checkpoint as dcp

            info = self.tensors[name]
            buf = {name: torch.empty(info.shape, dtype=DTYPES[info.dtype].torch)}
            self._cached = None
            try:
                dcp.load(buf, storage_reader=dcp.FileSystemReader(str(self.path)), no_dist=True)
            except Exception as e:
                raise CheckpointError(f"{self.path}: tensor '{name}': cannot be loaded ({type(e).__name__}: {e}); {_DAMAGED}") from e
            self._cached = (name, buf[name])
        return self._cached[1]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        return to_storage(self._tensor(name).reshape(-1)[start:stop])

    def close(self) -> None:
        self._cached = None
