"""Fault scenarios against a real server (real tiny engine, real embedded registry), one per
test: cancel during training, cancel during sampling, a client killed mid-stream (with and
without ``detach``), and more concurrent jobs than the queue holds. After each: the stated
status, the device free (scheduler idle), no temp files, no half-registered model, server
ready."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from support import server as support

from server._proto import forgedit_pb2 as pb

AUTH = support.AUTH
edit_request = support.edit_request
stream = support.stream
unary = support.unary

LONG_TRAINING = {"updates": 5000, "batch_size": 1}  # minutes if a cancel were ignored
QUICK_TRAINING = {"updates": 4, "batch_size": 2}  # an edit model to sample, in seconds


@pytest.fixture
def harness(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Any]:
    """A server of its own for each scenario (Triton's L0 style): the process's threads and
    file descriptors are snapshotted before it starts and must be back after it stops."""
    before = support.Resources.now()
    with support.running_server(tmp_path, tiny_model_dir, queue_size=2, max_steps=1000) as h:
        yield h
    support.assert_resources_back(before)


@pytest.fixture(scope="module")
def photo() -> bytes:
    return support.sample_photo("cat.jpg")


@pytest.fixture
def edit_model_id(harness: Any, photo: bytes) -> str:
    outcome = stream(harness.stub.Edit, edit_request(photo, training=QUICK_TRAINING))
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    return str(outcome.of("completed")[0].edit_model_id)


def _models(h: Any) -> set[str]:
    listed, outcome = unary(h.stub.ListEditModels, pb.ListEditModelsRequest())
    assert outcome.code == grpc.StatusCode.OK
    return {m.edit_model_id for m in listed.edit_models}


def _cancel_on_first(kind: str, h: Any) -> tuple[list[int], object]:
    """An on_event hook that cancels the job (CancelJob) at its first ``kind`` event and
    records the job's last sequence number once the cancel has been accepted."""
    marks: list[int] = []

    def on_event(event: pb.Event, _call: object) -> None:
        if event.WhichOneof("kind") == kind and not marks:
            job, outcome = unary(h.stub.CancelJob, pb.CancelJobRequest(job_id=event.job_id))
            assert outcome.code == grpc.StatusCode.OK
            assert job.job.state in (pb.JOB_STATE_CANCELLING, pb.JOB_STATE_CANCELLED)
            marks.append(h.scheduler.get(event.job_id).last_sequence)

    return marks, on_event


def test_cancel_during_training(harness: Any, photo: bytes, edit_model_id: str) -> None:
    before = _models(harness)
    marks, on_event = _cancel_on_first("training", harness)
    # No deadline: the server would rightly refuse a deadline shorter than 5000 updates.
    outcome = stream(
        harness.stub.Edit,
        edit_request(photo, training=LONG_TRAINING),
        on_event=on_event,
        timeout=None,
    )
    assert outcome.code == grpc.StatusCode.CANCELLED, outcome.details
    info = outcome.detail(error_details_pb2.ErrorInfo)
    assert info.reason == "CANCELLED" and "client cancelled" in info.metadata["reason"]
    # Stopped within one training update of the cancel: at most the update in flight reports.
    late = [e for e in outcome.events if e.sequence > marks[0]]
    assert len([e for e in late if e.WhichOneof("kind") == "training"]) <= 1
    assert {e.WhichOneof("kind") for e in late} <= {"training", "heartbeat"}
    trained = outcome.of("training")
    assert trained[-1].update < trained[-1].total
    job, _ = unary(harness.stub.GetJob, pb.GetJobRequest(job_id=outcome.events[0].job_id))
    assert job.job.state == pb.JOB_STATE_CANCELLED
    assert job.job.error_code == grpc.StatusCode.CANCELLED.value[0]
    support.assert_nothing_left_behind(harness)
    assert _models(harness) == before, "a cancelled fine-tune registered an edit model"


def test_cancel_during_sampling(harness: Any, edit_model_id: str) -> None:
    sweep = pb.SweepOptions(steps=1000, gammas=[0.1 * i for i in range(8)], seeds=[1, 2, 3, 4])
    marks, on_event = _cancel_on_first("sampling", harness)
    outcome = stream(
        harness.stub.Sample,
        pb.SampleRequest(
            edit_model_id=edit_model_id, target_prompts=["A photo of a bird."], sweep=sweep
        ),
        on_event=on_event,
        timeout=None,
    )
    assert outcome.code == grpc.StatusCode.CANCELLED, outcome.details
    late = [e for e in outcome.events if e.sequence > marks[0]]
    assert len([e for e in late if e.WhichOneof("kind") == "sampling"]) <= 1
    assert not any(e.WhichOneof("kind") == "image" for e in late)
    assert len(outcome.of("image")) < 32
    support.assert_nothing_left_behind(harness)
    # The device's UNet was restored: the same edit model still samples.
    again = stream(
        harness.stub.Sample,
        pb.SampleRequest(
            edit_model_id=edit_model_id,
            target_prompts=["A photo of a bird."],
            sweep=pb.SweepOptions(steps=2, gammas=[0.5], seeds=[1]),
        ),
    )
    assert again.code == grpc.StatusCode.OK


_CLIENT = r"""
import sys, grpc
from server._proto import forgedit_pb2 as pb, forgedit_pb2_grpc as pb_grpc
request = pb.EditRequest.FromString(sys.stdin.buffer.read())
channel = grpc.insecure_channel(sys.argv[1])
stub = pb_grpc.ForgeditServiceStub(channel)
for response in stub.Edit(request, metadata=(("authorization", "Bearer " + sys.argv[2]),)):
    event = response.event
    if event.WhichOneof("kind") == "training":
        print(event.job_id, flush=True)
"""


def _killed_client(h: Any, request: pb.EditRequest) -> str:
    """Run an Edit from a separate client process, SIGKILL it at its first training event,
    and return the job id."""
    client = subprocess.Popen(
        [sys.executable, "-c", _CLIENT, f"127.0.0.1:{h.port}", support.TOKEN],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=support.subprocess_env(),
    )
    try:
        assert client.stdin is not None and client.stdout is not None
        client.stdin.write(request.SerializeToString())
        client.stdin.close()
        job_id = client.stdout.readline().decode().strip()
        assert job_id.startswith("job_"), "the client saw no training event"
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=10)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    return job_id


def test_client_killed_mid_stream_cancels_the_job(
    harness: Any, photo: bytes, edit_model_id: str
) -> None:
    before = _models(harness)
    job_id = _killed_client(harness, edit_request(photo, training=LONG_TRAINING))
    job = harness.scheduler.get(job_id)
    assert job.wait_finished(60), "the job kept running after its client died"
    assert job.state.name == "CANCELLED" and "disconnected" in job.cancel.reason
    support.assert_nothing_left_behind(harness)
    assert _models(harness) == before


def test_detached_job_survives_its_client_and_can_be_reattached(harness: Any, photo: bytes) -> None:
    request = edit_request(
        photo, training={"updates": 20, "batch_size": 1}, request_id="detached-1", detach=True
    )
    job_id = _killed_client(harness, request)
    # Re-attach with the same request id: the whole stream is replayed, then followed.
    outcome = stream(harness.stub.Edit, request)
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert outcome.events[0].accepted.job_id == job_id
    assert [t.update for t in outcome.of("training")] == list(range(1, 21))
    assert outcome.kinds()[-1] == "completed"
    support.assert_nothing_left_behind(harness)


def test_more_jobs_than_the_queue_holds(harness: Any, photo: bytes, edit_model_id: str) -> None:
    """queue_size=2: one running, two waiting, the next is RESOURCE_EXHAUSTED with a retry
    hint. A sampling job overtakes a queued training job."""
    calls = []

    def submit(call: object, request: object) -> tuple[object, pb.Event]:
        responses = call(request, metadata=AUTH)  # type: ignore[operator]
        calls.append(responses)
        return responses, next(responses).event

    try:
        _, running = submit(harness.stub.Edit, edit_request(photo, training=LONG_TRAINING))
        assert support.wait_for(
            lambda: harness.scheduler.get(running.job_id).state.name == "RUNNING"
        )
        queued_edit_call, queued_edit = submit(
            harness.stub.Edit, edit_request(photo, training=LONG_TRAINING)
        )
        assert queued_edit.accepted.queue_position == 1
        _, queued_sample = submit(
            harness.stub.Sample,
            pb.SampleRequest(
                edit_model_id=edit_model_id,
                target_prompts=["A bird."],
                sweep=pb.SweepOptions(steps=2),
            ),
        )
        assert queued_sample.accepted.queue_position == 1  # sampling jumps ahead
        moved = next(queued_edit_call).event  # type: ignore[call-overload]
        assert moved.queued.position == 2
        # A silence while waiting is filled with heartbeats (interval 1 s here).
        beat = next(queued_edit_call).event  # type: ignore[call-overload]
        assert beat.WhichOneof("kind") == "heartbeat"
        assert beat.heartbeat.state == pb.JOB_STATE_QUEUED
        assert beat.heartbeat.queue_position == 2 and beat.sequence == moved.sequence

        refused = stream(harness.stub.Edit, edit_request(photo))
        assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.details
        assert refused.events == []
        retry = refused.detail(error_details_pb2.RetryInfo)
        assert retry is not None and retry.retry_delay.seconds >= 1
        assert refused.detail(error_details_pb2.QuotaFailure) is not None
        assert harness.scheduler.queue_depth() == 2
    finally:
        for responses in calls:
            responses.cancel()  # disconnect: cancels the job
    support.assert_nothing_left_behind(harness)


def test_concurrent_bad_and_good_requests_do_not_interfere(
    harness: Any, photo: bytes, edit_model_id: str
) -> None:
    """One bad request never fails its neighbours."""
    results: dict[str, grpc.StatusCode] = {}

    def good() -> None:
        results["good"] = stream(
            harness.stub.Sample,
            pb.SampleRequest(
                edit_model_id=edit_model_id,
                target_prompts=["A bird."],
                sweep=pb.SweepOptions(steps=2, gammas=[0.5]),
            ),
        ).code

    def bad(i: int) -> None:
        results[f"bad{i}"] = stream(harness.stub.Edit, edit_request(b"junk" * i)).code

    threads = [threading.Thread(target=good)] + [
        threading.Thread(target=bad, args=(i,)) for i in range(1, 5)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results.pop("good") == grpc.StatusCode.OK
    assert set(results.values()) == {grpc.StatusCode.INVALID_ARGUMENT}
    support.assert_nothing_left_behind(harness)
