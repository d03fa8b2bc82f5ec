"""Advisory file locks (``fcntl.flock``) that serialise work on one edit model across threads
*and* processes of a replica.

``flock`` locks belong to an open file description, so two ``open()`` calls conflict even
inside one process: the same lock works between threads and between processes. Lock files are
named by validated edit-model IDs only and live under ``DATA/locks``; they are never deleted
(deleting a lock file that another process holds open would split the lock in two).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockBusy(Exception):
    """A non-blocking lock attempt found the lock held."""


@contextmanager
def file_lock(path: Path, *, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block.

    With ``blocking=False`` raises ``LockBusy`` at once instead of waiting.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            raise LockBusy(path.name) from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
