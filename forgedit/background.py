"""Work a job cannot stop midway, run so that the job can stop waiting for it.

Exporting or building a compiled UNet for a new resolution takes seconds to minutes in native
code (the ONNX exporter, an ONNX Runtime session, TensorRT's builder) that no cancel token can
interrupt. ``BackgroundWork.run`` runs such work on a thread of its own and waits for it,
checking the job's ``CancelToken`` as it waits: a cancelled job raises ``CancelledError``
within ``poll_s``, and the work goes on to its end. Its fate is then defined: it finishes, and
what it built is kept for the next job that needs it (an export is published whole or not at
all, by its own temporary directory and rename); if it fails, the failure is logged and the
next job that needs it tries again.

The engine is one job at a time and the work uses it, so ``run`` and ``settle`` first wait
for work still in flight: the next job never touches the engine while a build does.

Shutdown: the thread is not a daemon, so the interpreter waits for it at exit instead of
finalizing while it runs native code. (A daemon thread that wakes during finalization is ended
with ``pthread_exit``, whose unwinding through C++ frames aborts the process: "terminate called
without an active exception".)
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from forgedit.events import CancelToken

log = logging.getLogger("forgedit.background")

T = TypeVar("T")


class _Task(Generic[T]):
    """One piece of work on its own (non-daemon) thread, and how it ended."""

    def __init__(self, work: Callable[[], T], name: str, what: str) -> None:
        self.what = what
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None
        self.abandoned = False  # its caller stopped waiting (cancelled)
        self._work = work
        self.thread = threading.Thread(target=self._run, name=name, daemon=False)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self._work()
        except BaseException as e:  # reported to whoever waits, or logged when nobody does
            self.error = e
        finally:
            self.done.set()

    def wait(self, cancel: CancelToken | None, poll_s: float, timeout: float | None) -> bool:
        """Wait for the end; False after ``timeout``; ``CancelledError`` when ``cancel`` is
        set first (checked every ``poll_s``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = poll_s if cancel is not None else None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return self.done.is_set()
                step = left if step is None else min(step, left)
            if self.done.wait(step):
                return True
            if cancel is not None:
                cancel.check()


class BackgroundWork:
    """Runs one piece of work at a time off the caller's thread (see the module docstring).
    Used from one thread at a time (an engine's)."""

    def __init__(self, thread_name: str, poll_s: float = 0.05) -> None:
        self.thread_name = thread_name
        self.poll_s = poll_s
        self._task: _Task[object] | None = None

    @property
    def busy(self) -> bool:
        """Work is in flight (its caller may have stopped waiting for it)."""
        return self._task is not None and not self._task.done.is_set()

    def run(self, work: Callable[[], T], what: str, cancel: CancelToken | None = None) -> T:
        """``work()``'s result (or its error), waited for on another thread: after work still
        in flight, then this one. ``CancelledError`` as soon as ``cancel`` is set; the work then
        goes on to its end (``settle``)."""
        self.settle(cancel)
        if cancel is not None:
            cancel.check()  # no build for a job already cancelled
        task: _Task[T] = _Task(work, self.thread_name, what)
        self._task = task  # type: ignore[assignment]  # (kept to be settled, result unread)
        try:
            task.wait(cancel, self.poll_s, None)
        except BaseException:
            task.abandoned = True
            log.info("stopped waiting for %s; it finishes in the background", what)
            raise
        self._task = None
        if task.error is not None:
            raise task.error
        return task.result  # type: ignore[return-value]  # (set when error is None)

    def settle(self, cancel: CancelToken | None = None, timeout: float | None = None) -> bool:
        """Wait until no work is in flight (True), or ``timeout`` passed (False);
        ``CancelledError`` when ``cancel`` is set first. The failure of work nobody waited for
        any more is logged here."""
        task = self._task
        if task is None:
            return True
        if not task.done.is_set():
            log.info("waiting for %s, which a cancelled job left running", task.what)
        if not task.wait(cancel, self.poll_s, timeout):
            return False
        self._task = None
        if task.error is not None and task.abandoned:
            log.warning(
                "%s failed after its job stopped waiting for it (%s: %s); the next job that "
                "needs it tries again",
                task.what,
                type(task.error).__name__,
                str(task.error)[:200],
            )
        return True
