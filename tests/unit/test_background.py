"""``forgedit.background.BackgroundWork``: a caller stops waiting for work it cannot interrupt,
and the work's fate stays defined (it ends, its failure is reported or logged, the next call
waits for it)."""

from __future__ import annotations

import logging
import threading

import pytest

from forgedit.background import BackgroundWork
from forgedit.errors import CancelledError
from forgedit.events import CancelToken


def test_the_result_and_the_error_of_work_reach_the_caller() -> None:
    work = BackgroundWork("test-build")
    assert work.run(lambda: 42, "the answer") == 42

    def fails() -> None:
        raise ValueError("no graph")

    with pytest.raises(ValueError, match="no graph"):
        work.run(fails, "a failing build")
    assert not work.busy and work.settle(timeout=0)


def test_a_cancelled_caller_stops_waiting_and_the_next_call_waits_for_the_work() -> None:
    gate = threading.Event()
    order: list[str] = []
    work = BackgroundWork("test-build", poll_s=0.01)
    cancel = CancelToken()
    threading.Timer(0.05, cancel.cancel, kwargs={"reason": "cancelled by the client"}).start()

    def held() -> None:
        gate.wait(30)
        order.append("build")

    with pytest.raises(CancelledError, match="cancelled by the client"):
        work.run(held, "a held build", cancel)
    assert work.busy and not work.settle(timeout=0.05)
    builds = [t for t in threading.enumerate() if t.name == "test-build"]
    assert builds and not any(t.daemon for t in builds)  # the interpreter waits for it at exit
    # A cancelled waiter for the settle stops at once too.
    settled = CancelToken()
    settled.cancel()
    with pytest.raises(CancelledError):
        work.settle(settled)

    gate.set()
    assert work.run(lambda: order.append("next") or "ok", "the next job's build") == "ok"
    assert order == ["build", "next"]  # never beside the build it left running
    with pytest.raises(CancelledError):  # a job cancelled before its build starts none
        work.run(lambda: order.append("wasted"), "a build nobody needs", settled)
    assert order == ["build", "next"]


def test_the_failure_of_work_nobody_waits_for_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    gate = threading.Event()
    work = BackgroundWork("test-build", poll_s=0.01)
    cancel = CancelToken()
    threading.Timer(0.05, cancel.cancel).start()

    def fails_later() -> None:
        gate.wait(30)
        raise RuntimeError("out of workspace")

    with pytest.raises(CancelledError):
        work.run(fails_later, "a doomed build", cancel)
    gate.set()
    with caplog.at_level(logging.WARNING, logger="forgedit.background"):
        assert work.settle(timeout=30)
    assert "a doomed build failed after its job stopped waiting" in caplog.text
    assert "out of workspace" in caplog.text
