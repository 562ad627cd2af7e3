"""Writing without leaving half-written files: atomic files, outputs staged under a temporary name and
renamed into place, leftovers of killed processes swept. The layouts' writers (``storage.layouts``) use these."""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from farcast_core.errors import StoreError
from farcast.storage.lock import pid_alive


@contextmanager
def naming(path: Path):
    """OS errors raised inside name ``path`` when they name no file (a write hitting a full disk)."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file atomically: readers see the old file or the whole new one. ``tensors``:
    torch tensors, or numpy arrays (written without importing torch)."""
    if all(isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.numpy import save_file

        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    else:
        from safetensors.torch import save_file  # here: importing this module must not import torch

        tensors = {k: v.contiguous() for k, v in tensors.items()}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with naming(path):
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_writable_dir(d: Path) -> None:
    """Refuse an output directory that cannot be created or written, before any work is done."""
    d = Path(d)
    probe = d
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise StoreError(f"{probe}: is a file, so {d} cannot be made a directory; choose another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(13, "Permission denied (cannot write there)", str(probe))


def copy_file(src: Path, dst: Path) -> None:
    with naming(dst):
        shutil.copy2(src, dst)


_LEFTOVER = re.compile(r"^\.farcast-(tmp|old)-(\d+)-(.+)$|^\.(.+)\.tmp-(\d+)$")


def sweep_leftovers(d: Path) -> list[str]:
    """Remove what killed farcast processes on this host left in ``d``; returns the names removed.

    A ``.farcast-old-PID-NAME`` whose NAME is missing is the previous output, moved aside by a
    process killed just before it renamed the new one into place: it is put back, not removed.
    """
    removed = []
    try:
        entries = list(d.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _LEFTOVER.match(p.name)
        if not m:
            continue
        pid = int(m.group(2) or m.group(5))
        if pid == os.getpid() or pid_alive(pid):
            continue
        if m.group(1) == "old" and not (d / m.group(3)).exists():
            os.replace(p, d / m.group(3))
            continue
        StagedOutput._clear(p)
        removed.append(p.name)
    return removed


class StagedOutput:
    """A directory entry built under a temporary name beside its final place, then renamed.

    Nothing appears at ``final`` until ``commit``; an error leaves ``final`` as it was.
    """

    def __init__(self, final: Path, overwrite: bool):
        self.final = final
        if final.exists() and not overwrite:
            raise StoreError(f"{final}: already exists; pass --force to replace it, or choose another --out")
        final.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(final.parent)
        self.tmp = final.parent / f".farcast-tmp-{os.getpid()}-{final.name}"
        self._clear(self.tmp)

    @staticmethod
    def _clear(p: Path) -> None:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    def commit(self) -> Path:
        old = self.final.parent / f".farcast-old-{os.getpid()}-{self.final.name}"
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        self._clear(old)
        return self.final

    def abort(self) -> None:
        self._clear(self.tmp)

    def __enter__(self) -> "StagedOutput":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.abort()
