"""SIGKILL in the middle of a fine-tune, then a restart on the same data directory: the client
sees UNAVAILABLE (never a hang), the restarted replica becomes ready, nothing half-written
remains (no spool entry or staging, no cache download, no temp file in its own temp
directory), the same request then completes, and the registry holds exactly one edit model.
The killed process is a real ``python -m server.main`` configured through the environment."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import server as support

from server._proto import forgedit_pb2 as pb
from server._proto import forgedit_pb2_grpc as pb_grpc
from server.service import SERVICE_NAME
from server.transport import client_options


def _ready(channel: grpc.Channel) -> bool:
    try:
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status
    except grpc.RpcError:
        return False
    return bool(status == health_pb2.HealthCheckResponse.SERVING)


@contextmanager
def _server(tmp: Path, tiny_model_dir: Path, port: int, name: str) -> Iterator[subprocess.Popen]:
    env = support.server_process_env(
        tmp / "data",
        tiny_model_dir,
        port,
        FORGEDIT_LOG_FORMAT="text",
        TMPDIR=str(tmp / "process-tmp"),
    )
    with (tmp / f"{name}.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.main"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(60)


@pytest.mark.slow
def test_sigkill_mid_training_then_restart(tmp_path: Path, tiny_model_dir: Path) -> None:
    (tmp_path / "process-tmp").mkdir()
    port = support.free_port()
    photo = support.encoded("PNG", (64, 64))
    before = support.Resources.now()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=client_options())
    stub = pb_grpc.ForgeditServiceStub(channel)
    try:
        with _server(tmp_path, tiny_model_dir, port, "first") as first:
            assert support.wait_for(lambda: _ready(channel) or first.poll() is not None, 180)
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]

            def kill_on_training(event: pb.Event, _call: object) -> None:
                if event.WhichOneof("kind") == "training" and first.poll() is None:
                    first.send_signal(signal.SIGKILL)

            long_edit = support.edit_request(
                photo, request_id="killed-1", training={"updates": 200, "batch_size": 1}
            )
            killed = support.stream(stub.Edit, long_edit, on_event=kill_on_training)
            assert first.wait(60) == -signal.SIGKILL
            assert killed.code == grpc.StatusCode.UNAVAILABLE, killed.details
            assert "training" in killed.kinds() and "registered" not in killed.kinds()

        with _server(tmp_path, tiny_model_dir, port, "second") as second:
            assert support.wait_for(lambda: _ready(channel) or second.poll() is not None, 180)
            assert second.poll() is None, (tmp_path / "second.log").read_text()[-3000:]
            registry = tmp_path / "data" / "registry"
            for sub in ("spool/entries", "spool/staging", "cache/tmp", "cache/models"):
                d = registry / sub
                assert not d.is_dir() or not any(d.iterdir()), f"left in {sub}"

            # The client retries the same request: it now completes, once.
            done = support.stream(stub.Edit, support.edit_request(photo, request_id="killed-1"))
            assert done.code == grpc.StatusCode.OK, done.details
            listed, outcome = support.unary(stub.ListEditModels, pb.ListEditModelsRequest())
            assert outcome.code == grpc.StatusCode.OK, outcome.details
            assert [m.edit_model_id for m in listed.edit_models] == [
                done.of("registered")[0].edit_model_id
            ]
            second.send_signal(signal.SIGTERM)
            assert second.wait(120) == 0
    finally:
        channel.close()
    # ONNX Runtime writes a session-id file (.ses) into the temp directory when it is imported;
    # it is the library's, once per process, not a half-written file of ours.
    leftovers = [p for p in (tmp_path / "process-tmp").iterdir() if p.name != ".ses"]
    assert not leftovers, f"temp files left behind: {leftovers[:5]}"
    stray = [p for p in (tmp_path / "data").rglob("*") if p.name.endswith(".tmp")]
    assert not stray, f"temp files left behind: {stray[:5]}"
    support.assert_resources_back(before)
