"""Checkpoint layouts, one module per family: reader, writer and state patching side by side.

- ``safetensors_files``: safetensors files (a run of step files, or the weights of a step directory)
- ``torch_files``: torch pickles: raw state dicts, Lightning ``.ckpt``, plain training containers
- ``huggingface``: Hugging Face step directories (the Trainer's files around the weights)
- ``dcp``: torch.distributed.checkpoint directories

This module writes a forecast checkpoint in the layout of the run's newest one (``write``),
under a temporary name renamed into place at the end, so a failure leaves nothing behind.
A run's layout (``Checkpoint.layout``): "hf" (Trainer directories), "dirs" (other step
directories), "dcp" (DCP directories) or "files" (a directory of step files).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from farcast_core.errors import StoreError
from farcast.storage.layouts import dcp, huggingface, safetensors_files, torch_files
from farcast.storage.layouts.base import Forecasted
from farcast.storage.writers import StagedOutput, copy_file

__all__ = ["Forecasted", "newest_path", "output_paths", "chunk_passes", "write", "rename_step"]


def newest_path(layout: str, record: dict) -> Path:
    """The directory or file of a step, from its store record."""
    if "path" in record:
        return Path(record["path"])
    first = Path(record["sources"][0])
    return first.parent if layout in ("hf", "dirs") else first


def output_paths(layout: str, newest: Path, newest_step: int, target: int, out: Path, force: bool = False) -> list[Path]:
    """What ``write`` creates in ``out``: the newest step's name with the target step in it, and for a
    torch step file a safetensors copy of the weights beside it (any framework can read that one).
    Refuses paths that exist unless ``force``."""
    final = out / rename_step(newest.name, newest_step, target)
    finals = [final]
    if layout == "files" and newest.suffix != ".safetensors":
        finals.append(final.with_suffix(".safetensors"))
    for f in finals:
        if f.exists() and not force:
            raise StoreError(f"{f}: already exists; pass --force to replace it, or choose another --out")
    return finals


def chunk_passes(layout: str, sources: list[Path], finals: list[Path]) -> int:
    """How many times ``write`` asks for each chunk of the forecast (once per weights file written)."""
    if layout == "dcp" or len(finals) > 1:
        return 2
    if layout in ("hf", "dirs") and not any(s.suffix == ".safetensors" for s in sources):
        return 2
    return 1


def write(layout: str, sources: list[Path], finals: list[Path], fc: Forecasted, force: bool) -> tuple[Path, list[str]]:
    """The forecast checkpoint at ``finals`` (from ``output_paths``), shaped like the newest step,
    whose weight files are ``sources``; returns its path and the names of the files written."""
    if layout in ("hf", "dirs", "dcp"):
        src_dir = sources[0] if layout == "dcp" else sources[0].parent
        with StagedOutput(finals[0], force) as staged:
            files = _write_dir(src_dir, staged.tmp, sources, fc, layout == "dcp")
            return staged.commit(), files
    src, final = sources[0], finals[0]
    with StagedOutput(final, force) as staged:
        _write_weights(src, staged.tmp, fc)
        files = [final.name]
        if len(finals) > 1:
            with StagedOutput(finals[1], True) as side:
                safetensors_files.write_all(side.tmp, fc)
                side.commit()
            files.append(finals[1].name)
        return staged.commit(), files


def _write_weights(src: Path, dst: Path, fc: Forecasted) -> None:
    """``src``'s weights file, same format, holding the forecast."""
    if src.suffix == ".safetensors":
        safetensors_files.write_like(src, dst, fc)
    else:
        torch_files.write_like(src, dst, fc)


def _write_dir(src_dir: Path, dst: Path, sources: list[Path], fc: Forecasted, is_dcp: bool) -> list[str]:
    """A step directory like ``src_dir`` holding the forecast; returns the files written."""
    dst.mkdir(parents=True)
    weight_names = {p.name for p in sources} | set(huggingface.INDEXES)
    written = []
    for p in sorted(src_dir.iterdir()):
        if (is_dcp and dcp.is_weights(p)) or p.name in weight_names:
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        elif not huggingface.write_trainer_file(p, dst / p.name, fc, fc.lr_factor):
            copy_file(p, dst / p.name)
        written.append(p.name)
    if is_dcp:
        written += dcp.write(dst, fc)
    else:
        for src in sources:
            _write_weights(src, dst / src.name, fc)
            written.append(src.name)
        written += huggingface.write_index(src_dir, dst, fc)
    if is_dcp or not any(s.suffix == ".safetensors" for s in sources):
        safetensors_files.write_all(dst / "forecast.safetensors", fc)
        written.append("forecast.safetensors")
    return written


def rename_step(name: str, old: int, new: int) -> str:
    """``name`` with its step number ``old`` replaced by ``new``, keeping zero padding."""
    runs = [m for m in re.finditer(r"\d+", name) if int(m.group()) == old]
    if not runs:
        return f"{name}-step{new}"
    m = runs[-1]
    digits = m.group()
    rep = str(new).zfill(len(digits)) if digits.startswith("0") and len(digits) > 1 else str(new)
    return name[: m.start()] + rep + name[m.end() :]
