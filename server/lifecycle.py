"""Whether this replica serves: one object owns its state and the health it reports.

    STARTING ──every readiness condition met──▶ READY ──drain──▶ DRAINING ──stop──▶ STOPPED
    (STARTING may go straight to DRAINING or STOPPED)

Readiness is every registered readiness ``Condition`` met. Conditions are registered before
``start`` (the scheduler registers one per device: its engines are loaded and warmed up), and
``start`` closes the list: from then the replica is READY as soon as the last one is met, at
once if there are none. A condition that ``fail``s records the error (``startup_error``) and
the replica never becomes ready (``server.main`` exits).

Health (``grpc.health.v1``) follows the state the moment it changes, by ``HEALTH``: each
service name is SERVING in the states listed for it, NOT_SERVING otherwise.

Who asks: the servicer and the scheduler (``require_ready``: UNAVAILABLE unless READY), and
``DrainingInterceptor`` (``draining``: new calls end UNAVAILABLE once draining started).

Readiness and capacity: readiness does not measure the gRPC port's free capacity, because that
capacity is reserved instead. Every call that can hold the port for long (every stream, every
health call, counted before its request is read) takes a slot of a bounded pool
(``server.interceptors.CallLimitInterceptor``), and the pools add up to less than the calls
gRPC admits at once (``ServerSettings``: FORGEDIT_GRPC_THREADS leaves 8 beyond them), so a READY
replica can always take an authenticated unary call and, within the fair shares, a new stream.
A readiness that followed momentary capacity would let a flood take replicas out of the
Service one after the other; a reservation keeps the flood's effect on the flooder.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Mapping

from grpc_health.v1 import health, health_pb2

from server._proto import forgedit_pb2 as pb
from server.errors import UnavailableError

log = logging.getLogger("server.lifecycle")


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


READINESS_SERVICE = pb.DESCRIPTOR.services_by_name["ForgeditService"].full_name
# A health name only (no such RPC service): the startup probe's. SERVING once every readiness
# condition is met: the scheduler's, every base model's engine built or loaded at every
# declared resolution with its canary passed. Unlike readiness it says nothing of draining;
# a replica that starts draining before it was ever ready must not pass it, so it follows READY
# too (a startup probe stops asking once it passed).
ENGINES_SERVICE = f"{pb.DESCRIPTOR.package}.Engines"
# Health service name -> the states in which it answers SERVING.
HEALTH: Mapping[str, frozenset[State]] = {
    "": frozenset({State.STARTING, State.READY, State.DRAINING}),  # liveness: the process serves
    ENGINES_SERVICE: frozenset({State.READY}),  # startup: the engines are ready
    READINESS_SERVICE: frozenset({State.READY}),  # readiness: it takes new work
}


class Condition:
    """One thing readiness waits for (``Lifecycle.condition``)."""

    def __init__(self, lifecycle: Lifecycle, name: str) -> None:
        self._lifecycle = lifecycle
        self.name = name
        self.met = False

    def satisfy(self) -> None:
        """It holds now (and stays so)."""
        self._lifecycle._satisfied(self)

    def fail(self, error: BaseException) -> None:
        """It never will: the replica cannot become ready."""
        self._lifecycle._failed(self, error)


class Lifecycle:
    """The replica's state (see the module docstring). Thread-safe."""

    def __init__(
        self,
        health_servicer: health.HealthServicer | None = None,
        health_rules: Mapping[str, frozenset[State]] = HEALTH,
    ) -> None:
        self._health = health_servicer
        self._health_rules = health_rules
        self._lock = threading.Condition()
        self._state = State.STARTING
        self._conditions: list[Condition] = []
        self._started = False
        self._has_been_ready = False
        self._failure_listeners: list[Callable[[BaseException], None]] = []
        self.startup_error: BaseException | None = None
        self._report_health()

    # -- readiness conditions -------------------------------------------------------------------

    def condition(self, name: str) -> Condition:
        """Register one more thing readiness waits for; only before ``start``."""
        with self._lock:
            if self._started:
                raise RuntimeError(f"readiness condition {name!r} registered after start")
            condition = Condition(self, name)
            self._conditions.append(condition)
            return condition

    def start(self) -> None:
        """Every condition is registered: READY once they are all met (now, if none)."""
        with self._lock:
            self._started = True
            self._become_ready_if_due()

    def _satisfied(self, condition: Condition) -> None:
        with self._lock:
            condition.met = True
            self._become_ready_if_due()

    def _failed(self, condition: Condition, error: BaseException) -> None:
        with self._lock:
            if self.startup_error is None:
                self.startup_error = error
            listeners = list(self._failure_listeners)
            self._lock.notify_all()
        log.error("not ready: %s failed (%s)", condition.name, type(error).__name__)
        for listener in listeners:
            listener(error)

    def on_failure(self, listener: Callable[[BaseException], None]) -> None:
        """Call ``listener(error)`` when a condition fails (at once if one has)."""
        with self._lock:
            self._failure_listeners.append(listener)
            error = self.startup_error
        if error is not None:
            listener(error)

    def _become_ready_if_due(self) -> None:  # with the lock held
        due = self._started and all(c.met for c in self._conditions)
        if due and self.startup_error is None and self._state is State.STARTING:
            self._set_state(State.READY)
            log.info("ready: %s", ", ".join(c.name for c in self._conditions) or "no conditions")

    # -- state ----------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        with self._lock:
            return self._state

    @property
    def draining(self) -> bool:
        """Draining started (or the replica stopped): new calls are refused."""
        return self.state in (State.DRAINING, State.STOPPED)

    def require_ready(self) -> None:
        """Raise ``UnavailableError`` unless new jobs are taken: every readiness condition is
        met and draining has not started. The one readiness rule."""
        state = self.state
        if state is State.READY:
            return
        if state is State.STARTING:
            raise UnavailableError(
                "the server is still loading its models; retry shortly", retry_after_s=2.0
            )
        raise UnavailableError("the server is shutting down; retry on another replica")

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the replica has been READY (True; it may be draining since), or a
        condition failed, it stopped, or ``timeout`` passed (False)."""
        with self._lock:
            return (
                self._lock.wait_for(
                    lambda: (
                        self._has_been_ready
                        or self.startup_error is not None
                        or self._state is State.STOPPED
                    ),
                    timeout,
                )
                and self._has_been_ready
            )

    def start_draining(self) -> None:
        """Stop taking new work (readiness NOT_SERVING at once). Safe to call again."""
        with self._lock:
            if self._state in (State.STARTING, State.READY):
                self._set_state(State.DRAINING)

    def stop(self) -> None:
        """The replica stops serving: every health name NOT_SERVING. Safe to call again."""
        with self._lock:
            if self._state is not State.STOPPED:
                self._set_state(State.STOPPED)

    def _set_state(self, state: State) -> None:  # with the lock held
        self._has_been_ready = self._has_been_ready or state is State.READY
        self._state = state
        self._report_health()
        self._lock.notify_all()

    def _report_health(self) -> None:  # with the lock held (or in __init__)
        if self._health is None:
            return
        if self._state is State.STOPPED:
            self._health.enter_graceful_shutdown()  # every name NOT_SERVING, for good
            return
        for name, serving_in in self._health_rules.items():
            serving = self._state in serving_in
            self._health.set(
                name,
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING,
            )
