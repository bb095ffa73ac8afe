"""The one file lock of the harness: the journal storage, experiment claims and the LID cache
all take it."""
from __future__ import annotations

import fcntl
from pathlib import Path


class FileLock:
    """An exclusive fcntl lock on a file. The kernel drops it when its holder dies, so a process
    killed while holding it never leaves a lock the others must wait out (Optuna's default
    symlink lock is broken only after a 30 s grace period). Local file systems only. Usable as
    a context manager, and duck-types Optuna's journal lock (acquire / release)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        fcntl.flock(self._file, fcntl.LOCK_EX)
        return True

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
