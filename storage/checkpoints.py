"""Find the checkpoints of a training run and read them lazily, one tensor slice at a time.

Layouts understood (see ``discover``):
- a directory of step-numbered sub-directories: Hugging Face Trainer ``checkpoint-<step>/``
  (``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, or
  ``pytorch_model.bin``), plain ``save_pretrained`` / accelerate ``save_state`` directories, or
  torch.distributed.checkpoint directories (``.metadata`` + ``*.distcp``);
- a flat directory of step-numbered files: ``.safetensors``, plain torch ``.pt``/``.pth``/``.bin``
  state dicts (raw or under ``model``/``state_dict``), Lightning ``.ckpt``.

Readers return values in the store's representation (``farcast_core.dtypes``): exact bits. Each
format's reader lives with its writer in ``storage.layouts``; this module finds the steps and
records what they were (file manifests), so that a rewritten checkpoint is told from the one ingested.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from farcast_core.errors import CheckpointError, StoreError
from farcast.storage.layouts import dcp, huggingface, safetensors_files, torch_files
from farcast.storage.layouts.base import CheckpointReader, TensorInfo

__all__ = ["Checkpoint", "CheckpointReader", "Discovery", "TensorInfo", "discover", "open_checkpoint", "step_of",
           "is_inside", "file_manifest", "manifest_change", "ingested_sources"]

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
NAMING_HELP = (
    "name each checkpoint with its global step, e.g. checkpoint-1200/, step_001200.safetensors, "
    "model_1200.pt or epoch=3-step=1200.ckpt"
)

_STEP_WORD = re.compile(r"(?:global_step|step|checkpoint|ckpt|iteration|iter)[-_=]?(\d+)", re.I)
_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class Checkpoint:
    """One saved step of a run."""

    step: int
    path: Path  # the step's directory or file
    format: str  # "safetensors", "torch" or "dcp": how its weights are read
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
    if dcp.is_dcp_dir(d):
        return "dcp", (d,)
    return huggingface.weights_of(d)


def _dir_complete(d: Path, fmt: str, trainer_run: bool, step: int) -> str | None:
    """Why a step directory is incomplete, or None if it is complete."""
    if fmt == "dcp":
        return dcp.incomplete(d)
    return huggingface.incomplete(d, trainer_run, step)


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
    if own is not None and not any(huggingface.is_trainer_dir(p) for p, _ in subdirs):
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
    is_dcp = {how[0] == "dcp" for _, how in subdirs}
    if len(is_dcp) > 1:
        raise CheckpointError(f"{root}: mixes torch.distributed.checkpoint and weight-file directories; keep one run per directory")
    trainer_run = any(huggingface.is_trainer_dir(p) for p, _ in subdirs)
    layout = "dcp" if True in is_dcp else ("hf" if trainer_run else "dirs")
    by_step: dict[int, Checkpoint] = {}
    for p, (fmt, weight_files) in subdirs:
        step = step_of(p.name)
        if step is None:
            raise CheckpointError(f"{p}: holds weights but its name has no step number; {NAMING_HELP}")
        why = _dir_complete(p, fmt, trainer_run, step)
        if why:
            skipped.append((p, why))
            continue
        if step in by_step:
            raise CheckpointError(f"{p} and {by_step[step].path}: both are step {step}; keep one")
        by_step[step] = Checkpoint(step, p, fmt, weight_files, layout)
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
        fmt = "safetensors" if p.suffix == ".safetensors" else "torch"
        by_step[step] = Checkpoint(step, p, fmt, (p,), "files")
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


def ingested_sources(rec: dict, store_url: str, source: str) -> list[Path]:
    """The weight files of the step a store records as ``rec``, checked to be the files that were ingested."""
    sources = [Path(p) for p in rec["sources"]]
    if not all(p.is_absolute() for p in sources):
        raise StoreError(f"{store_url}: records source paths relative to where ingest ran ({sources[0]}), "
                         "written by an older farcast; ingest the run into a new --store")
    if "files" in rec:
        changed = manifest_change(Path(rec["path"]), rec["files"])
    else:
        changed = next((f"{p}: is gone" for p in sources if not p.exists()), None)
    if changed:
        raise StoreError(
            f"{changed}: step {rec['step']}, the newest in {store_url}, is not the checkpoint that was ingested "
            f"(rotated away, rewritten, or the run restarted into {source}); rerun 'farcast ingest'"
        )
    return sources


def _when(ns: int) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


# ---------------------------------------------------------------- readers


def open_checkpoint(ckpt: Checkpoint, allow_pickle: bool = False) -> CheckpointReader:
    """A reader for one checkpoint (its format's module: ``storage.layouts``); headers are parsed and validated here."""
    if ckpt.format == "safetensors":
        return safetensors_files.SafetensorsReader(ckpt.files)
    if ckpt.format == "torch":
        return torch_files.TorchReader(ckpt.files, allow_pickle)
    return dcp.DCPReader(ckpt.files[0])




