"""Directory helpers of the spool and the cache: per-process private directories, orphan
clean-up, removal that no reader sees half-done, streamed copies.

Atomic writes and fsyncs are not here: they live in ``forgedit.durable`` (one implementation
for the whole project), which the spool and the cache import directly."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

_COPY_CHUNK = 8 * 1024 * 1024


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def copy_file_durable(src: Path, dst: Path) -> None:
    """Stream ``src`` to ``dst`` in chunks (never the whole file in memory) and fsync it."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, _COPY_CHUNK)
        fout.flush()
        os.fsync(fout.fileno())


def remove_tree(path: Path, trash_dir: Path) -> None:
    """Remove a directory so that no reader ever sees it half-deleted: rename it into
    ``trash_dir`` first (atomic), then delete it there."""
    if not path.exists():
        return
    doomed = private_dir(trash_dir, "trash")
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, doomed / path.name)
    shutil.rmtree(doomed, ignore_errors=True)


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
    return total


def private_dir(parent: Path, kind: str) -> Path:
    """A fresh directory under ``parent`` named after this process (``kind.PID.random``), so
    that ``remove_orphans`` run by another process sharing ``parent`` never touches it."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{kind}.{os.getpid()}.", dir=parent))


def remove_orphans(parent: Path) -> None:
    """Remove directories left under ``parent`` by processes that no longer run (a crash in
    the middle of writing). Directories of live processes are left alone."""
    if not parent.is_dir():
        return
    for child in parent.iterdir():
        parts = child.name.split(".")
        pid = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue
        if pid == os.getpid():
            continue
        shutil.rmtree(child, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
