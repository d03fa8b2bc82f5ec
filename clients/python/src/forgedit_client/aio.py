"""``AsyncForgeditClient``: the asyncio SDK, same methods and defaults as ``ForgeditClient``.

    async with AsyncForgeditClient("localhost:50051") as client:
        stream = client.edit("cat.jpg", "a photo of a dog", gammas=[0.6])
        async for event in stream:
            ...
        result = await stream.result()

Streams are ``AsyncEventStream`` (``async for``, ``await result()``, ``await cancel()``);
unary methods are coroutines; ``list_edit_models`` is an async iterator. Create the client
inside the running event loop (grpc.aio channels bind to it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
import grpc.aio

from forgedit_client._proto import forgedit_pb2 as pb
from forgedit_client._proto import forgedit_pb2_grpc as pb_grpc
from forgedit_client.channel import TlsConfig, aio_channel
from forgedit_client.client import _UNSET, DEFAULT_TARGET, Timeouts, _ClientConfig
from forgedit_client.errors import ForgeditRpcError
from forgedit_client.events import EditModelInfo, JobInfo, edit_model_from_proto, job_from_proto
from forgedit_client.options import (
    ImageInput,
    OutputOptions,
    PreviewOptions,
    SweepOptions,
    TrainingOptions,
)
from forgedit_client.retry import NO_RETRY, RetryPolicy
from forgedit_client.stream import AsyncEventStream, NextCall, ResumeTracker, moved_key


class AsyncForgeditClient(_ClientConfig):
    """Asyncio client; arguments as ``ForgeditClient``."""

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
    ) -> None:
        super().__init__(
            target,
            token=token,
            tls=tls,
            retry=retry or RetryPolicy(),
            timeouts=timeouts or Timeouts(),
            load_balancing=load_balancing,
        )
        self._channel: grpc.aio.Channel | None = None
        if stub is None:
            self._channel = aio_channel(
                target, tls=self.tls, token=self.token, load_balancing=load_balancing
            )
            stub = pb_grpc.ForgeditServiceStub(self._channel)
        self._stub = stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> AsyncForgeditClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

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
    ) -> AsyncEventStream:
        """See ``ForgeditClient.edit``."""
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
    ) -> AsyncEventStream:
        """See ``ForgeditClient.sample``."""
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
    ) -> AsyncEventStream:
        """See ``ForgeditClient.watch_job``."""
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

        return AsyncEventStream(
            open_call,
            request_id=request_id or "",
            tracker=tracker,
            canceller=lambda job: self.cancel_job(job, affinity=tracker.key),
        )

    def _job_stream(
        self,
        start: Callable[[float | None, tuple[tuple[str, str], ...]], Any],
        request_id: str,
        timeout: float | None,
        *,
        key: str,
    ) -> AsyncEventStream:
        """See ``ForgeditClient._job_stream``."""
        tracker = ResumeTracker(
            self.retry, deadline=self.deadline_of(timeout), key=key, resubmit=True
        )

        def open_call(plan: NextCall) -> Any:
            md = self.metadata_for(plan.key)
            if plan.kind == "start":
                return start(plan.timeout, md)
            req = pb.WatchJobRequest(request_id=request_id, after_sequence=plan.after_sequence)
            return self._stub.WatchJob(req, timeout=plan.timeout, metadata=md)

        return AsyncEventStream(
            open_call,
            request_id=request_id,
            tracker=tracker,
            canceller=lambda job: self.cancel_job(job, affinity=tracker.key),
        )

    # ----------------------------------------------------------------------------- unary

    async def get_job(
        self, job_id: str, *, affinity: str | None = None, timeout: float | None = _UNSET
    ) -> JobInfo:
        req = pb.GetJobRequest(job_id=job_id)
        resp = await self._unary(self._stub.GetJob, req, timeout, key=affinity)
        return job_from_proto(resp.job)

    async def cancel_job(
        self, job_id: str, *, affinity: str | None = None, timeout: float | None = _UNSET
    ) -> JobInfo:
        req = pb.CancelJobRequest(job_id=job_id)
        resp = await self._unary(self._stub.CancelJob, req, timeout, key=affinity)
        return job_from_proto(resp.job)

    async def get_edit_model(
        self, edit_model_id: str, *, timeout: float | None = _UNSET
    ) -> EditModelInfo:
        req = pb.GetEditModelRequest(edit_model_id=edit_model_id)
        resp = await self._unary(self._stub.GetEditModel, req, timeout, key=edit_model_id)
        return edit_model_from_proto(resp.edit_model)

    async def delete_edit_model(
        self, edit_model_id: str, *, timeout: float | None = _UNSET
    ) -> None:
        req = pb.DeleteEditModelRequest(edit_model_id=edit_model_id)
        await self._unary(self._stub.DeleteEditModel, req, timeout, retry=False, key=edit_model_id)

    async def list_edit_models(
        self,
        *,
        base_model: str | None = None,
        image_sha256: str | None = None,
        page_size: int = 0,
        timeout: float | None = _UNSET,
    ) -> AsyncIterator[EditModelInfo]:
        token = ""
        while True:
            req = pb.ListEditModelsRequest(
                page_size=page_size,
                page_token=token,
                base_model=base_model or "",
                image_sha256=image_sha256 or "",
            )
            resp = await self._unary(self._stub.ListEditModels, req, timeout)
            for m in resp.edit_models:
                yield edit_model_from_proto(m)
            token = resp.next_page_token
            if not token:
                return

    async def _unary(
        self,
        method: Callable[..., Awaitable[Any]],
        request: Any,
        timeout: Any,
        *,
        retry: bool = True,
        key: str | None = None,
    ) -> Any:
        """See ``ForgeditClient._unary``."""
        policy = self.retry if retry else NO_RETRY
        timeout = self._timeout(timeout, self.timeouts.unary)
        deadline = self.deadline_of(timeout)
        attempt = 0
        while True:
            attempt += 1
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                md = self.metadata_for(moved_key(key, attempt - 1))
                return await method(request, timeout=remaining, metadata=md)
            except grpc.RpcError as exc:
                error = ForgeditRpcError.from_grpc(exc)
            if not policy.should_retry(error.code, attempt):
                raise error
            delay = policy.backoff(attempt, server_hint=error.retry_delay)
            if deadline is not None and time.monotonic() + delay >= deadline:
                raise error
            await asyncio.sleep(delay)
