"""Load driver: concurrent Sample and Edit clients (grpc.aio) against one replica on loopback,
or through the SDK against a local fleet (``--fleet``), optionally restarting every replica in
turn while it runs (``--rolling-restart``).

Reports, as one JSON object:
- ``status``: per call kind, how many calls ended with each gRPC status;
- ``latency_s``: per kind, client-side seconds from issuing the call to its end (p50/p95/p99);
- ``queue_wait_s``: per kind, the server-reported queue wait of the completed jobs;
- ``resources``: RSS (MiB), open file descriptors and threads of the server process before the
  load (after warm-up), the maximum seen during it (sampled every ``--probe-interval``), and
  after it (once the server is idle again).

Floods beside the normal traffic (``--floods``): the driver starts its replica with two
principals' tokens and measures twice in one run, first the normal traffic alone ("quiet"),
then the same traffic beside ``--anonymous-streams`` unauthenticated streams held open
(reflection and ``Health.Watch``, on connections of their own, each reopened at once when it
ends) and ``--detached-clients`` clients of a second principal that submit detached Samples
back to back (each accepted job left to run; refusals retried after a pause). The report has
both phases, the floods' outcomes (``flood``: per flood kind, how each opening ended) and
``ratios`` (flooded over quiet: the normal traffic's p50 latency and OK calls per second).

Bounded by construction: at most ``--max-requests`` calls in all and ``--duration`` seconds of
issuing them; calls carry a ``--deadline``; the driver then waits for the calls in flight (each
bounded by its deadline) and stops by itself. Loopback only: it refuses any other target.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/load_driver.py [--duration 60]
[--sample-clients 6] [--edit-clients 2] [--max-requests 400] [--floods] [--out load.json]``
starts its own ``forgedit-server`` (tiny model) in a subprocess; ``--target 127.0.0.1:PORT
--server-pid PID`` drives a running one instead.

Fleet mode, ``--fleet .forgedit-data/fleet/env [--rolling-restart]`` (``scripts/fleet.sh up``
first): the clients are the SDK's ``AsyncForgeditClient`` over ``FORGEDIT_SERVER`` with the
fleet's load balancing and the SDK's default retry policy, so what is measured is what an
application sees. With ``--rolling-restart`` a separate task restarts the replicas one at a
time (``fleet.sh restart N``: SIGTERM, drain, start, wait until ready) while the load runs,
and the load goes on until the last replica is back. The report adds ``sdk_retries`` (calls
opened again by the SDK after an error), ``accepted_not_completed`` (calls whose job was
accepted but that did not end OK: lost jobs), ``restarted`` and ``restart_s``, and ``errors``
(the first few failures, one line each).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from server._proto import forgedit_pb2 as pb
from server._proto import forgedit_pb2_grpc as pb_grpc
from server.transport import client_options

LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")
RETRY_PAUSE_S = 0.5  # a client's pause after a refused or failed call
FLOOD_PAUSE_S = 0.05  # a flood's: it reopens at once, as an attacker would
REFLECTION = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


# -- process resources --------------------------------------------------------------------------


def resources(pid: int) -> dict[str, float]:
    """RSS (MiB), open fds and threads of process ``pid`` (Linux ``/proc``)."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"]),
    }


def _max_of(samples: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: max(s[k] for s in samples) for k in samples[0]} if samples else {}


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99), "n": len(ordered)}


# -- requests -----------------------------------------------------------------------------------


def test_image(size: int = 64) -> bytes:
    """A generated PNG (no external data): a red square on grey."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), "red")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def edit_request(image: bytes, seed: int, updates: int) -> pb.EditRequest:
    return pb.EditRequest(
        image=image,
        target_prompts=["A photo of a blue square."],
        source_prompt="A photo of a red square.",
        training=pb.TrainingOptions(updates=updates, batch_size=1, seed=seed),
        sweep=pb.SweepOptions(steps=2, gammas=[0.6], seeds=[seed]),
    )


def sample_request(edit_model_id: str, seed: int, detach: bool = False) -> pb.SampleRequest:
    return pb.SampleRequest(
        edit_model_id=edit_model_id,
        target_prompts=["A photo of a green square."],
        sweep=pb.SweepOptions(steps=2, gammas=[0.5], seeds=[seed]),
        detach=detach,
    )


# -- the load -----------------------------------------------------------------------------------


@dataclass
class Tally:
    status: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    queue_wait: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    issued: int = 0
    flood: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    flood_jobs: list[str] = field(default_factory=list)  # detached jobs it left running
    details: dict[str, str] = field(default_factory=dict)  # the first of each failure
    flood_details: dict[str, str] = field(default_factory=dict)  # the first of each ending

    def flood_ended(self, kind: str, error: grpc.aio.AioRpcError) -> None:
        self.flood[kind][error.code().name] += 1
        self.flood_details.setdefault(f"{kind} {error.code().name}", error.details() or "")


Metadata = tuple[tuple[str, str], ...]


async def _one_call(
    stub: Any, kind: str, request: Any, deadline: float, metadata: Metadata, tally: Tally
) -> bool:
    """Run one call to its end and tally it; True when it ended OK."""
    call = getattr(stub, kind)(request, timeout=deadline, metadata=metadata)
    started = time.perf_counter()
    code = "OK"
    try:
        async for response in call:
            event = response.event
            if event.WhichOneof("kind") == "completed":
                tally.queue_wait[kind].append(event.completed.timings.queue_wait_seconds)
    except grpc.aio.AioRpcError as e:
        code = e.code().name
        tally.details.setdefault(f"{kind} {code}", e.details() or "")
    tally.status[kind][code] += 1
    tally.latency[kind].append(time.perf_counter() - started)
    return code == "OK"


async def _client(
    stub: Any,
    kind: str,
    make: Any,
    stop_at: float,
    budget: asyncio.Semaphore,
    deadline: float,
    metadata: Metadata,
    tally: Tally,
) -> None:
    """Issue calls of one kind back to back until the time or the shared count runs out."""
    while time.monotonic() < stop_at:
        if budget.locked():
            return  # the shared request budget is spent
        await budget.acquire()
        tally.issued += 1
        if not await _one_call(stub, kind, make(tally.issued), deadline, metadata, tally):
            await asyncio.sleep(RETRY_PAUSE_S)  # as a client would, rather than spin


async def _anonymous_stream(channel: Any, kind: str, stop_at: float, tally: Tally) -> None:
    """Open one kind of unauthenticated stream (``reflection`` or ``health-watch``) again and
    again until ``stop_at``: an open one is held to the end, a refused one reopened at once."""
    listing = reflection_pb2.ServerReflectionRequest(list_services="")
    stop = asyncio.Event()

    async def held_requests() -> Any:
        yield listing
        await stop.wait()

    while (left := stop_at - time.monotonic()) > 0:
        if kind == "reflection":
            call = channel.stream_stream(
                REFLECTION,
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )(held_requests(), timeout=left + 5)
        else:
            call = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=left + 5
            )
        try:
            await call.read()
        except grpc.aio.AioRpcError as e:
            tally.flood_ended(kind, e)
            await asyncio.sleep(FLOOD_PAUSE_S)
            continue
        tally.flood[kind]["OK (held open)"] += 1
        await asyncio.sleep(max(0.0, stop_at - time.monotonic()))
        call.cancel()
    stop.set()


async def _detached_client(
    stub: Any, edit_model_id: str, stop_at: float, metadata: Metadata, tally: Tally
) -> None:
    """Submit detached Samples back to back as the flood's principal: each accepted job is left
    to run (the call hangs up after ``accepted``); a refused one is retried after a pause."""
    while time.monotonic() < stop_at:
        request = sample_request(edit_model_id, seed=len(tally.flood_jobs), detach=True)
        call = stub.Sample(request, timeout=30, metadata=metadata)
        try:
            response = await call.read()
        except grpc.aio.AioRpcError as e:
            tally.flood_ended("detached-sample", e)
            await asyncio.sleep(RETRY_PAUSE_S)
            continue
        call.cancel()
        tally.flood["detached-sample"]["OK (accepted)"] += 1
        tally.flood_jobs.append(response.event.job_id)


async def _probe(pid: int, interval: float, samples: list[dict[str, float]], stop: Any) -> None:
    while not stop.is_set():
        samples.append(resources(pid))
        with suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def drive(
    target: str,
    pid: int,
    *,
    duration_s: float,
    sample_clients: int,
    edit_clients: int,
    max_requests: int,
    deadline_s: float,
    updates: int,
    probe_interval_s: float,
    settle_s: float,
    token: str = "",
    anonymous_streams: int = 0,
    detached_clients: int = 0,
    flood_token: str = "",
) -> dict[str, Any]:
    """Run the load against ``target`` and return the report (see the module docstring),
    beside ``anonymous_streams`` unauthenticated streams and ``detached_clients`` clients of
    the principal of ``flood_token`` flooding the queue with detached Samples."""
    metadata: Metadata = (("authorization", f"Bearer {token}"),) if token else ()
    flood_metadata: Metadata = (("authorization", f"Bearer {flood_token}"),)
    if detached_clients and not flood_token:
        raise SystemExit("load_driver: a detached-job flood needs the flood principal's token")
    host = target.rsplit(":", 1)[0]
    if host not in LOOPBACK:
        raise SystemExit(f"load_driver: refusing non-loopback target {target!r}")
    image = test_image()
    async with (
        grpc.aio.insecure_channel(target, options=client_options()) as channel,
        grpc.aio.insecure_channel(target, options=client_options()) as flood_channel,
    ):
        stub = pb_grpc.ForgeditServiceStub(channel)
        flood_stub = pb_grpc.ForgeditServiceStub(flood_channel)
        # One edit model for the Sample clients (and one of the flood's principal's own, whose
        # edit models are its own), trained before the measurement starts.
        edit_model_id = await _train(stub, image, updates, metadata)
        flood_model_id = (
            await _train(flood_stub, image, updates, flood_metadata) if detached_clients else ""
        )
        before = resources(pid)
        tally = Tally()
        samples: list[dict[str, float]] = []
        stop_probe = asyncio.Event()
        probe = asyncio.create_task(_probe(pid, probe_interval_s, samples, stop_probe))
        budget = asyncio.Semaphore(max_requests)
        stop_at = time.monotonic() + duration_s
        started = time.perf_counter()
        clients = [
            _client(
                stub,
                "Sample",
                lambda n: sample_request(edit_model_id, n),
                stop_at,
                budget,
                deadline_s,
                metadata,
                tally,
            )
            for _ in range(sample_clients)
        ] + [
            _client(
                stub,
                "Edit",
                # A fresh seed per Edit: each really trains (no dedupe).
                lambda n: edit_request(image, seed=1000 + n, updates=updates),
                stop_at,
                budget,
                deadline_s,
                metadata,
                tally,
            )
            for _ in range(edit_clients)
        ]
        floods = [
            _anonymous_stream(flood_channel, ("reflection", "health-watch")[i % 2], stop_at, tally)
            for i in range(anonymous_streams)
        ] + [
            _detached_client(flood_stub, flood_model_id, stop_at, flood_metadata, tally)
            for _ in range(detached_clients)
        ]
        await asyncio.gather(*clients, *floods)
        elapsed = time.perf_counter() - started
        stop_probe.set()
        await probe
        # The flood's detached jobs still waiting or running end now, so "after" is idle.
        for job_id in tally.flood_jobs:
            with suppress(grpc.aio.AioRpcError):
                await flood_stub.CancelJob(
                    pb.CancelJobRequest(job_id=job_id), timeout=30, metadata=flood_metadata
                )
        await asyncio.sleep(settle_s)  # let the server go idle before "after"
        after = resources(pid)
    return {
        "config": {
            "duration_s": duration_s,
            "sample_clients": sample_clients,
            "edit_clients": edit_clients,
            "max_requests": max_requests,
            "deadline_s": deadline_s,
            "training_updates": updates,
            "anonymous_streams": anonymous_streams,
            "detached_clients": detached_clients,
        },
        "elapsed_s": elapsed,
        "calls": tally.issued,
        "ok_per_s": {k: v["OK"] / elapsed for k, v in tally.status.items()},
        "flood": {k: dict(v) for k, v in tally.flood.items()},
        "flood_jobs_accepted": len(tally.flood_jobs),
        "flood_details": tally.flood_details,
        "status": {k: dict(v) for k, v in tally.status.items()},
        "details": tally.details,
        "latency_s": {k: percentiles(v) for k, v in tally.latency.items()},
        "queue_wait_s": {k: percentiles(v) for k, v in tally.queue_wait.items()},
        "resources": {"before": before, "during_max": _max_of(samples), "after": after},
    }


async def _train(stub: Any, image: bytes, updates: int, metadata: Metadata) -> str:
    """The id of an edit model trained (or reused) for ``metadata``'s principal."""
    edit_model_id = ""
    async for response in stub.Edit(
        edit_request(image, seed=1, updates=updates), timeout=300, metadata=metadata
    ):
        if response.event.WhichOneof("kind") == "registered":
            edit_model_id = response.event.registered.edit_model_id
    return edit_model_id


def flood_ratios(quiet: dict[str, Any], flooded: dict[str, Any]) -> dict[str, Any]:
    """The normal traffic beside the floods over the same traffic alone, per call kind: p50
    latency and OK calls per second."""
    ratios: dict[str, Any] = {}
    for kind, latency in quiet["latency_s"].items():
        with_floods = flooded["latency_s"].get(kind, {})
        if "p50" in latency and "p50" in with_floods:
            ratios[f"{kind}_p50_latency"] = with_floods["p50"] / latency["p50"]
        if quiet["ok_per_s"].get(kind):
            ok_per_s = flooded["ok_per_s"].get(kind, 0.0)
            ratios[f"{kind}_ok_per_s"] = ok_per_s / quiet["ok_per_s"][kind]
    return ratios


# -- a fleet, through the SDK -------------------------------------------------------------------


def read_fleet_env(path: Path) -> dict[str, str]:
    """The ``export NAME='value'`` lines that ``scripts/fleet.sh up`` writes."""
    import shlex

    env = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export":
            name, _, value = words[1].partition("=")
            env[name] = value
    return env


@dataclass
class FleetTally(Tally):
    sdk_retries: int = 0
    accepted_not_completed: int = 0
    errors: list[str] = field(default_factory=list)


async def _sdk_call(kind: str, open_stream: Any, tally: FleetTally) -> bool:
    """Run one SDK stream to its end and tally it; True when it ended OK."""
    from forgedit_client import Accepted, Completed
    from forgedit_client.errors import ForgeditRpcError

    started = time.perf_counter()
    stream = open_stream()
    accepted = False
    code = "OK"
    try:
        async for event in stream:
            accepted = accepted or isinstance(event, Accepted)
            if isinstance(event, Completed):
                tally.queue_wait[kind].append(event.timings.queue_wait_seconds)
    except ForgeditRpcError as e:
        code = e.code_name
        if len(tally.errors) < 20:
            tally.errors.append(f"{kind}: {e.one_line()}")
        tally.accepted_not_completed += accepted
    tally.sdk_retries += stream.retries
    tally.status[kind][code] += 1
    tally.latency[kind].append(time.perf_counter() - started)
    return code == "OK"


async def drive_fleet(
    env_file: Path,
    *,
    duration_s: float,
    sample_clients: int,
    edit_clients: int,
    max_requests: int,
    deadline_s: float,
    updates: int,
    rolling_restart: bool = False,
) -> dict[str, Any]:
    """The load against a local fleet through the SDK (see the module docstring)."""
    from forgedit_client import AsyncForgeditClient

    env = read_fleet_env(env_file)
    replicas = env["FORGEDIT_REPLICAS"].split(",")
    if any(r.rsplit(":", 1)[0] not in LOOPBACK for r in replicas):
        raise SystemExit("load_driver: refusing a fleet that is not on loopback")
    image = test_image()
    tally = FleetTally()
    restarted: list[int] = []
    restart_s: list[float] = []
    async with AsyncForgeditClient(
        env["FORGEDIT_SERVER"],
        token=env["FORGEDIT_TOKEN"],
        load_balancing=env.get("FORGEDIT_LOAD_BALANCING") or "round_robin",
    ) as client:
        options = {"updates": updates, "batch_size": 1, "steps": 2, "gammas": [0.6]}
        first = await client.edit(
            image,
            "A photo of a blue square.",
            source_prompt="A photo of a red square.",
            train_seed=1,
            seeds=[1],
            **options,
        ).result()
        edit_model_id = first.edit_model_id
        stop = asyncio.Event()
        budget = asyncio.Semaphore(max_requests)

        async def one_client(kind: str) -> None:
            while not stop.is_set():
                if budget.locked():
                    return
                await budget.acquire()
                tally.issued += 1
                n = tally.issued
                if kind == "Sample":
                    ok = await _sdk_call(
                        kind,
                        lambda n=n: client.sample(
                            edit_model_id,
                            "A photo of a green square.",
                            steps=2,
                            gammas=[0.5],
                            seeds=[n],
                            timeout=deadline_s,
                        ),
                        tally,
                    )
                else:
                    ok = await _sdk_call(
                        kind,
                        lambda n=n: client.edit(
                            image,
                            "A photo of a blue square.",
                            source_prompt="A photo of a red square.",
                            train_seed=1000 + n,
                            seeds=[n],
                            timeout=deadline_s,
                            **options,
                        ),
                        tally,
                    )
                if not ok:
                    await asyncio.sleep(RETRY_PAUSE_S)

        async def restarter() -> None:
            fleet_sh = Path(__file__).resolve().parents[1] / "scripts" / "fleet.sh"
            fleet_dir = env["FORGEDIT_FLEET_DIR"]
            await asyncio.sleep(min(5.0, duration_s / 4))  # the load is under way first
            for i in range(len(replicas)):
                t = time.perf_counter()
                await asyncio.to_thread(
                    subprocess.run,
                    ["bash", str(fleet_sh), "--dir", fleet_dir, "restart", str(i)],
                    check=True,
                    capture_output=True,
                )
                restart_s.append(time.perf_counter() - t)
                restarted.append(i)
                await asyncio.sleep(2.0)  # traffic reaches the restarted replica again

        started = time.perf_counter()
        clients = [asyncio.create_task(one_client("Sample")) for _ in range(sample_clients)]
        clients += [asyncio.create_task(one_client("Edit")) for _ in range(edit_clients)]
        restarts = asyncio.create_task(restarter()) if rolling_restart else None
        await asyncio.sleep(duration_s)
        if restarts is not None:
            await restarts  # the load goes on until the last replica is back
        stop.set()
        await asyncio.gather(*clients)
        elapsed = time.perf_counter() - started
    return {
        "config": {
            "mode": "fleet",
            "replicas": len(replicas),
            "load_balancing": env.get("FORGEDIT_LOAD_BALANCING"),
            "duration_s": duration_s,
            "sample_clients": sample_clients,
            "edit_clients": edit_clients,
            "max_requests": max_requests,
            "deadline_s": deadline_s,
            "training_updates": updates,
            "rolling_restart": rolling_restart,
        },
        "elapsed_s": elapsed,
        "calls": tally.issued,
        "status": {k: dict(v) for k, v in tally.status.items()},
        "latency_s": {k: percentiles(v) for k, v in tally.latency.items()},
        "queue_wait_s": {k: percentiles(v) for k, v in tally.queue_wait.items()},
        "sdk_retries": tally.sdk_retries,
        "accepted_not_completed": tally.accepted_not_completed,
        "restarted": restarted,
        "restart_s": restart_s,
        "errors": tally.errors,
    }


# -- a server of our own --------------------------------------------------------------------------


@contextmanager
def own_server(
    work: Path, settings: Sequence[str] = (), tokens: dict[str, str] | None = None
) -> Iterator[tuple[str, int]]:
    """``forgedit-server`` on the tiny model in a subprocess on a free loopback port, with extra
    ``NAME=VALUE`` settings (as ``FORGEDIT_NAME``) and ``tokens`` (principal -> token; none:
    no authentication); yields (target, pid) once it is ready, and stops it (SIGTERM, then
    SIGKILL) on exit."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGEDIT_")}
    env.update(
        {
            "FORGEDIT_DATA_DIR": str(work / "data"),
            "FORGEDIT_GRPC_PORT": str(port),
            "FORGEDIT_METRICS_PORT": "none",
            "FORGEDIT_LOG_FORMAT": "text",
            "FORGEDIT_LOG_LEVEL": "WARNING",
            "FORGEDIT_QUEUE_SIZE": "64",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
        }
    )
    if tokens:
        env["FORGEDIT_AUTH_TOKENS"] = json.dumps(
            [{"name": name, "token": token} for name, token in tokens.items()]
        )
    for setting in settings:
        name, _, value = setting.partition("=")
        env[f"FORGEDIT_{name.upper()}"] = value
    with open(work / "server.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.main"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    target = f"127.0.0.1:{port}"
    try:
        channel = grpc.insecure_channel(target)
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                request = health_pb2.HealthCheckRequest(service="forgedit.v1.ForgeditService")
                if health.Check(request, timeout=2).status == 1:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("load_driver: the server did not become ready; see server.log")
        channel.close()
        yield target, process.pid
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="host:port of a running replica (loopback only)")
    parser.add_argument(
        "--fleet", type=Path, metavar="ENV", help="a local fleet's env file (scripts/fleet.sh)"
    )
    parser.add_argument(
        "--rolling-restart",
        action="store_true",
        help="with --fleet: restart every replica in turn while the load runs",
    )
    parser.add_argument("--server-pid", type=int, help="its process id (with --target)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of issuing calls")
    parser.add_argument("--sample-clients", type=int, default=6)
    parser.add_argument("--edit-clients", type=int, default=2)
    parser.add_argument("--max-requests", type=int, default=400, help="calls in all, at most")
    parser.add_argument("--deadline", type=float, default=120.0, help="per-call deadline, s")
    parser.add_argument("--updates", type=int, default=4, help="training updates per Edit")
    parser.add_argument("--probe-interval", type=float, default=0.5)
    parser.add_argument("--settle", type=float, default=2.0, help="idle seconds before 'after'")
    parser.add_argument(
        "--floods",
        action="store_true",
        help="measure the traffic alone, then beside an unauthenticated stream flood and a "
        "detached-job flood (own server only)",
    )
    parser.add_argument("--anonymous-streams", type=int, default=64, help="with --floods")
    parser.add_argument("--detached-clients", type=int, default=2, help="with --floods")
    parser.add_argument("--out", type=Path, help="write the JSON report here too")
    parser.add_argument(
        "--server-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the server it starts, e.g. max_training_overtakes=4 (repeatable)",
    )
    args = parser.parse_args(argv)
    if (args.target is None) != (args.server_pid is None):
        parser.error("--target and --server-pid go together")
    if args.rolling_restart and args.fleet is None:
        parser.error("--rolling-restart needs --fleet")
    if args.floods and (args.fleet is not None or args.target is not None):
        parser.error("--floods starts its own server (it needs two principals' tokens)")

    def run(target: str, pid: int, **floods: Any) -> dict[str, Any]:
        return asyncio.run(
            drive(
                target,
                pid,
                duration_s=args.duration,
                sample_clients=args.sample_clients,
                edit_clients=args.edit_clients,
                max_requests=args.max_requests,
                deadline_s=args.deadline,
                updates=args.updates,
                probe_interval_s=args.probe_interval,
                settle_s=args.settle,
                # A token for a replica that requires one; never on the command line.
                token=floods.pop("token", None)
                or (os.environ.get("LOAD_DRIVER_TOKEN", "") if args.target else ""),
                **floods,
            )
        )

    if args.fleet is not None:
        report = asyncio.run(
            drive_fleet(
                args.fleet,
                duration_s=args.duration,
                sample_clients=args.sample_clients,
                edit_clients=args.edit_clients,
                max_requests=args.max_requests,
                deadline_s=args.deadline,
                updates=args.updates,
                rolling_restart=args.rolling_restart,
            )
        )
    elif args.target is not None:
        report = run(args.target, args.server_pid)
    elif args.floods:
        # Fresh tokens for this run only: one principal for the traffic, one for the flood.
        tokens = {name: secrets.token_urlsafe(24) for name in ("traffic", "flood")}
        with (
            tempfile.TemporaryDirectory() as work,
            own_server(Path(work), args.server_setting, tokens) as (target, pid),
        ):
            quiet = run(target, pid, token=tokens["traffic"])
            flooded = run(
                target,
                pid,
                token=tokens["traffic"],
                anonymous_streams=args.anonymous_streams,
                detached_clients=args.detached_clients,
                flood_token=tokens["flood"],
            )
        report = {
            "quiet": quiet,
            "flooded": flooded,
            "ratios": flood_ratios(quiet, flooded),
            "config": {**flooded["config"], "server_settings": args.server_setting},
        }
    else:
        with (
            tempfile.TemporaryDirectory() as work,
            own_server(Path(work), args.server_setting) as (target, pid),
        ):
            report = run(target, pid)
        report["config"]["server_settings"] = args.server_setting
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.out is not None:
        tmp = args.out.with_name(f".{args.out.name}.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, args.out)
    print(text)
    return report


if __name__ == "__main__":
    main()
