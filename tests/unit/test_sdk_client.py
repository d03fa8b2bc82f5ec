"""Unit tests of the SDK (no sockets): event mapping, errors, options, the retry policy, and
re-attaching after a dropped stream, against scripted fake stubs (sync and asyncio).

The fakes live here and are reused by test_sdk_cli.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from forgedit_client import (
    Accepted,
    AsyncForgeditClient,
    Completed,
    ForgeditClient,
    ForgeditRpcError,
    Heartbeat,
    ImageReady,
    InvalidOptionError,
    OutputOptions,
    Preview,
    Registered,
    RetryPolicy,
    TrainingProgress,
    UnknownEvent,
)
from forgedit_client._proto import forgedit_pb2 as pb
from forgedit_client.events import event_from_proto
from forgedit_client.options import edit_request, split_options
from forgedit_client.stream import ResumeTracker
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2


class FakeRpcError(grpc.RpcError):
    """What a real call raises: code(), details(), trailing_metadata() with rich details."""

    def __init__(self, code: grpc.StatusCode, message: str = "", *details: Any) -> None:
        super().__init__(message)
        self._code = code
        self._message = message
        self._trailing: tuple[tuple[str, bytes], ...] = ()
        if details:
            status = status_pb2.Status(code=code.value[0], message=message)
            for d in details:
                packed = any_pb2.Any()
                packed.Pack(d)
                status.details.append(packed)
            self._trailing = (("grpc-status-details-bin", status.SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return self._trailing


def unavailable(message: str = "connection reset") -> FakeRpcError:
    return FakeRpcError(grpc.StatusCode.UNAVAILABLE, message)


def retry_info(seconds: int) -> error_details_pb2.RetryInfo:
    return error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds))


def bad_request(field: str, description: str) -> error_details_pb2.BadRequest:
    return error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
        ]
    )


def event(seq: int, job: str = "job-1", **kind: Any) -> pb.Event:
    return pb.Event(job_id=job, sequence=seq, **kind)


def edit_job_events(job: str = "job-1", images: int = 2) -> list[pb.Event]:
    """A plausible complete Edit stream: accepted → captioned → training ×2 → registered →
    sampling → images → completed."""
    evs = [
        event(
            1,
            job,
            accepted=pb.AcceptedEvent(
                job_id=job, queue_position=0, images_total=images, estimated_seconds=3.0
            ),
        ),
        event(
            2, job, captioned=pb.CaptionedEvent(source_prompt="A photo of a cat", from_caption=True)
        ),
        event(
            3,
            job,
            training=pb.TrainingEvent(update=1, total=2, loss=0.5, eta_seconds=1.0, stage="joint"),
        ),
        event(
            4,
            job,
            training=pb.TrainingEvent(update=2, total=2, loss=0.25, eta_seconds=0.0, stage="joint"),
        ),
        event(5, job, registered=pb.RegisteredEvent(edit_model_id="em-1", version=1)),
        event(
            6,
            job,
            sampling=pb.SamplingEvent(
                images_done=0, images_total=images, step=1, steps=2, forget="donotforget"
            ),
        ),
    ]
    for i in range(images):
        evs.append(
            event(
                7 + i,
                job,
                image=pb.ImageEvent(
                    index=i,
                    png=b"\x89PNG-fake-" + bytes([i]),
                    width=8,
                    height=8,
                    params=pb.ImageParams(
                        prompt="a dog",
                        forget="donotforget",
                        interpolation=pb.INTERPOLATION_VS,
                        gamma=0.5 + i / 10,
                        seed=i,
                        guidance=7.5,
                        steps=2,
                    ),
                ),
            )
        )
    evs.append(
        event(
            7 + images,
            job,
            completed=pb.CompletedEvent(
                timings=pb.PhaseTimings(
                    training_seconds=1.5, total_seconds=3.0, sampling_backend="onnxruntime"
                ),
                edit_model_id="em-1",
                images=images,
                train_seed=42,
            ),
        )
    )
    return evs


class FakeCall:
    """A server-streaming call: yields scripted responses, raises scripted errors."""

    def __init__(self, script: Iterable[Any], wrap: type) -> None:
        self.script = list(script)
        self.wrap = wrap
        self.cancelled = False

    def __iter__(self) -> Iterator[Any]:
        for item in self.script:
            if isinstance(item, BaseException):
                raise item
            yield self.wrap(event=item)

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeStub:
    """Scripted ForgeditServiceStub. ``streams[method]`` is a list of call scripts used in
    order; ``unary[method]`` a list of responses or errors. Every call is recorded."""

    def __init__(
        self,
        streams: dict[str, list[list[Any]]] | None = None,
        unary: dict[str, list[Any]] | None = None,
    ) -> None:
        self.streams = {k: list(v) for k, v in (streams or {}).items()}
        self.unary = {k: list(v) for k, v in (unary or {}).items()}
        self.calls: list[tuple[str, Any, Any, Any]] = []
        self.opened: list[FakeCall] = []

    def _stream(self, method: str, wrap: type, request: Any, timeout: Any, metadata: Any) -> Any:
        self.calls.append((method, request, timeout, metadata))
        call = FakeCall(self.streams[method].pop(0), wrap)
        self.opened.append(call)
        return call

    def _unary(self, method: str, request: Any, timeout: Any, metadata: Any) -> Any:
        self.calls.append((method, request, timeout, metadata))
        item = self.unary[method].pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def Edit(self, request: Any, timeout: Any = None, metadata: Any = None) -> Any:
        return self._stream("Edit", pb.EditResponse, request, timeout, metadata)

    def Sample(self, request: Any, timeout: Any = None, metadata: Any = None) -> Any:
        return self._stream("Sample", pb.SampleResponse, request, timeout, metadata)

    def WatchJob(self, request: Any, timeout: Any = None, metadata: Any = None) -> Any:
        return self._stream("WatchJob", pb.WatchJobResponse, request, timeout, metadata)

    def __getattr__(self, method: str) -> Any:
        if method in ("GetJob", "CancelJob", "GetEditModel", "ListEditModels", "DeleteEditModel"):
            return lambda request, timeout=None, metadata=None: self._unary(
                method, request, timeout, metadata
            )
        raise AttributeError(method)

    def methods(self) -> list[str]:
        return [c[0] for c in self.calls]


# ============================================================================== tests


def client_with(stub: FakeStub, **kw: Any) -> tuple[ForgeditClient, list[float]]:
    slept: list[float] = []
    return ForgeditClient("fake:1", stub=stub, sleep=slept.append, **kw), slept


# ------------------------------------------------------------------------- event mapping


def test_every_event_kind_maps_to_its_dataclass() -> None:
    mapped = [event_from_proto(e) for e in edit_job_events()]
    kinds = [type(e).__name__ for e in mapped]
    assert kinds == [
        "Accepted",
        "Captioned",
        "TrainingProgress",
        "TrainingProgress",
        "Registered",
        "SamplingProgress",
        "ImageReady",
        "ImageReady",
        "Completed",
    ]
    assert all(e.job_id == "job-1" for e in mapped)
    assert [e.sequence for e in mapped] == list(range(1, 10))
    img = mapped[7]
    assert isinstance(img, ImageReady)
    assert img.params.interpolation == "vs" and img.params.gamma == pytest.approx(0.6)
    assert img.params.label() == "donotforget γ=0.6 seed=1"
    done = mapped[-1]
    assert isinstance(done, Completed) and done.timings.training_seconds == 1.5
    assert done.timings.sampling_backend == "onnxruntime"
    assert done.train_seed == 42


def test_vp_label_names_beta_and_alpha() -> None:
    e = event_from_proto(
        event(
            1,
            image=pb.ImageEvent(
                params=pb.ImageParams(
                    forget="encoderkv",
                    interpolation=pb.INTERPOLATION_VP,
                    gamma=1.2,
                    alpha=0.9,
                    seed=3,
                )
            ),
        )
    )
    assert isinstance(e, ImageReady)
    assert e.params.label() == "encoderkv β=1.2 α=0.9 seed=3"


def test_unset_kind_is_an_unknown_event_not_an_error() -> None:
    e = event_from_proto(pb.Event(job_id="j", sequence=4))
    assert isinstance(e, UnknownEvent) and e.kind == "" and e.sequence == 4


def test_image_save_is_atomic_and_leaves_no_temp_files(tmp_path: Any) -> None:
    e = event_from_proto(edit_job_events()[6])
    assert isinstance(e, ImageReady)
    path = e.save(tmp_path / "sub" / "x.png")
    assert path.read_bytes() == e.png
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.png"]


# ----------------------------------------------------------------------------- errors


def test_rpc_error_unpacks_field_violations_and_retry_hint() -> None:
    exc = FakeRpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "steps must be 1..200, got 0",
        bad_request("sweep.steps", "steps must be 1..200, got 0"),
    )
    err = ForgeditRpcError.from_grpc(exc)
    assert err.code_name == "INVALID_ARGUMENT"
    assert err.field_violations[0].field == "sweep.steps"
    # The violation repeats the message: the one-line form does not say it twice.
    assert err.one_line() == "INVALID_ARGUMENT: steps must be 1..200, got 0"

    full = ForgeditRpcError.from_grpc(
        FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the job queue is full", retry_info(7))
    )
    assert full.retry_delay == 7
    assert full.one_line() == "RESOURCE_EXHAUSTED: the job queue is full (retry in 7 s)"


def test_asyncio_errors_unpack_the_same_details() -> None:
    fake = FakeRpcError(
        grpc.StatusCode.INVALID_ARGUMENT, "bad steps", bad_request("sweep.steps", "bad steps")
    )
    aio_error = grpc.aio.AioRpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*fake.trailing_metadata()),
        "bad steps",
    )
    err = ForgeditRpcError.from_grpc(aio_error)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in err.field_violations] == ["sweep.steps"]


def test_rpc_error_without_details_still_has_code_and_message() -> None:
    err = ForgeditRpcError.from_grpc(FakeRpcError(grpc.StatusCode.NOT_FOUND, "no such model"))
    assert (err.code, err.message, err.field_violations) == (
        grpc.StatusCode.NOT_FOUND,
        "no such model",
        (),
    )


# ------------------------------------------------------------------------------ options


def test_options_reach_the_request_and_unset_ones_stay_unset() -> None:
    stub = FakeStub({"Edit": [edit_job_events()]})
    client, _ = client_with(stub)
    client.edit(
        b"img",
        ["a dog", "a fox"],
        mode="two_stage",
        train_seed=5,
        gammas=[0.5, 0.7],
        forget=["encoderkv"],
        interpolation="vp",
        precision="fast",
        delta_format="int8",
        request_id="req-1",
    ).result()
    ((_, req, timeout, _),) = stub.calls
    assert req.request_id == "req-1" and list(req.target_prompts) == ["a dog", "a fox"]
    assert req.training.mode == pb.TRAINING_MODE_TWO_STAGE and req.training.seed == 5
    assert req.training.precision == pb.PRECISION_FAST
    assert req.training.delta_format == pb.DELTA_FORMAT_INT8
    assert list(req.sweep.gammas) == [0.5, 0.7]
    assert list(req.sweep.forget_strategies) == ["encoderkv"]
    assert req.sweep.interpolation == pb.INTERPOLATION_VP
    assert not req.sweep.HasField("steps") and not req.training.HasField("width")
    assert not req.HasField("source_prompt")
    assert 0 < timeout <= 30 * 60  # the documented Edit default


def test_unknown_option_is_refused_before_sending_and_names_the_accepted() -> None:
    stub = FakeStub()
    client, _ = client_with(stub)
    with pytest.raises(InvalidOptionError, match=r"unknown option 'gamma'.*gammas"):
        client.edit(b"img", "a dog", gamma=0.5)
    with pytest.raises(InvalidOptionError, match="unknown interpolation 'vx'; accepted: vs, vp"):
        client.edit(b"img", "a dog", interpolation="vx")
    with pytest.raises(InvalidOptionError, match="'mode' is a training option"):
        client.sample("em-1", "a dog", mode="joint")  # a stored model is never re-trained
    with pytest.raises(InvalidOptionError, match="request_id"):
        client.edit(b"img", "a dog", request_id="../../etc")
    assert stub.calls == []


def test_labels_and_ttl_reach_the_request_and_bad_types_are_refused_before_sending() -> None:
    stub = FakeStub({"Edit": [edit_job_events()]})
    client, _ = client_with(stub)
    client.edit(b"img", "a dog", labels={"team": "red"}, ttl_seconds=3600).result()
    ((_, req, _, _),) = stub.calls
    assert dict(req.labels) == {"team": "red"} and req.ttl_seconds == 3600
    stub.calls.clear()
    with pytest.raises(InvalidOptionError, match="labels must be a mapping"):
        client.edit(b"img", "a dog", labels=["team=red"])  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match=r"labels\['team'\] must be text"):
        client.edit(b"img", "a dog", labels={"team": 1})  # type: ignore[dict-item]
    with pytest.raises(InvalidOptionError, match="ttl_seconds must not be negative"):
        client.edit(b"img", "a dog", ttl_seconds=-1)
    assert stub.calls == []
    # Unset: no labels, and the server's default time-to-live.
    bare = edit_request(
        b"img",
        "a dog",
        options=split_options({}),
        source_prompt=None,
        base_model=None,
        request_id="r",
        detach=False,
    )
    assert dict(bare.labels) == {} and not bare.HasField("ttl_seconds")


def test_a_request_id_is_generated_when_none_is_given() -> None:
    stub = FakeStub({"Sample": [[], []]})
    client, _ = client_with(stub)
    client.sample("em-1", "a dog").result()
    client.sample("em-1", "a dog").result()
    ids = [c[1].request_id for c in stub.calls]
    assert all(ids) and ids[0] != ids[1]


# ------------------------------------------------------------------------ retry policy


def test_backoff_is_capped_exponential_full_jitter() -> None:
    policy = RetryPolicy(max_attempts=6, initial_backoff=0.5, max_backoff=4.0, multiplier=2.0)
    top = [policy.backoff(a, rand=lambda lo, hi: hi) for a in range(1, 7)]
    assert top == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert policy.backoff(3, rand=lambda lo, hi: lo) == 0.0
    assert policy.backoff(1, server_hint=3.0, rand=lambda lo, hi: lo) == 3.0
    assert policy.should_retry(grpc.StatusCode.UNAVAILABLE, 5)
    assert not policy.should_retry(grpc.StatusCode.UNAVAILABLE, 6)
    assert not policy.should_retry(grpc.StatusCode.INTERNAL, 1)
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_unavailable_before_the_first_event_is_retried_with_the_same_request_id() -> None:
    stub = FakeStub({"Edit": [[unavailable()], [unavailable()], edit_job_events()]})
    client, slept = client_with(stub)
    result = client.edit(b"img", "a dog").result()
    assert stub.methods() == ["Edit", "Edit", "Edit"]
    assert len({c[1].request_id for c in stub.calls}) == 1
    assert len(slept) == 2 and all(0 <= s <= 10 for s in slept)
    assert result.completed and result.edit_model_id == "em-1" and len(result.images) == 2


def test_retries_are_bounded_and_the_last_error_surfaces() -> None:
    stub = FakeStub({"Edit": [[unavailable()] for _ in range(3)]})
    client, slept = client_with(stub, retry=RetryPolicy(max_attempts=3))
    with pytest.raises(ForgeditRpcError) as info:
        client.edit(b"img", "a dog").result()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(stub.calls) == 3 and len(slept) == 2


def test_other_errors_are_not_retried() -> None:
    stub = FakeStub(
        {"Edit": [[FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", retry_info(5))]]}
    )
    client, slept = client_with(stub)
    with pytest.raises(ForgeditRpcError) as info:
        client.edit(b"img", "a dog").result()
    assert info.value.retry_delay == 5 and slept == [] and len(stub.calls) == 1


def test_a_dropped_stream_reattaches_by_request_id_after_the_last_sequence() -> None:
    events = edit_job_events()
    # The first call drops after 4 events; the re-attach replays from 3 (overlap) onward.
    stub = FakeStub({"Edit": [[*events[:4], unavailable()]], "WatchJob": [events[2:]]})
    client, slept = client_with(stub)
    stream = client.edit(b"img", "a dog", request_id="req-7")
    seen = list(stream)
    assert [e.sequence for e in seen] == list(range(1, 10))  # no duplicates, no holes
    method, watch, _, _ = stub.calls[1]
    assert method == "WatchJob"
    assert watch.request_id == "req-7" and watch.after_sequence == 4
    assert stream.result().losses == [0.5, 0.25]
    assert stream.gaps == 0 and stream.reattaches == 1 and len(slept) == 1


def test_a_call_cut_off_by_grpc_is_followed_up_and_a_server_cancel_is_final() -> None:
    """A replica shutting down with a stream open ends it with gRPC's own CANCELLED (no
    ErrorInfo): the SDK re-attaches as after a drop. The server's cancel of a job carries
    ErrorInfo CANCELLED and ends the stream for good."""
    events = edit_job_events()
    stub = FakeStub(
        {
            "Edit": [[*events[:4], FakeRpcError(grpc.StatusCode.CANCELLED, "CANCELLED")]],
            "WatchJob": [events[2:]],
        }
    )
    client, _ = client_with(stub)
    stream = client.edit(b"img", "a dog", request_id="req-8")
    assert [e.sequence for e in stream] == list(range(1, 10))
    assert stream.reattaches == 1 and stub.calls[1][0] == "WatchJob"

    server_cancel = FakeRpcError(
        grpc.StatusCode.CANCELLED,
        "the job was cancelled (client cancelled)",
        error_details_pb2.ErrorInfo(reason="CANCELLED"),
    )
    stub = FakeStub({"Edit": [[*events[:4], server_cancel]]})
    client, slept = client_with(stub)
    with pytest.raises(ForgeditRpcError) as info:
        client.edit(b"img", "a dog").result()
    assert info.value.code == grpc.StatusCode.CANCELLED and len(stub.calls) == 1 and not slept


def test_reattach_budget_resets_after_progress() -> None:
    events = edit_job_events()
    stub = FakeStub(
        {
            "Edit": [[events[0], unavailable()]],
            "WatchJob": [[events[1], unavailable()], [events[2], unavailable()], events[3:]],
        }
    )
    client, _ = client_with(stub, retry=RetryPolicy(max_attempts=2))
    assert client.edit(b"img", "a dog").result().completed


def test_reattach_that_finds_no_job_explains_the_drop() -> None:
    """A watch has no request to submit again: NOT_FOUND after a drop is final."""
    events = edit_job_events()
    stub = FakeStub(
        {
            "WatchJob": [
                [events[0], unavailable()],
                [FakeRpcError(grpc.StatusCode.NOT_FOUND, "unknown job")],
            ]
        }
    )
    client, _ = client_with(stub)
    with pytest.raises(
        ForgeditRpcError, match="connection dropped and job job-1 could not be re-attached"
    ) as info:
        client.watch_job(request_id="req-1").result()
    assert info.value.job_id == "job-1"
    # Both calls went to the job's replica: a watch never moves its key.
    assert [_key(c) for c in stub.calls] == ["req-1", "req-1"]


def test_a_job_lost_with_its_replica_is_submitted_again_elsewhere() -> None:
    """The connection dropped and the re-attach finds no job: the replica went away with the
    job. The stream submits the request again (same request id, moved key), the events start
    over, and the result is the new job's alone."""
    events = edit_job_events()
    again = edit_job_events("job-2")
    stub = FakeStub(
        {
            "Edit": [[*events[:7], unavailable()], again],
            "WatchJob": [[FakeRpcError(grpc.StatusCode.NOT_FOUND, "unknown job")]],
        }
    )
    client, _ = client_with(stub)
    stream = client.edit(b"img", "a dog", request_id="req-9")
    result = stream.result()
    assert stub.methods() == ["Edit", "WatchJob", "Edit"]
    assert [c[1].request_id for c in stub.calls if c[0] == "Edit"] == ["req-9", "req-9"]
    assert [_key(c) for c in stub.calls] == ["req-9", "req-9", "req-9~1"]
    assert result.completed and result.job_id == "job-2"
    assert len(result.images) == 2  # the lost job's image is not counted twice
    assert stream.resubmits == 1 and stream.job_id == "job-2"


def test_a_reattach_refused_by_a_draining_replica_submits_the_request_elsewhere() -> None:
    """A draining replica refuses every call with UNAVAILABLE and a retry hint (its queued jobs
    have ended; it is about to close): waiting for it is pointless, the request goes again
    elsewhere. A dropped connection (UNAVAILABLE without a hint) is re-attached again."""
    events = edit_job_events()
    draining = FakeRpcError(
        grpc.StatusCode.UNAVAILABLE,
        "the server is shutting down; retry on another replica",
        retry_info(1),
    )
    stub = FakeStub(
        {
            "Sample": [[*events[:2], unavailable()], edit_job_events("job-2")],
            "WatchJob": [[unavailable()], [draining]],
        }
    )
    client, _ = client_with(stub)
    stream = client.sample("em_model", "a dog")
    result = stream.result()
    assert stub.methods() == ["Sample", "WatchJob", "WatchJob", "Sample"]
    assert [_key(c) for c in stub.calls] == ["em_model", "em_model", "em_model", "em_model~1"]
    assert result.job_id == "job-2" and stream.resubmits == 1


def test_a_refused_start_moves_the_key_to_another_replica() -> None:
    stub = FakeStub({"Sample": [[unavailable()], [unavailable()], edit_job_events()]})
    client, _ = client_with(stub)
    client.sample("em_model", "a dog").result()
    assert [_key(c) for c in stub.calls] == ["em_model", "em_model~1", "em_model~2"]


def test_the_deadline_covers_all_attempts() -> None:
    clock = [0.0]
    tracker = ResumeTracker(
        RetryPolicy(max_attempts=10, initial_backoff=5, max_backoff=5),
        deadline=12.0,
        clock=lambda: clock[0],
    )
    err = ForgeditRpcError(grpc.StatusCode.UNAVAILABLE, "down")
    plan = tracker.after_error(err)
    assert plan.kind == "start" and plan.timeout is not None
    assert plan.timeout == pytest.approx(12.0 - plan.delay)  # the wait comes out of the budget
    clock[0] = 12.0  # nothing left: the error is final even though attempts remain
    with pytest.raises(ForgeditRpcError):
        tracker.after_error(err)


def test_heartbeats_repeat_the_last_sequence_and_still_pass() -> None:
    events = edit_job_events()
    beat = event(3, heartbeat=pb.HeartbeatEvent(state=pb.JOB_STATE_RUNNING))
    stub = FakeStub({"Edit": [[*events[:3], beat, beat, *events[3:]]]})
    client, _ = client_with(stub)
    seen = list(client.edit(b"img", "a dog"))
    beats = [e for e in seen if isinstance(e, Heartbeat)]
    assert len(beats) == 2 and beats[0].state == "running"
    assert [e.sequence for e in seen if not isinstance(e, Heartbeat)] == list(range(1, 10))


def test_gap_in_sequences_is_counted() -> None:
    tracker = ResumeTracker(RetryPolicy(), deadline=None)
    for seq in (1, 2, 5, 5, 6):
        tracker.accept(Accepted("j", seq, 0, 0, 0.0))
    assert tracker.gaps == 2 and tracker.last_sequence == 6


def test_leaving_the_iteration_cancels_the_call() -> None:
    stub = FakeStub({"Edit": [edit_job_events()]})
    client, _ = client_with(stub)
    stream = client.edit(b"img", "a dog")
    for e in stream:
        if isinstance(e, TrainingProgress):
            break
    stream.close()
    assert stub.opened[0].cancelled


def test_cancel_asks_the_server_by_job_id() -> None:
    job = pb.Job(job_id="job-1", state=pb.JOB_STATE_CANCELLING)
    stub = FakeStub(
        {"Edit": [edit_job_events()]}, unary={"CancelJob": [pb.CancelJobResponse(job=job)]}
    )
    client, _ = client_with(stub)
    stream = client.edit(b"img", "a dog")
    assert isinstance(next(iter(stream)), Accepted)
    stream.cancel()
    assert stub.methods() == ["Edit", "CancelJob"]
    assert stub.calls[1][1].job_id == "job-1" and stub.opened[0].cancelled


# ------------------------------------------------------------------------------- unary


def test_unary_reads_retry_unavailable_but_delete_does_not() -> None:
    model = pb.EditModel(
        edit_model_id="em-1",
        version=2,
        base_model="tiny",
        training_mode=pb.TRAINING_MODE_JOINT,
        delta_format=pb.DELTA_FORMAT_INT8,
        delta_bytes=1234,
    )
    stub = FakeStub(
        unary={
            "GetEditModel": [unavailable(), pb.GetEditModelResponse(edit_model=model)],
            "DeleteEditModel": [unavailable()],
        }
    )
    client, slept = client_with(stub)
    info = client.get_edit_model("em-1")
    assert info.edit_model_id == "em-1" and info.training_mode == "joint"
    assert (info.delta_format, info.delta_bytes) == ("int8", 1234)
    assert info.create_time is None
    with pytest.raises(ForgeditRpcError):
        client.delete_edit_model("em-1")
    assert stub.methods() == ["GetEditModel", "GetEditModel", "DeleteEditModel"]
    assert len(slept) == 1


def test_list_edit_models_follows_page_tokens() -> None:
    page = lambda ids, token: pb.ListEditModelsResponse(  # noqa: E731
        edit_models=[pb.EditModel(edit_model_id=i) for i in ids], next_page_token=token
    )
    stub = FakeStub(unary={"ListEditModels": [page(["a", "b"], "t1"), page(["c"], "")]})
    client, _ = client_with(stub)
    ids = [m.edit_model_id for m in client.list_edit_models(base_model="tiny", page_size=2)]
    assert ids == ["a", "b", "c"]
    assert [c[1].page_token for c in stub.calls] == ["", "t1"]
    assert all(c[1].base_model == "tiny" and c[1].page_size == 2 for c in stub.calls)


def test_token_goes_in_metadata_on_plaintext_channels() -> None:
    stub = FakeStub({"Sample": [[]]})
    client, _ = client_with(stub, token="s3cret")
    client.sample("em-1", "a dog").result()
    assert ("authorization", "Bearer s3cret") in stub.calls[0][3]


# -------------------------------------------------------------------------------- affinity


def _key(call: tuple[str, Any, Any, Any]) -> str | None:
    """The affinity key a recorded call carried (``forgedit-affinity``), if any."""
    keys = [v for k, v in call[3] or () if k == "forgedit-affinity"]
    return keys[0] if keys else None


def test_sample_and_its_reattach_and_cancel_are_keyed_by_edit_model() -> None:
    events = edit_job_events()
    job = pb.Job(job_id="job-1", state=pb.JOB_STATE_CANCELLING)
    stub = FakeStub(
        {"Sample": [[*events[:2], unavailable()]], "WatchJob": [events[1:4]]},
        unary={"CancelJob": [pb.CancelJobResponse(job=job)]},
    )
    client, _ = client_with(stub, token="s3cret")
    stream = client.sample("em_model", "a dog", request_id="req-1")
    for _ in range(3):
        next(iter(stream))
    stream.cancel()
    assert stub.methods() == ["Sample", "WatchJob", "CancelJob"]
    # Every call of the job reaches the replica its edit model hashes to.
    assert [_key(c) for c in stub.calls] == ["em_model"] * 3
    assert all(("authorization", "Bearer s3cret") in c[3] for c in stub.calls)


def test_edit_is_keyed_by_request_id_and_reads_by_what_they_name() -> None:
    model = pb.EditModel(edit_model_id="em_x")
    stub = FakeStub(
        {"Edit": [[unavailable()], edit_job_events()], "WatchJob": [[]]},
        unary={
            "GetEditModel": [pb.GetEditModelResponse(edit_model=model)],
            "DeleteEditModel": [pb.DeleteEditModelResponse()],
            "ListEditModels": [pb.ListEditModelsResponse()],
            "GetJob": [pb.GetJobResponse(job=pb.Job(job_id="j"))] * 2,
        },
    )
    client, _ = client_with(stub)
    client.edit(b"img", "a dog", request_id="req-7").result()
    client.get_edit_model("em_x")
    client.delete_edit_model("em_x")
    list(client.list_edit_models())
    client.get_job("j")
    client.get_job("j", affinity="em_x")
    client.watch_job(request_id="req-7").result()
    assert [(c[0], _key(c)) for c in stub.calls] == [
        ("Edit", "req-7"),
        ("Edit", "req-7~1"),  # refused: the retry tries another point on the ring
        ("GetEditModel", "em_x"),
        ("DeleteEditModel", "em_x"),
        ("ListEditModels", None),  # no key: a random replica
        ("GetJob", None),
        ("GetJob", "em_x"),
        ("WatchJob", "req-7"),
    ]


def test_affinity_channel_uses_ring_hash_on_the_header_and_enables_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    from forgedit_client.channel import RING_HASH_HEADER_ENV, channel_options

    monkeypatch.delenv(RING_HASH_HEADER_ENV, raising=False)
    options = dict(channel_options(load_balancing="affinity"))
    config = json.loads(str(options["grpc.service_config"]))
    assert config == {
        "loadBalancingConfig": [
            {"ring_hash_experimental": {"requestHashHeader": "forgedit-affinity"}}
        ]
    }
    assert "grpc.lb_policy_name" not in options
    # gRPC C-core ignores requestHashHeader without it (and then no call can be placed).
    import os

    assert os.environ[RING_HASH_HEADER_ENV] == "true"
    assert dict(channel_options(load_balancing="round_robin"))["grpc.lb_policy_name"] == (
        "round_robin"
    )


def test_affinity_is_refused_when_grpc_was_told_not_to_read_the_header(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from forgedit_client.channel import RING_HASH_HEADER_ENV, channel_options

    monkeypatch.setenv(RING_HASH_HEADER_ENV, "false")
    with pytest.raises(ValueError, match=RING_HASH_HEADER_ENV):
        channel_options(load_balancing="affinity")
    with pytest.raises(ValueError, match="load_balancing must be one of"):
        channel_options(load_balancing="ring_hash")


# ------------------------------------------------------------------------------ asyncio


class AsyncFakeCall(FakeCall):
    def __aiter__(self) -> Any:
        async def gen() -> Any:
            for item in self.script:
                await asyncio.sleep(0)
                if isinstance(item, BaseException):
                    raise item
                yield self.wrap(event=item)

        return gen()


class AsyncFakeStub(FakeStub):
    def _stream(self, method: str, wrap: type, request: Any, timeout: Any, metadata: Any) -> Any:
        self.calls.append((method, request, timeout, metadata))
        call = AsyncFakeCall(self.streams[method].pop(0), wrap)
        self.opened.append(call)
        return call

    def _unary(self, method: str, request: Any, timeout: Any, metadata: Any) -> Any:
        sync = super()._unary

        async def call() -> Any:
            return sync(method, request, timeout, metadata)

        return call()


def test_async_client_reattaches_and_collects_the_same_result() -> None:
    events = edit_job_events()
    stub = AsyncFakeStub(
        {"Edit": [[unavailable()], [*events[:5], unavailable()]], "WatchJob": [events[3:]]}
    )

    async def run() -> Any:
        client = AsyncForgeditClient(
            "fake:1", stub=stub, retry=RetryPolicy(initial_backoff=0.0, max_backoff=0.0)
        )
        stream = client.edit(b"img", "a dog", request_id="req-a")
        seen = [e async for e in stream]
        return seen, await stream.result()

    seen, result = asyncio.run(run())
    assert [e.sequence for e in seen] == list(range(1, 10))
    assert stub.methods() == ["Edit", "Edit", "WatchJob"]
    assert stub.calls[2][1].after_sequence == 5
    assert isinstance(seen[4], Registered) and result.edit_model_id == "em-1"
    assert [i.index for i in result.images] == [0, 1]


def test_async_unary_and_pagination() -> None:
    stub = AsyncFakeStub(
        unary={
            "GetJob": [
                unavailable(),
                pb.GetJobResponse(
                    job=pb.Job(job_id="j", state=pb.JOB_STATE_RUNNING, kind=pb.JOB_KIND_EDIT)
                ),
            ],
            "ListEditModels": [
                pb.ListEditModelsResponse(edit_models=[pb.EditModel(edit_model_id="x")])
            ],
        }
    )

    async def run() -> Any:
        client = AsyncForgeditClient(
            "fake:1", stub=stub, retry=RetryPolicy(initial_backoff=0.0, max_backoff=0.0)
        )
        job = await client.get_job("j")
        models = [m async for m in client.list_edit_models()]
        return job, models

    job, models = asyncio.run(run())
    assert (job.state, job.kind, job.finished) == ("running", "edit", False)
    assert [m.edit_model_id for m in models] == ["x"]


# ---------------------------------------------------------------------- transport settings


def test_channel_options_match_the_servers_transport_settings() -> None:
    transport = pytest.importorskip("server.transport")
    from forgedit_client.channel import channel_options

    ours: dict[str, Any] = dict(channel_options())
    theirs = dict(transport.client_options())
    for key in (
        "grpc.max_receive_message_length",
        "grpc.max_send_message_length",
        "grpc.keepalive_time_ms",
        "grpc.keepalive_timeout_ms",
        "grpc.keepalive_permit_without_calls",
    ):
        assert ours[key] == theirs[key], key
    # Pinging faster than the server accepts would get the connection closed (too_many_pings).
    assert ours["grpc.keepalive_time_ms"] >= transport.MIN_CLIENT_PING_INTERVAL_MS
    assert ours["grpc.max_send_message_length"] >= 48 * 1024 * 1024  # a 4096² noise PNG


# ------------------------------------------------------------- result after cancel/close


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_result_after_cancel_or_close_raises_instead_of_an_empty_result(how: str) -> None:
    job = pb.Job(job_id="job-1", state=pb.JOB_STATE_CANCELLING)
    stub = FakeStub(
        {"Edit": [edit_job_events()]}, unary={"CancelJob": [pb.CancelJobResponse(job=job)]}
    )
    client, _ = client_with(stub)
    stream = client.edit(b"img", "a dog")
    assert isinstance(next(iter(stream)), Accepted)
    getattr(stream, how)()
    with pytest.raises(ForgeditRpcError) as raised:
        stream.result()
    assert raised.value.code == grpc.StatusCode.CANCELLED and raised.value.job_id == "job-1"


def test_result_after_a_finished_stream_is_closed_is_still_returned() -> None:
    stub = FakeStub({"Edit": [edit_job_events()]})
    client, _ = client_with(stub)
    stream = client.edit(b"img", "a dog")
    first = stream.result()
    stream.close()
    assert first.completed and stream.result().edit_model_id == "em-1"


@pytest.mark.parametrize("how", ["cancel", "aclose"])
def test_async_result_after_cancel_or_close_raises(how: str) -> None:
    job = pb.Job(job_id="job-1", state=pb.JOB_STATE_CANCELLING)
    stub = AsyncFakeStub(
        {"Edit": [edit_job_events()]}, unary={"CancelJob": [pb.CancelJobResponse(job=job)]}
    )

    async def run() -> ForgeditRpcError:
        client = AsyncForgeditClient("fake:1", stub=stub)
        stream = client.edit(b"img", "a dog")
        assert isinstance(await stream.__anext__(), Accepted)
        await getattr(stream, how)()
        with pytest.raises(ForgeditRpcError) as raised:
            await stream.result()
        return raised.value

    error = asyncio.run(run())
    assert error.code == grpc.StatusCode.CANCELLED and error.job_id == "job-1"


# ------------------------------------------------------------------- previews and formats


def test_previews_and_encoded_images_become_typed_events() -> None:
    preview = event_from_proto(
        event(
            2,
            "job-1",
            preview=pb.PreviewEvent(
                kind=pb.PREVIEW_KIND_X0_ESTIMATE,
                index=3,
                data=b"RIFF-webp",
                format=pb.IMAGE_FORMAT_WEBP,
                width=8,
                height=8,
                step=5,
                steps=50,
            ),
        )
    )
    assert isinstance(preview, Preview) and not isinstance(preview, ImageReady)
    assert (preview.kind, preview.index, preview.step, preview.steps) == ("x0", 3, 5, 50)
    assert preview.format == "webp" and preview.suffix == ".webp"
    # An image from a server older than OutputOptions: PNG in `png`, no format.
    old = event_from_proto(event(3, "job-1", image=pb.ImageEvent(index=0, png=b"\x89PNG")))
    assert isinstance(old, ImageReady) and old.format == "png" and old.png == old.data
    jpeg = event_from_proto(
        event(4, "job-1", image=pb.ImageEvent(index=1, data=b"\xff\xd8", format=3))
    )
    assert isinstance(jpeg, ImageReady) and jpeg.data == b"\xff\xd8" and jpeg.suffix == ".jpg"
    with pytest.raises(ValueError, match="not png"):
        _ = jpeg.png


def test_output_and_preview_options_build_their_messages() -> None:
    options = split_options(
        {"image_format": "WebP", "image_quality": 70, "x0_every": 5, "gammas": [0.6]}
    )
    assert options.output == OutputOptions("WebP", 70) and options.preview.x0_every == 5
    request = edit_request(
        b"img",
        "a dog",
        options=options,
        source_prompt=None,
        base_model=None,
        request_id="r-1",
        detach=False,
    )
    assert request.output.format == pb.IMAGE_FORMAT_WEBP and request.output.quality == 70
    assert request.preview.x0_every == 5 and not request.preview.HasField("training_free")
    off = split_options({"training_free_preview": False}).preview.to_proto()
    assert off.HasField("training_free") and not off.training_free
    for bad, match in (
        ({"image_format": "gif"}, "accepted: png, webp, jpeg"),
        ({"image_quality": -1}, "must not be negative"),
        ({"training_free_preview": "no"}, "True or False"),
        ({"x0_every": 1.5}, "must be an integer"),
    ):
        with pytest.raises(InvalidOptionError, match=match):
            o = split_options(bad)
            o.output.to_proto()
            o.preview.to_proto()
    with pytest.raises(InvalidOptionError, match="image_format"):
        split_options({"format": "png"})  # unknown; the accepted names are listed
