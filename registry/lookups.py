"""Optional MLflow lookups, bounded in time and in threads.

Some answers are optional to the caller (is there an edit model to reuse? does a cached copy
still exist?): against a hung MLflow such a lookup would otherwise hold the device's worker
for MLflow's HTTP timeout and retries (minutes). ``BoundedLookups.ask`` waits at most a given
time and lets at most a few lookups wait at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from registry.errors import RegistryUnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")


class BoundedLookups:
    """Runs optional lookups on at most ``threads`` threads at once."""

    def __init__(self, threads: int) -> None:
        self._slots = threading.BoundedSemaphore(threads)

    def ask(self, question: Callable[[], T], timeout_s: float) -> T:
        """``question()`` (an MLflow lookup whose answer is optional to the caller), waited
        for at most ``timeout_s``.

        Raises ``RegistryUnavailableError`` when it does not answer in time, or at once while
        earlier lookups still wait; the thread left waiting ends with MLflow's HTTP timeout.
        Whatever ``question`` raises is raised here."""
        if not self._slots.acquire(blocking=False):
            raise RegistryUnavailableError(
                "the MLflow registry is not answering (earlier lookups still wait for it)"
            )
        answer: list[Any] = []
        done = threading.Event()

        def ask() -> None:
            try:
                answer.append(question())
            except BaseException as e:  # re-raised in the caller
                answer.append(e)
            finally:
                self._slots.release()
                done.set()

        threading.Thread(target=ask, name="registry-lookup", daemon=True).start()
        if not done.wait(timeout_s):
            log.warning("MLflow did not answer a lookup within %.1f s", timeout_s)
            raise RegistryUnavailableError(
                f"the MLflow registry did not answer within {timeout_s:g} s; try again later"
            )
        if isinstance(answer[0], BaseException):
            raise answer[0]
        return answer[0]
