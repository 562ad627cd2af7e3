"""One writer per store: an exclusive lock that names its holder.

Local stores: ``<store>/.farcast.lock``, held with ``flock`` for as long as the writer runs, the
holder's PID, host, command and start time written into it. The kernel drops an ``flock`` when
its process dies (even by SIGKILL), so a lock left by a dead process is simply taken over; a
stopped or live holder keeps it, and the next writer waits, then refuses naming the holder.

fsspec stores (s3://, memory://, ...): an object ``<store>/.farcast.lock`` created exclusively
(mode "xb") holding the same record; a record left by a dead process on this host is taken
over, one from another host is reported with how to remove it.

Written here rather than taken from ``filelock``: its 4.x API changed shape, and it truncates
the lock file on every attempt, which would erase the holder record a refusal must name.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from farcast_core.errors import StoreLockedError

LOCK_NAME = ".farcast.lock"
log = logging.getLogger("farcast")

# Process-wide holds, so that nested writers in one process (a flow's tasks, run --direct) share one lock.
_held: dict[str, list] = {}  # key -> [count, handle]
_guard = threading.RLock()


def lock_wait_seconds() -> float:
    """How long a second writer waits for the lock before refusing (FARCAST_LOCK_WAIT, default 30 s)."""
    try:
        return max(0.0, float(os.environ.get("FARCAST_LOCK_WAIT", "30")))
    except ValueError:
        return 30.0


def _record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv else "python"}


def _describe(rec: dict | None) -> str:
    if not rec:
        return "another process"
    return f"PID {rec.get('pid')} on {rec.get('host')} ({rec.get('command') or '?'}, since {rec.get('since')})"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """``with StoreLock(url): ...`` holds the store's writer lock (re-entrant within a process)."""

    def __init__(self, url: str | os.PathLike, wait: float | None = None):
        self.url = str(url)
        self.wait = lock_wait_seconds() if wait is None else wait
        self.local = "://" not in self.url or self.url.startswith("file://")
        if self.local:
            self.path = Path(self.url.removeprefix("file://")).resolve() / LOCK_NAME
            self.key = str(self.path)
        else:
            self.path = self.url.rstrip("/") + "/" + LOCK_NAME
            self.key = self.path

    def __enter__(self) -> "StoreLock":
        with _guard:
            held = _held.get(self.key)
            if held is not None:
                held[0] += 1
                return self
        handle = self._acquire()
        with _guard:
            _held[self.key] = [1, handle]
        return self

    def __exit__(self, *exc) -> None:
        with _guard:
            held = _held[self.key]
            held[0] -= 1
            if held[0]:
                return
            del _held[self.key]
        self._release(held[1])

    # ------------------------------------------------------------ acquiring

    def _acquire(self):
        deadline = time.monotonic() + self.wait
        said = False
        while True:
            got, holder = self._try()
            if got is not None:
                return got
            if time.monotonic() >= deadline:
                raise StoreLockedError(
                    f"{self.url}: another farcast is writing this store: {_describe(holder)}; wait for it to "
                    f"finish (or stop it) and rerun" + ("" if self.local else f"; if that process is gone, delete {self.path}")
                )
            if not said:
                log.warning("waiting up to %.0f s for %s, held by %s", self.wait, self.url, _describe(holder))
                said = True
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _try(self):
        """(handle, None) when acquired, else (None, the holder's record)."""
        return self._try_local() if self.local else self._try_remote()

    def _try_local(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = _read_json(lambda: os.pread(fd, 4096, 0))
            os.close(fd)
            return None, holder
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            same = False
        if not same:  # the file was removed or replaced between open and flock: lock the one there now
            os.close(fd)
            return self._try_local()
        raw = json.dumps(_record()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, raw, 0)
        return fd, None

    def _fs(self):
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.path)
        return fs, path

    def _try_remote(self):
        fs, path = self._fs()
        rec = _record()
        try:
            with fs.open(path, "xb") as f:
                f.write(json.dumps(rec).encode())
            return rec, None
        except FileExistsError:
            pass
        holder = _read_json(lambda: fs.cat_file(path))
        if holder and holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", 0))):
            log.warning("taking over %s: left by %s, which is no longer running", self.path, _describe(holder))
            fs.rm_file(path)
            return self._try_remote()
        return None, holder

    def _release(self, handle) -> None:
        if self.local:
            import fcntl

            try:  # empty the record first: a reader never names a holder that has left
                os.ftruncate(handle, 0)
                fcntl.flock(handle, fcntl.LOCK_UN)
            finally:
                os.close(handle)
            return
        fs, path = self._fs()
        try:
            if _read_json(lambda: fs.cat_file(path)) == handle:
                fs.rm_file(path)
        except FileNotFoundError:
            pass


def _read_json(read) -> dict | None:
    try:
        return json.loads(read() or b"null")
    except (OSError, ValueError):
        return None


__all__ = ["LOCK_NAME", "StoreLock", "lock_wait_seconds", "pid_alive"]
