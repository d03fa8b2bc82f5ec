"""Fair shares of a bounded pool among clients, so that no client can lock the others out.

Two pools follow this rule: the calls the front door counts (open streams, health calls;
``server.interceptors.StreamLimiter``) and the queued jobs (``server.queueing.JobQueue``). A
client is its principal when tokens are configured, else its IP address
(``server.auth.Authenticator.client_of``); calls that need no token count by address.

A client holding ``mine`` of the ``taken`` slots may take one more when (``ShareRule.refusal``)

1. fewer than ``capacity`` are taken,
2. it holds fewer than ``per_client``, and
3. it holds none, or more than ``kept_for_new`` slots are free: the last ``kept_for_new``
   slots go only to clients that hold none.

However many slots a few clients took, up to ``kept_for_new`` other clients can still get one
each at once; a slot that frees while the pool is that full goes to a client that holds none,
and the clients that hold more can take more only once the pool has room again. Nothing is
taken back from a client that holds slots: a stream stays open, a queued job keeps its place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Bound = Literal["capacity", "per-client", "kept-for-new-clients"]


@dataclass(frozen=True)
class Refusal:
    """Which bound a client reached: its ``limit`` and the ``setting`` that sets it (named in
    the refusal's message and QuotaFailure); ``held`` is what the client holds."""

    bound: Bound
    limit: int
    setting: str
    held: int


@dataclass(frozen=True)
class ShareRule:
    """The rule of one pool (see the module docstring), with the settings that set it."""

    capacity: int
    per_client: int
    kept_for_new: int
    capacity_setting: str
    per_client_setting: str
    kept_setting: str

    def __post_init__(self) -> None:
        if self.capacity > 0 and not 0 <= self.kept_for_new < self.capacity:
            raise ValueError(
                f"{self.kept_setting} ({self.kept_for_new}) must be below "
                f"{self.capacity_setting} ({self.capacity})"
            )

    def refusal(self, mine: int, taken: int) -> Refusal | None:
        """Why a client holding ``mine`` of the ``taken`` slots may not take one more; None
        when it may."""
        if taken >= self.capacity:
            return Refusal("capacity", self.capacity, self.capacity_setting, mine)
        if mine >= self.per_client:
            return Refusal("per-client", self.per_client, self.per_client_setting, mine)
        if mine > 0 and self.capacity - taken <= self.kept_for_new:
            return Refusal("kept-for-new-clients", self.kept_for_new, self.kept_setting, mine)
        return None


def quarter(capacity: int) -> int:
    """The default share kept for new clients: a quarter of the pool (rounded down)."""
    return capacity // 4
