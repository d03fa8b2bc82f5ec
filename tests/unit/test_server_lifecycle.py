"""The replica's lifecycle (``server.lifecycle``) and the scheduler's parts
(``server.catalog``, ``server.job_table``, ``server.queueing``), without sockets or models."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from grpc_health.v1 import health, health_pb2

from forgedit.errors import InvalidInputError
from server.catalog import ServedModels
from server.errors import (
    JobNotFoundError,
    RequestConflictError,
    UnavailableError,
    UnservedBaseModelError,
)
from server.lifecycle import ENGINES_SERVICE, READINESS_SERVICE, Lifecycle, State
from server.ports import BaseModelInfo

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health(servicer: health.HealthServicer, name: str) -> int:
    return servicer.Check(health_pb2.HealthCheckRequest(service=name), None).status  # type: ignore[arg-type]


def test_ready_when_every_condition_is_met_and_health_follows_each_change() -> None:
    servicer = health.HealthServicer()
    lifecycle = Lifecycle(servicer)
    engines = [lifecycle.condition("engines on cpu"), lifecycle.condition("engines on cuda:0")]
    lifecycle.start()
    assert lifecycle.state is State.STARTING
    assert (_health(servicer, ""), _health(servicer, READINESS_SERVICE)) == (SERVING, NOT_SERVING)
    assert _health(servicer, ENGINES_SERVICE) == NOT_SERVING  # the startup probe waits
    with pytest.raises(UnavailableError, match="still loading") as starting:
        lifecycle.require_ready()
    assert starting.value.retry_after_s == 2.0
    engines[0].satisfy()
    assert lifecycle.state is State.STARTING and not lifecycle.wait_ready(0.01)
    assert _health(servicer, ENGINES_SERVICE) == NOT_SERVING  # one device's engines is not all
    engines[1].satisfy()
    assert lifecycle.state is State.READY and lifecycle.wait_ready(0)
    assert _health(servicer, READINESS_SERVICE) == SERVING  # at once, no polling
    assert _health(servicer, ENGINES_SERVICE) == SERVING
    lifecycle.require_ready()

    lifecycle.start_draining()
    assert lifecycle.draining and _health(servicer, READINESS_SERVICE) == NOT_SERVING
    assert _health(servicer, "") == SERVING  # still alive while it drains
    assert _health(servicer, ENGINES_SERVICE) == NOT_SERVING  # follows READY (lifecycle.HEALTH)
    with pytest.raises(UnavailableError, match="shutting down"):
        lifecycle.require_ready()
    assert lifecycle.wait_ready(0)  # it was ready: waiting for that does not hang

    lifecycle.stop()
    assert lifecycle.state is State.STOPPED and lifecycle.draining
    assert _health(servicer, "") == NOT_SERVING


def test_no_conditions_means_ready_at_start_and_none_may_come_later() -> None:
    lifecycle = Lifecycle()
    assert lifecycle.state is State.STARTING
    lifecycle.start()
    assert lifecycle.state is State.READY
    with pytest.raises(RuntimeError, match="after start"):
        lifecycle.condition("late")


def test_a_failed_condition_keeps_the_replica_unready_and_tells_its_listeners() -> None:
    lifecycle = Lifecycle(health.HealthServicer())
    device = lifecycle.condition("engines on cpu")
    lifecycle.start()
    heard: list[BaseException] = []
    lifecycle.on_failure(heard.append)
    waiter = threading.Thread(target=lambda: heard.append(lifecycle.wait_ready(30)))  # type: ignore[arg-type]
    waiter.start()
    error = RuntimeError("out of memory")
    device.fail(error)
    waiter.join(5)
    assert heard == [error, False]  # the listener, then the waiter: not ready, no hang
    assert lifecycle.startup_error is error and lifecycle.state is State.STARTING
    late: list[BaseException] = []
    lifecycle.on_failure(late.append)  # a listener that comes after hears it at once
    assert late == [error]


def test_a_new_health_name_is_one_rule() -> None:
    servicer = health.HealthServicer()
    startup = {"startup": frozenset({State.READY, State.DRAINING})}
    lifecycle = Lifecycle(servicer, {**startup})
    lifecycle.start()
    assert _health(servicer, "startup") == SERVING
    lifecycle.start_draining()
    assert _health(servicer, "startup") == SERVING


# ------------------------------------------------------------------ the served-models catalog


def test_the_catalog_resolves_names_and_applies_the_engines_compatibility_rule() -> None:
    tiny = BaseModelInfo("tiny", "f" * 64, 64, 64, can_caption=True)
    sd15 = BaseModelInfo("sd15", "e" * 64, 512, 512, can_caption=False)
    served = ServedModels(["tiny", "sd15"])
    served.add(tiny)
    assert served.resolve("") is tiny and served.resolve("tiny") is tiny
    with pytest.raises(Exception, match="this server serves: tiny, sd15") as unknown:
        served.resolve("sd15")  # configured, but no worker has loaded it yet
    assert getattr(unknown.value, "field", None) == "base_model"
    served.add(sd15)
    assert served.resolve("sd15") is sd15
    made_on_sd15: Any = SimpleNamespace(
        edit_model_id="em_a",
        base_model_name="sd15",
        base_model_fingerprint="e" * 64,
        height=512,
        width=512,
    )
    assert served.require_served(made_on_sd15) is sd15
    elsewhere: Any = SimpleNamespace(
        edit_model_id="em_b",
        base_model_name="sd21",
        base_model_fingerprint="0" * 64,
        height=512,
        width=512,
    )
    with pytest.raises(UnservedBaseModelError, match="'sd21', which this server does not serve"):
        served.require_served(elsewhere)


def test_the_catalog_serves_the_declared_resolutions_and_names_them_when_it_refuses() -> None:
    """One check for both calls: an Edit's requested size (``check_size``) and a Sample's edit
    model's (``require_served``); refused with the served sizes as WIDTHxHEIGHT, unless the
    operator serves other sizes on torch."""
    costs: list[tuple[int, int]] = []

    def step_cost(height: int, width: int) -> float:
        costs.append((height, width))
        return height * width / 512**2

    sd15 = BaseModelInfo(
        "sd15", "e" * 64, 512, 512, False, resolutions=((512, 512), (512, 768)), step_cost=step_cost
    )
    served = ServedModels(["sd15"])
    served.add(sd15)
    assert sorted(costs) == [(512, 512), (512, 768)]  # counted at load, in the worker
    assert served.step_cost(sd15, 512, 768) == 1.5 and len(costs) == 2  # remembered
    served.check_size(sd15, 512, 768, field="training.width")
    with pytest.raises(InvalidInputError) as refused:
        served.check_size(sd15, 768, 768, field="training.height")
    assert refused.value.field == "training.height"
    assert "768x768" in str(refused.value)
    assert "served resolutions: 512x512, 768x512 (FORGEDIT_RESOLUTIONS)" in str(refused.value)
    portrait: Any = SimpleNamespace(
        edit_model_id="em_p",
        base_model_name="sd15",
        base_model_fingerprint="e" * 64,
        height=768,
        width=512,
    )
    with pytest.raises(InvalidInputError, match="em_p was fine-tuned at 512x768") as sample:
        served.require_served(portrait)
    assert sample.value.field == "edit_model_id"

    on_torch = ServedModels(["sd15"], other_resolutions="torch")
    on_torch.add(sd15)
    assert on_torch.require_served(portrait) is sd15  # admitted: the engine samples it on torch
    assert on_torch.step_cost(sd15, 768, 512) == 1.5


def test_a_requests_default_size_is_the_native_one_if_served_else_the_first_declared() -> None:
    native = BaseModelInfo("sd15", "e" * 64, 512, 512, False)
    assert native.served_sizes == ((512, 512),) and native.default_size == (512, 512)
    wide = BaseModelInfo("sd15", "e" * 64, 512, 512, False, resolutions=((512, 768), (768, 768)))
    assert wide.default_size == (512, 768)
    both = BaseModelInfo("sd15", "e" * 64, 512, 512, False, resolutions=((512, 768), (512, 512)))
    assert both.default_size == (512, 512)


# ------------------------------------------------------------------ the job table


def _job(job_id: str, request_id: str = "", digest: str = "d") -> Any:
    return SimpleNamespace(
        job_id=job_id, request_id=request_id, payload_digest=digest, ended_at=None, event_bytes=10
    )


def test_the_job_table_finds_reattaches_refuses_conflicts_and_forgets_old_jobs() -> None:
    from server.job_table import JobTable

    table = JobTable(retention_s=60.0, max_retained=2, max_bytes=1 << 20)
    first = _job("job_1", "r-1", "same")
    table.add(first)
    assert table.get("job_1") is first and table.get_by_request("r-1") is first
    assert table.existing(_job("job_2", "r-1", "same")) is first
    with pytest.raises(RequestConflictError):
        table.existing(_job("job_3", "r-1", "other"))
    assert table.existing(_job("job_4")) is None  # no request id: always new
    # Finished jobs: at most max_retained, then the oldest go (with their request ids).
    for job_id in ("job_1", "job_5", "job_6"):
        job = table.get("job_1") if job_id == "job_1" else _job(job_id)
        if job_id != "job_1":
            table.add(job)
        job.ended_at = time.time()  # just now: within retention_s
        table.retain(job)
    with pytest.raises(JobNotFoundError):
        table.get("job_1")
    with pytest.raises(JobNotFoundError):
        table.get_by_request("r-1")
    assert table.get("job_6").job_id == "job_6"
    table.retention_s = -1.0  # everything finished is now too old
    table.expire()
    with pytest.raises(JobNotFoundError):
        table.get("job_6")
