"""When to try a call again, and how long to wait first.

Two situations, one policy object:

- **Before the first event** (or for a unary call) an UNAVAILABLE status means the call never
  reached a replica that took it: no server up yet, a replica draining, a connection reset.
  Sending it again is safe — Edit and Sample carry a ``request_id``, so even a request that
  did reach a server re-attaches to the same job instead of starting a second one.
- **After events have arrived**, a dropped connection (UNAVAILABLE) is resumed by re-attaching
  to the job with ``WatchJob(request_id, after_sequence=<last seen>)``; the same budget of
  attempts and backoff applies, counted afresh after each successful resume.

Backoff is exponential with *full jitter* (a uniform draw in ``[0, cap]``, the AWS
Architecture Blog's recommendation), so clients that lost the same replica do not reconnect in
lock step. A server's ``RetryInfo`` hint, when present, is used as the lower bound.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import grpc

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts`` counts the first try (1 = never retry). Delays in seconds."""

    max_attempts: int = 5
    initial_backoff: float = 0.5
    max_backoff: float = 10.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 <= self.initial_backoff <= self.max_backoff:
            raise ValueError("need 0 <= initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")

    def should_retry(self, code: grpc.StatusCode | None, attempt: int) -> bool:
        """Whether to try again after ``attempt`` (1-based) failed with ``code``."""
        return code in RETRYABLE_CODES and attempt < self.max_attempts

    def backoff(
        self,
        attempt: int,
        *,
        server_hint: float | None = None,
        rand: Callable[[float, float], float] = random.uniform,
    ) -> float:
        """Seconds to wait after failed ``attempt`` (1-based): full jitter under the capped
        exponential ``initial * multiplier**(attempt-1)``, never below the server's hint."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        delay = rand(0.0, cap)
        if server_hint is not None:
            delay = max(delay, min(server_hint, self.max_backoff))
        return delay


NO_RETRY = RetryPolicy(max_attempts=1)
