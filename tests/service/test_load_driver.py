"""The load driver (``benchmarks/load_driver.py``) in a brief CI run: a few seconds of two
Sample clients and one Edit client against a real in-process replica. Its full run is a
benchmark (BENCHMARKS.md); here we check that it stays within its bounds, that the replica
answers every call OK under the load, and that the report is complete JSON."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from support import server as support
from support.load import load_driver as _driver


@pytest.mark.slow
def test_a_brief_load_run_is_bounded_and_reports_everything(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    driver = _driver()
    with support.running_server(tmp_path, tiny_model_dir) as h:
        report = asyncio.run(
            driver.drive(
                f"127.0.0.1:{h.port}",
                os.getpid(),
                duration_s=3.0,
                sample_clients=2,
                edit_clients=1,
                max_requests=6,
                deadline_s=120.0,
                updates=1,
                probe_interval_s=0.2,
                settle_s=0.2,
                token=support.TOKEN,
            )
        )
        support.assert_nothing_left_behind(h)
    json.dumps(report)  # JSON out
    assert 1 <= report["calls"] <= 6
    statuses = {kind: dict(codes) for kind, codes in report["status"].items()}
    assert statuses["Sample"] == {"OK": report["latency_s"]["Sample"]["n"]}, statuses
    assert set(statuses.get("Edit", {"OK": 0})) == {"OK"}, statuses
    for kind in statuses:
        assert {"p50", "p95", "p99"} <= set(report["latency_s"][kind])
        assert report["queue_wait_s"][kind]["n"] == statuses[kind]["OK"]
    phases = report["resources"]
    assert set(phases) == {"before", "during_max", "after"}
    assert all({"rss_mib", "fds", "threads"} <= set(phases[p]) for p in phases)


@pytest.mark.slow
def test_a_brief_flooded_run_leaves_the_traffic_served_and_the_replica_idle(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """The floods of the benchmark (BENCHMARKS.md, "Floods"), briefly: unauthenticated
    reflection and health-watch streams, and a second principal's detached Samples, beside
    normal traffic. The traffic is answered OK, every flood is refused or held to its share,
    and the driver's cleanup leaves the replica idle."""
    driver = _driver()
    traffic, flood = "traffic-token-0123456789", "flood-token-0123456789"
    tokens = [{"name": "traffic", "token": traffic}, {"name": "flood", "token": flood}]
    with support.running_server(tmp_path, tiny_model_dir, tokens=tokens) as h:
        report = asyncio.run(
            driver.drive(
                f"127.0.0.1:{h.port}",
                os.getpid(),
                duration_s=3.0,
                sample_clients=1,
                edit_clients=0,
                max_requests=4,
                deadline_s=120.0,
                updates=1,
                probe_interval_s=0.2,
                settle_s=0.2,
                token=traffic,
                anonymous_streams=4,
                detached_clients=1,
                flood_token=flood,
            )
        )
        assert support.wait_for(lambda: h.server.streams.open_calls == 0)
        support.assert_nothing_left_behind(h)
    json.dumps(report)
    assert set(report["status"]["Sample"]) == {"OK"}, report["status"]
    floods = report["flood"]
    # No token, no reflection stream (grpc.aio reports a share of these refusals, which the
    # server sends as UNAUTHENTICATED, as INTERNAL "Internal error from Core").
    assert floods["reflection"].get("UNAUTHENTICATED", 0) >= 1, floods
    assert "OK (held open)" not in floods["reflection"], floods
    # Health watches: a quarter of the 8 health calls per address at once, the rest refused.
    assert floods["health-watch"].get("OK (held open)", 0) <= 2, floods
    assert set(floods["health-watch"]) <= {"OK (held open)", "RESOURCE_EXHAUSTED"}, floods
    assert report["flood_jobs_accepted"] >= 1
    assert set(floods["detached-sample"]) <= {"OK (accepted)", "RESOURCE_EXHAUSTED"}, floods
    ratios = driver.flood_ratios(report, report)
    assert ratios["Sample_p50_latency"] == ratios["Sample_ok_per_s"] == 1.0
