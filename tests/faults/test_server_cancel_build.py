"""Cancel and shutdown while the UNet is being built for a new resolution, against a real server
(real tiny engine, real embedded registry), one server for the scenario (issue 21.8).

Exporting or building a compiled UNet runs in native code that no cancel token can interrupt
(22 s at 1024² on the A100 path), and a cancel used to wait for it. A replica builds its
declared resolutions at warm-up (``FORGEDIT_RESOLUTIONS``), so a build inside a job remains
only where a graph is gone (a job-scoped fallback discards the graph it failed on) and the
next job at that size builds it again. Here the server declares 64x64 and 128x128, and the
backend's ``prepare`` for 128x128 is held at a gate once warm-up is over (the injected fault:
a build that takes as long as the test wants), and

- a cancel ends the job within the promised bound while the build is still held; the next
  job waits for the build in the queue (where a cancel ends it at once), not on the device;
- the build then finishes and is used: the device is clean, the same edit model samples;
- a drain (what SIGTERM runs) with a build held ends its job at once too; the build runs on a
  non-daemon thread, so the process waits for it at exit instead of aborting
  ("terminate called without an active exception");
- afterwards the threads and file descriptors are back where they were.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
from support import server as support

from server._proto import forgedit_pb2 as pb
from server.main import default_engine_factory
from server.settings import ServerSettings

AT_128 = {"updates": 2, "batch_size": 1, "height": 128, "width": 128}
DECLARED = [(64, 64), (128, 128)]  # width x height: the native size and the one held
PROMISED_S = 10.0  # one denoising step of this tiny model is milliseconds; generous on CI


class HeldBuild:
    """A UNet backend whose ``prepare`` (export or build for a shape) waits at ``gate`` while
    it is closed, except for the warm-up shape; everything else is the real backend's."""

    def __init__(self, backend: Any, warm_latents: int) -> None:
        self._backend = backend
        self._warm = warm_latents
        self.gate = threading.Event()
        self.gate.set()  # open for warm-up, which builds every declared size
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def prepare(self, shape: Any) -> None:
        if shape.latent_height != self._warm:
            self.entered.set()
            self.gate.wait(120)
        self._backend.prepare(shape)


def build_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("forgedit-unet-build")]


def test_cancel_and_shutdown_do_not_wait_for_a_build(tmp_path: Path, tiny_model_dir: Path) -> None:
    before = support.Resources.now()
    settings = ServerSettings(
        base_models={"tiny": tiny_model_dir / "stable-diffusion"},
        blip_dir=tiny_model_dir / "blip",
        unet_backend="torch",
        resolutions=DECLARED,
    )
    real = default_engine_factory(settings, dict(settings.base_models))
    held: list[HeldBuild] = []

    def factory(name: str, device: str) -> Any:
        engine = real(name, device)
        engine.backends.current = HeldBuild(engine.backends.current, engine.native_height // 8)
        held.append(engine.backends.current)
        return engine

    with support.running_server(
        tmp_path, tiny_model_dir, engine_factory=factory, resolutions=DECLARED
    ) as h:
        build = held[0]
        try:
            # An edit model at 128x128, a declared size: from now on each of its jobs meets a
            # build of the 128x128 graph, held at the gate (as after a discarded graph).
            made = support.stream(
                h.stub.Edit, support.edit_request(support.sample_photo(), training=AT_128)
            )
            assert made.code == grpc.StatusCode.OK, made.details
            edit_model_id = made.of("completed")[0].edit_model_id
            sample = pb.SampleRequest(
                edit_model_id=edit_model_id, target_prompts=["A dog."], sweep=support.QUICK_SWEEP
            )

            # 1. Cancel while the build is held: the job ends within the bound, the build not.
            build.gate.clear()
            build.entered.clear()
            first = h.stub.Sample(sample, metadata=support.AUTH, timeout=120)
            job_id = next(first).event.job_id
            assert build.entered.wait(60), "the job never reached the build"
            assert all(not t.daemon for t in build_threads()), "a build on a daemon thread"
            cancelled_at = time.monotonic()
            support.unary(h.stub.CancelJob, pb.CancelJobRequest(job_id=job_id))
            job = h.scheduler.get(job_id)
            assert job.wait_finished(PROMISED_S), "the cancel waited for the build"
            assert time.monotonic() - cancelled_at < PROMISED_S
            assert job.state.name == "CANCELLED" and not build.gate.is_set()
            # The next job waits for the build in the queue, and a cancel ends it at once.
            second = support.stream(h.stub.Sample, sample, timeout=2)
            assert second.code == grpc.StatusCode.DEADLINE_EXCEEDED, second.details
            waiting = h.scheduler.get(second.events[0].job_id)
            assert waiting.wait_finished(PROMISED_S) and waiting.state.name == "CANCELLED"
            assert waiting.started_at is None, "the next job ran beside the build"

            # 2. The build finishes and is used; the device is clean.
            build.gate.set()
            again = support.stream(h.stub.Sample, sample)
            assert again.code == grpc.StatusCode.OK, again.details
            support.assert_nothing_left_behind(h)

            # 3. Shutdown with a build held: the job ends at once, the build finishes after.
            build.gate.clear()
            build.entered.clear()
            last = h.stub.Sample(sample, metadata=support.AUTH, timeout=120)
            job = h.scheduler.get(next(last).event.job_id)
            assert build.entered.wait(60)
            drained = threading.Thread(target=h.server.drain, kwargs={"grace_s": 0.0})
            drained.start()
            assert job.wait_finished(PROMISED_S), "the drain waited for the build"
            assert job.state.name == "CANCELLED" and "shutting down" in job.cancel.reason
            assert build_threads() and not build.gate.is_set()
        finally:
            build.gate.set()
        drained.join(60)
        assert not drained.is_alive()
        assert support.wait_for(lambda: not build_threads())
    support.assert_resources_back(before)
