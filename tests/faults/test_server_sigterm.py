"""SIGTERM with a job running, against ``python -m server.main`` in a subprocess configured
only through environment variables: readiness goes NOT_SERVING, new calls get UNAVAILABLE, the
queued job ends UNAVAILABLE, the running job finishes and streams every event, the process
exits 0, and every log line of a job carries its job id."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import server as support

from server._proto import forgedit_pb2 as pb
from server._proto import forgedit_pb2_grpc as pb_grpc
from server.service import SERVICE_NAME
from server.transport import client_options


def _health(channel: grpc.Channel, service: str) -> int | None:
    try:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            .status
        )
    except grpc.RpcError:
        return None


def test_sigterm_drains_running_jobs_and_exits_zero(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = support.free_port()
    env = support.server_process_env(
        tmp_path / "data",
        tiny_model_dir,
        port,
        FORGEDIT_GRACE_PERIOD_S="120",
        FORGEDIT_HEARTBEAT_INTERVAL_S="1",
        FORGEDIT_LOG_FORMAT="json",
    )
    log_file = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "server.main"], env=env, stdout=log_file, stderr=subprocess.STDOUT
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=client_options())
    stub = pb_grpc.ForgeditServiceStub(channel)
    try:
        assert support.wait_for(
            lambda: (
                _health(channel, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
                or process.poll() is not None
            ),
            timeout=180,
            interval=0.5,
        )
        assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]

        photo = support.sample_photo()
        training = threading.Event()
        outcomes: dict[str, object] = {}

        def run(name: str, request: pb.EditRequest) -> None:
            def on_event(event: pb.Event, _call: object) -> None:
                if event.WhichOneof("kind") == "training":
                    training.set()

            outcomes[name] = support.stream(stub.Edit, request, timeout=None, on_event=on_event)

        running = threading.Thread(
            target=run,
            args=(
                "running",
                support.edit_request(photo, training={"updates": 40, "batch_size": 1}),
            ),
        )
        running.start()
        assert training.wait(120), "the first job never started training"
        queued_calls = stub.Edit(support.edit_request(photo), metadata=support.AUTH)
        accepted = next(queued_calls).event
        assert accepted.accepted.queue_position == 1

        process.send_signal(signal.SIGTERM)
        assert support.wait_for(
            lambda: _health(channel, SERVICE_NAME) != health_pb2.HealthCheckResponse.SERVING,
            timeout=30,
        )
        refused = support.stream(stub.Edit, support.edit_request(photo))
        assert refused.code == grpc.StatusCode.UNAVAILABLE, refused.details
        with pytest.raises(grpc.RpcError) as queued_end:
            for _ in queued_calls:
                pass
        assert queued_end.value.code() == grpc.StatusCode.UNAVAILABLE

        running.join(120)
        finished = outcomes["running"]
        assert finished.code == grpc.StatusCode.OK, finished.details  # type: ignore[attr-defined]
        assert finished.kinds()[-1] == "completed"  # type: ignore[attr-defined]
        assert process.wait(timeout=60) == 0
    finally:
        channel.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        log_file.close()

    lines = [
        json.loads(line)
        for line in (tmp_path / "server.log").read_text().splitlines()
        if line.startswith("{")
    ]
    job_id = accepted.job_id
    job_lines = [line for line in lines if line.get("job_id") == job_id]
    assert job_lines, "the queued job left no log line with its id"
    started = [line for line in lines if line["message"].startswith("job started")]
    assert started and all("job_id" in line for line in started)
    assert any(line["message"].startswith("draining") for line in lines)
    assert all("Traceback" not in line.get("message", "") for line in lines)
