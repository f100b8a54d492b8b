"""One writer per run directory: an exclusive lock held for a whole invocation.

The lock is an OS file lock (`filelock`, flock on POSIX) on `<run_dir>/.lock`, so it disappears with
the process that held it: a run killed by any signal leaves no lock behind. Beside it, `lock.json`
records the holder (pid, host, command, start time) for the message a second invocation prints; a
record left by a dead holder is reported and replaced.

Across machines the lock is as good as the shared file system's locking: NFSv4 (and Linux's flock
emulation over it) and Lustre honour it between clients; file systems without locks (some FUSE mounts,
object stores) do not, and there only one invocation at a time may use a run directory.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from filelock import FileLock, Timeout

from models.errors import UserError
from orchestrator.storage.atomic import write_json

LOCK_FILE = ".lock"
HOLDER_FILE = "lock.json"


class RunDirBusy(UserError):
    """Another invocation holds the run directory; the message names it."""


class RunLock:
    """`with RunLock(root, command, wait=False):` one invocation at a time in `root`."""

    def __init__(self, root: Path, command: str, wait: bool = False, log=print):
        self.root, self.command, self.wait, self.log = Path(root), command, wait, log
        self._lock = FileLock(str(self.root / LOCK_FILE))

    def holder(self) -> dict | None:
        """Who holds (or last held) the lock, from `lock.json`; None when unknown."""
        try:
            return json.loads((self.root / HOLDER_FILE).read_text())
        except (OSError, ValueError):
            return None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "RunLock":
        """Take the lock (or wait for it with `wait`); RunDirBusy names the holder otherwise."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            h = self.holder() or {}
            who = (f"pid {h.get('pid')} on {h.get('host')} since {h.get('started')}: {h.get('command')}"
                   if h else "another process")
            if not self.wait:
                raise RunDirBusy(f"run directory {self.root} is in use by {who}; wait for it to finish, pass --wait "
                                 "to queue behind it, or use another --run-dir") from None
            self.log(f"run directory {self.root} is in use by {who}; waiting for it (--wait)")
            self._lock.acquire()
        stale = self.holder()
        if stale is not None:  # the lock was free, so its last holder ended without cleaning up
            self.log(f"run directory {self.root}: the previous run (pid {stale.get('pid')} on {stale.get('host')}, "
                     f"started {stale.get('started')}) ended without releasing it; taking over")
        write_json(self.root / HOLDER_FILE, {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                                             "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            (self.root / HOLDER_FILE).unlink(missing_ok=True)
            self._lock.release()
