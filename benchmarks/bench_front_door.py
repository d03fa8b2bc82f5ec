"""Benchmark the server's front door against a real ``forgedit-server`` process; prints JSON.

Figures (BENCHMARKS.md):
- ``unauthenticated``: the server process's resident memory before and after ``--messages``
  Edit calls of ``--mib`` MiB each sent without a token, and how long they took in all
  (refused before the payload is read, so memory should barely move).
- ``idle_streams``: ``--streams`` WatchJob streams opened on one channel to a job that stays
  running; how many were accepted and how many refused (RESOURCE_EXHAUSTED), then the latency
  of ``--checks`` readiness checks on the health port and on the gRPC port while they stay
  open (p50/p99, milliseconds).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_front_door.py [--messages N] [--mib N]``.
Run it on an otherwise idle machine; numbers under foreign load are not comparable.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from forgedit.zoo.tiny import ensure_tiny_model  # noqa: E402
from server._proto import forgedit_pb2 as pb  # noqa: E402
from server._proto import forgedit_pb2_grpc as pb_grpc  # noqa: E402
from server.transport import client_options  # noqa: E402

TOKEN = "bench-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
READINESS = "forgedit.v1.ForgeditService"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_serving(channel: grpc.Channel, timeout: float = 300) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request = health_pb2.HealthCheckRequest(service=READINESS)
            if stub.Check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


def unauthenticated(channel: grpc.Channel, pid: int, messages: int, mib: int) -> dict[str, Any]:
    blob = pb.EditRequest(image=os.urandom(mib * 1024 * 1024), target_prompts=["x"])
    payload = blob.SerializeToString()
    edit = channel.unary_stream("/forgedit.v1.ForgeditService/Edit")
    before = rss_mib(pid)
    codes: dict[str, int] = {}
    started = time.perf_counter()
    for _ in range(messages):
        try:
            list(edit(payload, timeout=120))
            codes["OK"] = codes.get("OK", 0) + 1
        except grpc.RpcError as e:
            codes[e.code().name] = codes.get(e.code().name, 0) + 1
    return {
        "messages": messages,
        "mib_each": mib,
        "codes": codes,
        "seconds": round(time.perf_counter() - started, 3),
        "server_rss_mib_before": round(before, 1),
        "server_rss_mib_after": round(rss_mib(pid), 1),
    }


def idle_streams(
    channel: grpc.Channel, health_port: int, image: bytes, streams: int, checks: int
) -> dict[str, Any]:
    stub = pb_grpc.ForgeditServiceStub(channel)
    # A job that stays running: many training updates, detached, cancelled at the end.
    request = pb.EditRequest(
        image=image,
        target_prompts=["A photo of a pear."],
        training=pb.TrainingOptions(updates=5000, batch_size=1, seed=1),
        sweep=pb.SweepOptions(steps=2, gammas=[0.6], seeds=[1]),
        detach=True,
    )
    submit = stub.Edit(request, metadata=AUTH, timeout=600)
    job_id = next(submit).event.job_id
    submit.cancel()
    time.sleep(1)
    calls, codes = [], {"OK": 0}
    for _ in range(streams):
        call = stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=AUTH, timeout=600)
        calls.append(call)
        try:
            next(call)
            codes["OK"] += 1
        except grpc.RpcError as e:
            codes[e.code().name] = codes.get(e.code().name, 0) + 1
    latency: dict[str, Any] = {}
    health_channel = grpc.insecure_channel(f"127.0.0.1:{health_port}")
    for name, ch in (("health_port", health_channel), ("grpc_port", channel)):
        health = health_pb2_grpc.HealthStub(ch)
        times, failures = [], 0
        for _ in range(checks):
            t = time.perf_counter()
            try:
                health.Check(health_pb2.HealthCheckRequest(service=READINESS), timeout=5)
                times.append((time.perf_counter() - t) * 1000)
            except grpc.RpcError:
                failures += 1
        q = statistics.quantiles(times, n=100) if len(times) > 1 else [float("nan")] * 99
        latency[name] = {
            "p50_ms": round(statistics.median(times), 2) if times else None,
            "p99_ms": round(q[98], 2),
            "failures": failures,
        }
    for call in calls:
        call.cancel()
    health_channel.close()
    with contextlib.suppress(grpc.RpcError):  # best effort: the process is stopped anyway
        stub.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=AUTH, timeout=30)
    return {"streams": streams, "codes": codes, "readiness_check_latency": latency}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=6)
    parser.add_argument("--mib", type=int, default=60)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--checks", type=int, default=200)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-front-door-"))
    tiny = ensure_tiny_model(work / "tiny-model")
    port, health_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FORGEDIT_")},
        "PYTHONPATH": str(REPO),
        "FORGEDIT_GRPC_PORT": str(port),
        "FORGEDIT_HEALTH_PORT": str(health_port),
        "FORGEDIT_METRICS_PORT": "none",
        "FORGEDIT_DATA_DIR": str(work / "data"),
        "FORGEDIT_LOG_LEVEL": "WARNING",
        "FORGEDIT_AUTH_TOKENS": json.dumps([TOKEN]),
        "FORGEDIT_BASE_MODELS": json.dumps({"tiny": str(tiny / "stable-diffusion")}),
        "FORGEDIT_BLIP_DIR": str(tiny / "blip"),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "server.main"], env=env, stderr=subprocess.DEVNULL
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=client_options())
    try:
        wait_serving(channel)
        time.sleep(2)
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 120, 40)).save(buffer, format="PNG")
        image = buffer.getvalue()
        result = {
            "unauthenticated": unauthenticated(channel, process.pid, args.messages, args.mib),
            "idle_streams": idle_streams(channel, health_port, image, args.streams, args.checks),
        }
        print(json.dumps(result, indent=2))
    finally:
        channel.close()
        process.terminate()
        process.wait(120)


if __name__ == "__main__":
    main()
