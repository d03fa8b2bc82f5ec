"""Benchmark the gRPC service on the tiny model; prints one JSON object.

Figures (BENCHMARKS.md):
- ``first_event_ms``: from issuing a Sample call to receiving its first event (``accepted``).
- ``sample_overhead``: the same sweep sampled through gRPC (client-side wall time of the whole
  stream) and in-process (``Engine.sample`` on a second engine of the same base model in this
  process), alternating, medians; ``overhead_pct`` = grpc / in-process - 1.
- ``concurrent``: 8 clients at once, each running ``--rounds`` Sample calls (and one Edit
  each): queue-wait (server-reported) and end-to-end (client-side) percentiles.
- ``idle_rss_mib``: resident memory of an idle ``forgedit-server`` process (subprocess, tiny
  model, after warm-up).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_server.py [--repeats N] [--rounds N]``.
Run it on an otherwise idle machine; numbers under foreign load are not comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc
import torch
from photos import add_photo_arguments, chosen_photo

from server._proto import forgedit_pb2 as pb
from server._proto import forgedit_pb2_grpc as pb_grpc
from server.transport import client_options

REPO = Path(__file__).resolve().parent.parent


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
        "max": ordered[-1],
        "n": len(ordered),
    }


def run_stream(call: Any, request: Any) -> tuple[list[pb.Event], float, float]:
    """(events, seconds to the first event, seconds to the end)."""
    started = time.perf_counter()
    first = 0.0
    events: list[pb.Event] = []
    for response in call(request):
        if not events:
            first = time.perf_counter() - started
        events.append(response.event)
    return events, first, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    add_photo_arguments(parser, tedbench_photo="apples.jpeg")
    args = parser.parse_args()
    photo_path = chosen_photo(parser, args)
    torch.set_num_threads(1)

    from forgedit.zoo.tiny import ensure_tiny_model
    from registry import EditModelRegistry, RegistryConfig
    from server.main import create_server, default_engine_factory
    from server.settings import ServerSettings

    work = Path(tempfile.mkdtemp(prefix="bench-server-"))
    tiny = ensure_tiny_model(work / "tiny-model")
    settings = ServerSettings(
        grpc_port=0,
        health_port=None,
        metrics_port=None,
        data_dir=work / "data",
        queue_size=64,
        base_models={"tiny": tiny / "stable-diffusion"},
        blip_dir=tiny / "blip",
        log_level="WARNING",
    )
    registry = EditModelRegistry(RegistryConfig(data_dir=work / "data" / "registry"))
    server, port = create_server(settings, registry=registry)
    assert server.wait_ready(300)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=client_options())
    stub = pb_grpc.ForgeditServiceStub(channel)
    photo = photo_path.read_bytes()
    result: dict[str, Any] = {"torch_threads": torch.get_num_threads()}

    quick_training = pb.TrainingOptions(updates=10, batch_size=2, seed=1)
    events, _, _ = run_stream(
        stub.Edit,
        pb.EditRequest(
            image=photo,
            target_prompts=["A photo of a pear."],
            training=quick_training,
            sweep=pb.SweepOptions(steps=2, seeds=[0], gammas=[0.5]),
        ),
    )
    model_id = events[-1].completed.edit_model_id

    # 1. Time to first event.
    small = pb.SampleRequest(
        edit_model_id=model_id,
        target_prompts=["A pear."],
        sweep=pb.SweepOptions(steps=2, seeds=[0], gammas=[0.5]),
    )
    firsts = [run_stream(stub.Sample, small)[1] * 1000 for _ in range(args.repeats * 3)]
    result["first_event_ms"] = percentiles(firsts)

    # 2. Sample through gRPC vs the same sampling in-process.
    sweep_options = pb.SweepOptions(steps=25, seeds=[1, 2], gammas=[0.4, 0.6, 0.8, 1.0])
    request = pb.SampleRequest(
        edit_model_id=model_id, target_prompts=["A photo of a pear."], sweep=sweep_options
    )
    from forgedit.config import SweepConfig

    sweep = SweepConfig(
        prompts=("A photo of a pear.",), steps=25, seeds=(1, 2), gammas=(0.4, 0.6, 0.8, 1.0)
    )
    engine = default_engine_factory(settings, {"tiny": tiny / "stable-diffusion"})("tiny", "cpu")
    edit_model = registry.load(model_id)
    engine.sample(edit_model, sweep)  # warm
    run_stream(stub.Sample, request)
    grpc_s, local_s = [], []
    for _ in range(args.repeats):
        grpc_s.append(run_stream(stub.Sample, request)[2])
        t = time.perf_counter()
        images = engine.sample(edit_model, sweep)
        for image in images:
            image.png_bytes()  # the server encodes every image too
        local_s.append(time.perf_counter() - t)
    g, loc = statistics.median(grpc_s), statistics.median(local_s)
    result["sample_overhead"] = {
        "images": sweep.num_images,
        "steps": 25,
        "grpc_median_s": g,
        "in_process_median_s": loc,
        "overhead_pct": 100 * (g / loc - 1),
    }

    # 3. Eight concurrent clients.
    queue_wait: dict[str, list[float]] = {"Sample": [], "Edit": []}
    e2e: dict[str, list[float]] = {"Sample": [], "Edit": []}
    lock = threading.Lock()

    def client(i: int) -> None:
        calls = [
            (
                "Sample",
                stub.Sample,
                pb.SampleRequest(
                    edit_model_id=model_id,
                    target_prompts=[f"A photo of pear {i}."],
                    sweep=pb.SweepOptions(steps=10, seeds=[i], gammas=[0.5, 0.7]),
                ),
            )
        ] * args.rounds
        calls.append(
            (
                "Edit",
                stub.Edit,
                pb.EditRequest(
                    image=photo,
                    target_prompts=["A photo of a pear."],
                    training=pb.TrainingOptions(updates=10, batch_size=2, seed=100 + i),
                    sweep=pb.SweepOptions(steps=10, seeds=[i], gammas=[0.5]),
                ),
            )
        )
        for method, call, req in calls:
            events, _, total = run_stream(call, req)
            with lock:
                e2e[method].append(total)
                queue_wait[method].append(events[-1].completed.timings.queue_wait_seconds)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result["concurrent"] = {
        "clients": 8,
        "wall_s": time.perf_counter() - started,
        "queue_wait_s": {m: percentiles(v) for m, v in queue_wait.items()},
        "end_to_end_s": {m: percentiles(v) for m, v in e2e.items()},
    }
    channel.close()
    server.stop()
    registry.close()

    # 4. Idle server memory, in its own process.
    result["idle_rss_mib"] = idle_rss(tiny, work)
    print(json.dumps(result, indent=2))


def idle_rss(tiny: Path, work: Path) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "FORGEDIT_GRPC_PORT": str(port),
        "FORGEDIT_METRICS_PORT": "none",
        "FORGEDIT_HEALTH_PORT": "0",
        "FORGEDIT_DATA_DIR": str(work / "idle"),
        "FORGEDIT_LOG_LEVEL": "WARNING",
        "FORGEDIT_BASE_MODELS": json.dumps({"tiny": str(tiny / "stable-diffusion")}),
        "FORGEDIT_BLIP_DIR": str(tiny / "blip"),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "server.main"], env=env, stderr=subprocess.DEVNULL
    )
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                status = stub.Check(
                    health_pb2.HealthCheckRequest(service="forgedit.v1.ForgeditService"), timeout=2
                ).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        time.sleep(2)
        channel.close()
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")
    finally:
        process.terminate()
        process.wait(60)


if __name__ == "__main__":
    main()
