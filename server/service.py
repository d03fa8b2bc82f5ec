"""The ``forgedit.v1.ForgeditService`` servicer: requests in, event streams out.

Each streaming call is a reader of its job's replay buffer (``server.jobs``): it yields the
job's events as they come, a heartbeat after every ``heartbeat_interval_s`` of silence, and
ends with the job's final status (OK after ``completed``, or the mapped error).

Contracts
- A request is decoded once (``server.wire``) and checked before the job exists
  (``server.plans``): a bad request never reaches the queue or the device.
- A deadline shorter than the job's estimate (its queue wait included) is refused up front with
  DEADLINE_EXCEEDED rather than failing after minutes of device time.
- Client disconnect: when the last submitting stream of a job goes away before the job ends and
  no request asked to ``detach``, the job is cancelled (it stops within one step). WatchJob
  streams never cancel.
- Every error goes through ``server.errors.to_rpc_status`` (one mapping, with details).
- Registry calls made here are bounded by the registry timeout and the call's own deadline
  (``server.registry_client``); a Sample of an edit model cached on this replica needs no MLflow.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from forgedit.errors import InvalidInputError
from registry.ids import validate_edit_model_id
from server import wire
from server._proto import forgedit_pb2 as pb
from server._proto import forgedit_pb2_grpc as pb_grpc
from server.auth import Authenticator, Principal
from server.errors import JobNotFoundError, to_rpc_status
from server.jobs import Job
from server.logs import job_context
from server.plans import Defaults, edit_plan, sample_plan
from server.registry_client import RegistryClient
from server.scheduler import Scheduler
from server.settings import ServerSettings
from server.validation import Limits, check_sampling_memory

if TYPE_CHECKING:
    from registry import EditModelInfo

log = logging.getLogger("server.service")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ForgeditService"].full_name
T = TypeVar("T")


# The wrappers serve every method alike, whatever its request message: ``request: Any``.


def _unary(method: Callable[..., T]) -> Callable[..., T]:
    """Map any exception of a unary method to its status (``abort_with_status``)."""

    @functools.wraps(method)
    def wrapper(self: ForgeditServicer, request: Any, context: grpc.ServicerContext) -> T:
        try:
            return method(self, request, context)
        except Exception as exc:
            if _already_aborted(context):
                raise
            context.abort_with_status(to_rpc_status(exc, context=method.__name__).grpc_status())
            raise  # unreachable: abort raises

    return wrapper


def _streaming(method: Callable[..., Iterator[T]]) -> Callable[..., Iterator[T]]:
    """As ``_unary`` for a server-streaming method (the error ends the stream)."""

    @functools.wraps(method)
    def wrapper(self: ForgeditServicer, request: Any, context: grpc.ServicerContext) -> Iterator[T]:
        try:
            yield from method(self, request, context)
        except Exception as exc:
            if _already_aborted(context):
                raise
            context.abort_with_status(to_rpc_status(exc, context=method.__name__).grpc_status())

    return wrapper


def _already_aborted(context: grpc.ServicerContext) -> bool:
    code = context.code()
    return code is not None and code != grpc.StatusCode.OK


class ForgeditServicer(pb_grpc.ForgeditServiceServicer):
    """The service. Holds no job state itself: that lives in the scheduler."""

    def __init__(
        self,
        settings: ServerSettings,
        scheduler: Scheduler,
        registry: RegistryClient,
        authenticator: Authenticator,
    ) -> None:
        self.settings = settings
        self.authenticator = authenticator
        self.scheduler = scheduler
        self.lifecycle = scheduler.lifecycle
        self.registry = registry
        self.limits = Limits.from_settings(settings)
        self.defaults = Defaults(
            settings.precision, settings.delta_format, settings.edit_model_ttl_s
        )
        self.replay = (settings.replay_max_events, settings.replay_max_bytes)  # per job
        self._owners_lock = threading.Lock()

    # -- jobs that stream -------------------------------------------------------------------

    @_streaming
    def Edit(
        self, request: pb.EditRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.EditResponse]:
        # 1. Decode the request, once.
        self.lifecycle.require_ready()
        principal = self._principal(context)
        call = wire.edit_call(request)
        digest = wire.payload_digest(pb.JOB_KIND_EDIT, request, principal.name)
        # 2. Check it: cheap, bounded checks first, the image decoded last.
        plan = edit_plan(call, self.limits, self.scheduler.catalog, self.defaults)
        # 3. Queue the job, or re-attach to the one its request id names.
        job = Job(
            pb.JOB_KIND_EDIT,
            plan,
            digest,
            *self.replay,
            principal=principal.name,
            client=self.authenticator.client_of(context),
        )
        job = self._submit(job, context)
        # 4. Stream its events until it ends.
        for event in self._follow(job, context, owner=True):
            yield pb.EditResponse(event=event)

    @_streaming
    def Sample(
        self, request: pb.SampleRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.SampleResponse]:
        # 1. Decode the request, once.
        self.lifecycle.require_ready()
        principal = self._principal(context)
        call = wire.sample_call(request)
        digest = wire.payload_digest(pb.JOB_KIND_SAMPLE, request, principal.name)
        # 2. Check it. The edit model must be known to this principal (its variant sets the
        # sweep's defaults and strategy names); a copy cached here answers without MLflow, so
        # sampling it survives a registry outage.
        shown: list[EditModelInfo] = []

        def training_mode_of(edit_model_id: str) -> str:
            shown.append(
                self.registry.describe_for_sampling(
                    edit_model_id, principal, remaining_s=context.time_remaining()
                )
            )
            return str(shown[0].training_mode or "joint")

        plan = sample_plan(call, self.limits, training_mode_of)
        # 3. Refuse, before queueing, what cannot run here: a resolution too large for the
        # device, an edit model of a base model this replica does not serve, or one trained
        # at a resolution it does not serve (``ServedModels.require_served``).
        info = shown[0]
        check_sampling_memory(int(info.height), int(info.width), self.limits)
        plan = plan.for_edit_model(self.scheduler.catalog, info)
        # 4. Queue the job, or re-attach to the one its request id names.
        job = Job(
            pb.JOB_KIND_SAMPLE,
            plan,
            digest,
            *self.replay,
            principal=principal.name,
            client=self.authenticator.client_of(context),
        )
        job = self._submit(job, context)
        # 5. Stream its events until it ends.
        for event in self._follow(job, context, owner=True):
            yield pb.SampleResponse(event=event)

    @_streaming
    def WatchJob(
        self, request: pb.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchJobResponse]:
        which = request.WhichOneof("job")
        if which is None:
            raise InvalidInputError("set job_id or request_id to name the job", field="job")
        principal = self._principal(context)
        if which == "request_id":
            job = self._job(principal, request_id=request.request_id)
        else:
            job = self._job(principal, job_id=request.job_id)
        for event in self._follow(job, context, owner=False, after=request.after_sequence):
            yield pb.WatchJobResponse(event=event)

    # -- jobs, unary ------------------------------------------------------------------------

    @_unary
    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.GetJobResponse:
        job = self._job(self._principal(context), job_id=request.job_id)
        return pb.GetJobResponse(job=job.to_proto())

    @_unary
    def CancelJob(
        self, request: pb.CancelJobRequest, context: grpc.ServicerContext
    ) -> pb.CancelJobResponse:
        self._job(self._principal(context), job_id=request.job_id)
        job = self.scheduler.cancel(request.job_id, "client cancelled")
        with job_context(job.job_id):
            log.info("cancel requested by a client")
        return pb.CancelJobResponse(job=job.to_proto())

    # -- edit models ------------------------------------------------------------------------

    @_unary
    def GetEditModel(
        self, request: pb.GetEditModelRequest, context: grpc.ServicerContext
    ) -> pb.GetEditModelResponse:
        edit_model_id = validate_edit_model_id(request.edit_model_id)
        return pb.GetEditModelResponse(
            edit_model=wire.edit_model_to_proto(
                self.registry.show(
                    edit_model_id, self._principal(context), remaining_s=context.time_remaining()
                )
            )
        )

    @_unary
    def ListEditModels(
        self, request: pb.ListEditModelsRequest, context: grpc.ServicerContext
    ) -> pb.ListEditModelsResponse:
        page_size = min(request.page_size or 50, 1000)
        page = self.registry.list(
            base_model=request.base_model or None,
            image_sha256=request.image_sha256 or None,
            page_size=page_size,
            page_token=request.page_token or None,
            principal=self._principal(context),
            labels=dict(request.labels) or None,
            remaining_s=context.time_remaining(),
        )
        return pb.ListEditModelsResponse(
            edit_models=[wire.edit_model_to_proto(info) for info in page.items],
            next_page_token=page.next_page_token or "",
        )

    @_unary
    def DeleteEditModel(
        self, request: pb.DeleteEditModelRequest, context: grpc.ServicerContext
    ) -> pb.DeleteEditModelResponse:
        edit_model_id = validate_edit_model_id(request.edit_model_id)
        self.registry.delete(
            edit_model_id, self._principal(context), remaining_s=context.time_remaining()
        )
        log.info("edit model %s deleted", edit_model_id)
        return pb.DeleteEditModelResponse()

    # -- helpers ----------------------------------------------------------------------------

    def _principal(self, context: grpc.ServicerContext) -> Principal:
        return self.authenticator.principal_of(context)

    def _job(
        self, principal: Principal, *, job_id: str | None = None, request_id: str | None = None
    ) -> Job:
        """The job named by ``job_id`` or ``request_id``, if ``principal`` may see it. Otherwise
        NOT_FOUND worded exactly as for a job that does not exist, naming only what the caller
        asked by: another principal's job, or the job id behind its request id, is never
        revealed. Every job lookup of the service comes through here."""
        if job_id is not None:
            not_found = JobNotFoundError.by_id(job_id)
        else:
            assert request_id is not None
            not_found = JobNotFoundError.by_request_id(request_id)
        try:
            if job_id is not None:
                job = self.scheduler.get(job_id)
            else:
                job = self.scheduler.get_by_request(request_id or "")
        except JobNotFoundError:
            raise not_found from None
        if not principal.may_see(job.principal):
            raise not_found
        return job

    def _submit(self, job: Job, context: grpc.ServicerContext) -> Job:
        """Queue the job after the deadline check, or re-attach to the job its request id
        already names (the scheduler's idempotency rule; no deadline check then: the job runs
        already). Returns the job to follow."""
        submitted, is_new = self.scheduler.submit(job, remaining_s=context.time_remaining())
        with job_context(submitted.job_id):
            if is_new:
                log.info(
                    "%s job accepted at queue position %d (estimate %.1f s)",
                    submitted.method,
                    submitted.queue_position,
                    submitted.estimate,
                )
            else:
                if job.detach:
                    submitted.detach = True
                log.info("request %r re-attached", job.request_id)
        return submitted

    def _follow(
        self, job: Job, context: grpc.ServicerContext, *, owner: bool, after: int = 0
    ) -> Iterator[pb.Event]:
        """Yield the job's events after ``after``, heartbeats in silences, then end with its
        status. An owner stream's disconnect cancels the job unless it is detached."""
        if owner:
            with self._owners_lock:
                job.owners += 1
            context.add_callback(lambda: self._owner_left(job))
        cursor = after
        interval = self.settings.heartbeat_interval_s
        while True:
            events, finished = job.read(cursor, timeout=interval)
            for event in events:
                yield event
                cursor = event.sequence
            if finished:
                break
            if not context.is_active():
                return  # the client is gone; the callback decides about the job
            if not events:
                yield job.heartbeat()
        if job.error is not None:
            context.abort_with_status(job.error.grpc_status())

    def _owner_left(self, job: Job) -> None:
        with self._owners_lock:
            job.owners -= 1
            last = job.owners == 0
        if last and not job.detach and not job.state.finished:
            with job_context(job.job_id):
                log.info("the client disconnected; cancelling the job")
            with contextlib.suppress(LookupError):
                self.scheduler.cancel(job.job_id, "client disconnected")
