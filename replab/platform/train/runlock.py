"""One process per run: an exclusive lock on the run's storage folder.

Two identical commands would otherwise share one MLflow run and one checkpoint folder. :func:`run_lock` holds
``fcntl.flock`` on ``<storage_path>/<run name>/.replab.lock`` (a folder under the temp dir for URI storage)
for the duration of the run. The kernel drops the lock when its holder exits, however it exits, so a lock
left by a dead process is simply taken over; the file only records the holder's pid for the message.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from replab.platform.train.errors import RunLocked

LOCK_FILE = ".replab.lock"


def lock_path(storage_path: str, name: str) -> Path:
    if "://" in storage_path:  # object stores have no locks: lock on this machine only
        digest = hashlib.sha1(f"{storage_path.rstrip('/')}/{name}".encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / "replab-locks" / f"{name}-{digest}.lock"
    return Path(storage_path) / name / LOCK_FILE


@contextlib.contextmanager
def run_lock(storage_path: str, name: str) -> Iterator[Path]:
    """Hold the run's lock while the block runs; :class:`RunLocked` (one line) when another process holds it."""
    path = lock_path(storage_path, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RunLocked(
                f"run {name} is already being trained by {holder} (lock {path}); wait for it to end, "
                "or stop it and re-run this command to resume"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
