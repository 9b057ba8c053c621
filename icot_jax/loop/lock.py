"""One training process per run directory: an advisory lock on ``RUN/lock``.

Two ``icot train`` processes on one run directory (say, a ``--resume`` started while the first still
runs) would both append to ``metrics.jsonl`` and race orbax over the same checkpoint steps. The lock is
an ``flock`` on ``RUN/lock``, which the kernel releases when its process dies however it dies, so a lock
left by a killed process is never mistaken for a live one; the file also names its holder (host, pid)
for the error message. A clean exit empties the file, so a non-empty file found unlocked is the trace of
a process that died holding it: the next run takes it over and says so.

The lock protects a run directory on one machine's file system (for a ``gs://`` run, its local mirror):
it does not reach across machines.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from icot_jax.errors import UserPathError

LOCK_FILE = "lock"


class RunDirLocked(UserPathError):
    """Another live process holds the run directory."""


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {holder.get('since', '?')})"


class RunLock:
    """The lock of one run directory, held from :meth:`acquire` to :meth:`release`.

    ``stale_holder`` is the holder recorded by a process that died holding the lock (taken over), or None.
    """

    def __init__(self, run_dir: Path | str):
        self.path = Path(run_dir) / LOCK_FILE
        self.stale_holder: dict | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunDirLocked` naming the live holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirLocked(f"{self.path.parent} is in use by another `icot train`: {_describe(holder)}; wait "
                               "for it to finish or stop it first (Ctrl-C or SIGTERM saves a checkpoint)") from None
        self.stale_holder = _read_holder(fd) or None
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def describe_stale(self) -> str | None:
        """A line about the dead holder this lock was taken over from, if any."""
        if self.stale_holder is None:
            return None
        return f"took over the lock of {_describe(self.stale_holder)}, which ended without releasing it"

    def release(self) -> None:
        """Empty the file (a clean exit) and unlock. The file stays: removing it would let a process that
        opened it just before take a lock on a file that no longer has a name."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> dict:
    """The holder recorded in the lock file (``{}`` when empty or unreadable: a half-written record)."""
    text = os.pread(fd, 4096, 0).decode(errors="replace")
    try:
        holder = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}
