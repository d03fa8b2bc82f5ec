"""``ForgeditClient``: the synchronous SDK.

    from forgedit_client import ForgeditClient

    with ForgeditClient("localhost:50051", token=...) as client:
        stream = client.edit("cat.jpg", "a photo of a dog", gammas=[0.6], seeds=[1])
        for event in stream:          # typed events: Accepted, TrainingProgress, ImageReady …
            ...
        result = stream.result()      # or directly: client.edit(...).result()
        again = client.sample(result.edit_model_id, "a photo of a fox").result()

Default deadlines (override per call with ``timeout=`` or per client with ``Timeouts``):
Edit 30 min, Sample 5 min, WatchJob 30 min, unary calls 10 s. The deadline covers the whole
logical call, retries and re-attaches included; a server refuses up front a job whose estimate
exceeds it (DEADLINE_EXCEEDED). ``timeout=None`` means no deadline.

Retries (``RetryPolicy``, default 5 attempts, 0.5 s → 10 s full-jitter backoff): UNAVAILABLE
before the first event is retried with the same ``request_id``; after events, a dropped stream
is re-attached with WatchJob (see ``forgedit_client.stream``). Unary reads (get, list) and
CancelJob are retried on UNAVAILABLE; DeleteEditModel is not (a second delete could report
NOT_FOUND for a delete that succeeded).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from forgedit_client._proto import forgedit_pb2 as pb
from forgedit_client._proto import forgedit_pb2_grpc as pb_grpc
from forgedit_client.channel import TlsConfig, affinity_metadata, call_metadata, sync_channel
from forgedit_client.errors import ForgeditRpcError, InvalidOptionError
from forgedit_client.events import (
    EditModelInfo,
    JobInfo,
    edit_model_from_proto,
    job_from_proto,
)
from forgedit_client.options import (
    ImageInput,
    OutputOptions,
    PreviewOptions,
    SweepOptions,
    TrainingOptions,
    check_request_id,
    edit_request,
    new_request_id,
    sample_request,
    split_options,
)
from forgedit_client.retry import NO_RETRY, RetryPolicy
from forgedit_client.stream import EventStream, NextCall, ResumeTracker, moved_key

DEFAULT_TARGET = "localhost:50051"
T = TypeVar("T")


@dataclass(frozen=True)
class Timeouts:
    """Default deadlines in seconds per kind of call (None = no deadline)."""

    edit: float | None = 30 * 60
    sample: float | None = 5 * 60
    watch: float | None = 30 * 60
    unary: float | None = 10


_UNSET: Any = object()


class _ClientConfig:
    """What the sync and async clients share: connection settings and request building."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None,
        tls: bool | TlsConfig,
        retry: RetryPolicy,
        timeouts: Timeouts,
        load_balancing: str | None,
    ) -> None:
        if not target:
            raise InvalidOptionError("target must be host:port, e.g. localhost:50051")
        self.target = target
        self.token = token or None
        self.tls: TlsConfig | None = TlsConfig() if tls is True else (tls or None)
        self.retry = retry
        self.timeouts = timeouts
        self.load_balancing = load_balancing
        self.metadata = tuple(call_metadata(tls=self.tls, token=self.token))

    def metadata_for(self, affinity: str | None) -> tuple[tuple[str, str], ...]:
        """Per-call metadata: the token header (plaintext) and the call's affinity key, which
        the ``affinity`` policy hashes to pick a replica (``forgedit_client.channel``)."""
        return self.metadata + affinity_metadata(affinity)

    @staticmethod
    def _timeout(given: Any, default: float | None) -> float | None:
        return default if given is _UNSET else given

    @staticmethod
    def deadline_of(timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + timeout

    def build_edit(
        self,
        image: ImageInput,
        prompts: str | Iterable[str],
        *,
        training: TrainingOptions | None,
        sweep: SweepOptions | None,
        output: OutputOptions | None,
        preview: PreviewOptions | None,
        source_prompt: str | None,
        base_model: str | None,
        request_id: str | None,
        detach: bool,
        options: dict[str, Any],
    ) -> Any:
        return edit_request(
            image,
            prompts,
            options=split_options(options, training, sweep, output, preview),
            source_prompt=source_prompt,
            base_model=base_model,
            request_id=request_id or new_request_id(),
            detach=detach,
        )

    def build_sample(
        self,
        edit_model_id: str,
        prompts: str | Iterable[str],
        *,
        sweep: SweepOptions | None,
        output: OutputOptions | None,
        preview: PreviewOptions | None,
        request_id: str | None,
        detach: bool,
        options: dict[str, Any],
    ) -> Any:
        return sample_request(
            edit_model_id,
            prompts,
            options=split_options(options, None, sweep, output, preview, allow_training=False),
            request_id=request_id or new_request_id(),
            detach=detach,
        )

    @staticmethod
    def watch_request(job_id: str | None, request_id: str | None, after_sequence: int) -> Any:
        if bool(job_id) == bool(request_id):
            raise InvalidOptionError("give exactly one of job_id or request_id")
        if job_id:
            return pb.WatchJobRequest(job_id=job_id, after_sequence=after_sequence)
        return pb.WatchJobRequest(
            request_id=check_request_id(request_id or ""), after_sequence=after_sequence
        )


class ForgeditClient(_ClientConfig):
    """Synchronous client of one Forgedit service (thread-safe; share one per process).

    ``target``: ``host:port`` or any gRPC target (``dns:///svc:50051``,
    ``ipv4:10.0.0.1:50051,10.0.0.2:50051``). ``token``: bearer token. ``tls``: False
    (plaintext, loopback/dev), True (system roots) or a ``TlsConfig`` (own CA, mutual TLS).
    ``load_balancing``: ``"round_robin"`` or ``"affinity"`` (Sample lands where its edit model
    is hot; see ``forgedit_client.channel``) over several replicas; default ``pick_first``.
    ``stub``: a ready ``ForgeditServiceStub``-like object (tests).
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: bool | TlsConfig = False,
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        load_balancing: str | None = None,
        stub: Any = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(
            target,
            token=token,
            tls=tls,
            retry=retry or RetryPolicy(),
            timeouts=timeouts or Timeouts(),
            load_balancing=load_balancing,
        )
        self._sleep = sleep
        self._channel: grpc.Channel | None = None
        if stub is None:
            self._channel = sync_channel(
                target, tls=self.tls, token=self.token, load_balancing=load_balancing
            )
            stub = pb_grpc.ForgeditServiceStub(self._channel)
        self._stub = stub

    # ------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the channel; open streams end with CANCELLED."""
        if self._channel is not None:
            self._channel.close()

    def __enter__(self) -> ForgeditClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------- streams

    def edit(
        self,
        image: ImageInput,
        prompts: str | Iterable[str],
        *,
        training: TrainingOptions | None = None,
        sweep: SweepOptions | None = None,
        output: OutputOptions | None = None,
        preview: PreviewOptions | None = None,
        source_prompt: str | None = None,
        base_model: str | None = None,
        request_id: str | None = None,
        detach: bool = False,
        timeout: float | None = _UNSET,
        **options: Any,
    ) -> EventStream:
        """Fine-tune an edit model on ``image`` and sample edits toward ``prompts``.

        ``image``: bytes, a path, a binary file or a PIL image (PNG/JPEG/WebP on the wire).
        ``options``: any field of ``TrainingOptions`` (``mode``, ``train_seed``, ``width``,
        ``height``, ``precision``, ``delta_format``, ``updates``, ``batch_size``, ``vae_seed``) or
        ``SweepOptions`` (``interpolation``, ``gammas``, ``alphas``, ``forget``,
        ``forget_degree``, ``seeds``, ``seed_count``, ``steps``, ``guidance``), and
        ``image_format``/``image_quality`` (``OutputOptions``: png, webp, jpeg) and
        ``training_free_preview``/``x0_every`` (``PreviewOptions``: the stream's ``Preview``
        events; the training-free one is on unless turned off).
        ``request_id``: idempotency key (generated when omitted). ``detach``: keep the job
        running if this client disconnects. Returns an ``EventStream``; nothing is sent
        until it is iterated. Raises ``InvalidOptionError`` at once for unknown options;
        the stream raises ``ForgeditRpcError`` for failures reported by the server.
        """
        request = self.build_edit(
            image,
            prompts,
            training=training,
            sweep=sweep,
            output=output,
            preview=preview,
            source_prompt=source_prompt,
            base_model=base_model,
            request_id=request_id,
            detach=detach,
            options=options,
        )
        return self._job_stream(
            lambda t, md: self._stub.Edit(request, timeout=t, metadata=md),
            request.request_id,
            self._timeout(timeout, self.timeouts.edit),
            key=request.request_id,
        )

    def sample(
        self,
        edit_model_id: str,
        prompts: str | Iterable[str],
        *,
        sweep: SweepOptions | None = None,
        output: OutputOptions | None = None,
        preview: PreviewOptions | None = None,
        request_id: str | None = None,
        detach: bool = False,
        timeout: float | None = _UNSET,
        **options: Any,
    ) -> EventStream:
        """Sample edits from a stored edit model (no training). ``options``: fields of
        ``SweepOptions``, ``image_format``/``image_quality`` and ``x0_every`` (a Sample has no
        training-free preview). Otherwise as ``edit``."""
        request = self.build_sample(
            edit_model_id,
            prompts,
            sweep=sweep,
            output=output,
            preview=preview,
            request_id=request_id,
            detach=detach,
            options=options,
        )
        # Routed by edit model: with load_balancing="affinity" its replica has it hot.
        return self._job_stream(
            lambda t, md: self._stub.Sample(request, timeout=t, metadata=md),
            request.request_id,
            self._timeout(timeout, self.timeouts.sample),
            key=request.edit_model_id,
        )

    def watch_job(
        self,
        job_id: str | None = None,
        *,
        request_id: str | None = None,
        after_sequence: int = 0,
        affinity: str | None = None,
        timeout: float | None = _UNSET,
    ) -> EventStream:
        """Re-attach to a running or recently finished job (by ``job_id`` or the
        ``request_id`` it was submitted with): replays buffered events after
        ``after_sequence``, then follows it live. Watching never cancels the job.
        ``affinity``: the key the job was submitted under, to reach its replica with
        ``load_balancing="affinity"`` (default: ``request_id``, an Edit's key; a Sample's is
        its edit-model ID)."""
        first = self.watch_request(job_id, request_id, after_sequence)
        tracker = ResumeTracker(
            self.retry,
            deadline=self.deadline_of(self._timeout(timeout, self.timeouts.watch)),
            key=affinity or request_id,
        )
        tracker.last_sequence = after_sequence

        def open_call(plan: NextCall) -> Any:
            req = pb.WatchJobRequest()
            req.CopyFrom(first)
            req.after_sequence = max(plan.after_sequence, after_sequence)
            md = self.metadata_for(plan.key)
            return self._stub.WatchJob(req, timeout=plan.timeout, metadata=md)

        return EventStream(
            open_call,
            request_id=request_id or "",
            tracker=tracker,
            canceller=lambda job: self.cancel_job(job, affinity=tracker.key),
            sleep=self._sleep,
        )

    def _job_stream(
        self,
        start: Callable[[float | None, tuple[tuple[str, str], ...]], Any],
        request_id: str,
        timeout: float | None,
        *,
        key: str,
    ) -> EventStream:
        """The stream of one Edit or Sample (``forgedit_client.stream``): every call carries
        the tracker's affinity key, so a re-attach and a cancel reach the replica running
        the job, and a refused start tries another."""
        tracker = ResumeTracker(
            self.retry, deadline=self.deadline_of(timeout), key=key, resubmit=True
        )

        def open_call(plan: NextCall) -> Any:
            md = self.metadata_for(plan.key)
            if plan.kind == "start":
                return start(plan.timeout, md)
            req = pb.WatchJobRequest(request_id=request_id, after_sequence=plan.after_sequence)
            return self._stub.WatchJob(req, timeout=plan.timeout, metadata=md)

        return EventStream(
            open_call,
            request_id=request_id,
            tracker=tracker,
            canceller=lambda job: self.cancel_job(job, affinity=tracker.key),
            sleep=self._sleep,
        )

    # ----------------------------------------------------------------------------- unary

    def get_job(
        self, job_id: str, *, affinity: str | None = None, timeout: float | None = _UNSET
    ) -> JobInfo:
        """The job's state. NOT_FOUND when unknown or expired (or, behind a balancer, when
        the call reached another replica: pass the job's ``affinity`` key, see
        ``watch_job``)."""
        req = pb.GetJobRequest(job_id=job_id)
        return job_from_proto(self._unary(self._stub.GetJob, req, timeout, key=affinity).job)

    def cancel_job(
        self, job_id: str, *, affinity: str | None = None, timeout: float | None = _UNSET
    ) -> JobInfo:
        """Ask the job to stop (it stops within one step); returns its state (CANCELLING
        until stopped). Cancelling a finished job is a no-op. ``affinity`` as ``get_job``."""
        req = pb.CancelJobRequest(job_id=job_id)
        return job_from_proto(self._unary(self._stub.CancelJob, req, timeout, key=affinity).job)

    def get_edit_model(
        self, edit_model_id: str, *, timeout: float | None = _UNSET
    ) -> EditModelInfo:
        """Metadata of a stored edit model. NOT_FOUND when unknown."""
        req = pb.GetEditModelRequest(edit_model_id=edit_model_id)
        resp = self._unary(self._stub.GetEditModel, req, timeout, key=edit_model_id)
        return edit_model_from_proto(resp.edit_model)

    def delete_edit_model(self, edit_model_id: str, *, timeout: float | None = _UNSET) -> None:
        """Delete a stored edit model. NOT_FOUND when unknown. Not retried."""
        req = pb.DeleteEditModelRequest(edit_model_id=edit_model_id)
        self._unary(self._stub.DeleteEditModel, req, timeout, retry=False, key=edit_model_id)

    def list_edit_models(
        self,
        *,
        base_model: str | None = None,
        image_sha256: str | None = None,
        page_size: int = 0,
        timeout: float | None = _UNSET,
    ) -> Iterator[EditModelInfo]:
        """Stored edit models, newest first, fetching pages lazily (``timeout`` per page)."""
        token = ""
        while True:
            req = pb.ListEditModelsRequest(
                page_size=page_size,
                page_token=token,
                base_model=base_model or "",
                image_sha256=image_sha256 or "",
            )
            resp = self._unary(self._stub.ListEditModels, req, timeout)
            for m in resp.edit_models:
                yield edit_model_from_proto(m)
            token = resp.next_page_token
            if not token:
                return

    def _unary(
        self,
        method: Callable[..., T],
        request: Any,
        timeout: Any,
        *,
        retry: bool = True,
        key: str | None = None,
    ) -> T:
        """One unary call with the retry policy. ``key``: the call's affinity key; a retry
        after UNAVAILABLE moves it (``moved_key``), so it does not wait on the same refusing
        replica."""
        policy = self.retry if retry else NO_RETRY
        timeout = self._timeout(timeout, self.timeouts.unary)
        deadline = self.deadline_of(timeout)
        attempt = 0
        while True:
            attempt += 1
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                md = self.metadata_for(moved_key(key, attempt - 1))
                return method(request, timeout=remaining, metadata=md)
            except grpc.RpcError as exc:
                error = ForgeditRpcError.from_grpc(exc)
            if not policy.should_retry(error.code, attempt):
                raise error
            delay = policy.backoff(attempt, server_hint=error.retry_delay)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise error
            self._sleep(delay)
