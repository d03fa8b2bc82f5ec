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

Bounded by construction: at most ``--max-requests`` calls in all and ``--duration`` seconds of
issuing them; calls carry a ``--deadline``; the driver then waits for the calls in flight (each
bounded by its deadline) and stops by itself. Loopback only: it refuses any other target.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/load_driver.py [--duration 60]
[--sample-clients 6] [--edit-clients 2] [--max-requests 400] [--out load.json]`` starts its own
``forgedit-server`` (tiny model) in a subprocess; ``--target 127.0.0.1:PORT --server-pid PID``
drives a running one instead.

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

from server._proto import forgedit_pb2 as pb
from server._proto import forgedit_pb2_grpc as pb_grpc
from server.transport import client_options

LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")
RETRY_PAUSE_S = 0.5  # a client's pause after a refused or failed call


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


def sample_request(edit_model_id: str, seed: int) -> pb.SampleRequest:
    return pb.SampleRequest(
        edit_model_id=edit_model_id,
        target_prompts=["A photo of a green square."],
        sweep=pb.SweepOptions(steps=2, gammas=[0.5], seeds=[seed]),
    )


# -- the load -----------------------------------------------------------------------------------


@dataclass
class Tally:
    status: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    queue_wait: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    issued: int = 0


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
) -> dict[str, Any]:
    """Run the load against ``target`` and return the report (see the module docstring)."""
    metadata: Metadata = (("authorization", f"Bearer {token}"),) if token else ()
    host = target.rsplit(":", 1)[0]
    if host not in LOOPBACK:
        raise SystemExit(f"load_driver: refusing non-loopback target {target!r}")
    image = test_image()
    async with grpc.aio.insecure_channel(target, options=client_options()) as channel:
        stub = pb_grpc.ForgeditServiceStub(channel)
        # One edit model for the Sample clients, trained before the measurement starts.
        edit_model_id = ""
        async for response in stub.Edit(
            edit_request(image, seed=1, updates=updates), timeout=300, metadata=metadata
        ):
            if response.event.WhichOneof("kind") == "registered":
                edit_model_id = response.event.registered.edit_model_id
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
        await asyncio.gather(*clients)
        elapsed = time.perf_counter() - started
        stop_probe.set()
        await probe
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
        },
        "elapsed_s": elapsed,
        "calls": tally.issued,
        "status": {k: dict(v) for k, v in tally.status.items()},
        "latency_s": {k: percentiles(v) for k, v in tally.latency.items()},
        "queue_wait_s": {k: percentiles(v) for k, v in tally.queue_wait.items()},
        "resources": {"before": before, "during_max": _max_of(samples), "after": after},
    }


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
def own_server(work: Path, settings: Sequence[str] = ()) -> Iterator[tuple[str, int]]:
    """``forgedit-server`` on the tiny model in a subprocess on a free loopback port, with extra
    ``NAME=VALUE`` settings (as ``FORGEDIT_NAME``); yields (target, pid) once it is ready, and
    stops it (SIGTERM, then SIGKILL) on exit."""
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

    def run(target: str, pid: int) -> dict[str, Any]:
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
                token=os.environ.get("LOAD_DRIVER_TOKEN", "") if args.target else "",
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
