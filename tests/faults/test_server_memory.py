"""Memory against a real server (real tiny engine, real embedded registry), one server per
scenario:

- finished jobs keep only what replay and GetJob need: no input image (neither its bytes nor
  its decoded pixels), so the server's RSS does not grow with the Edits it has served, and
  the events they keep are counted against a byte budget, in a gauge (issue 21.2);
- running out of memory is RESOURCE_EXHAUSTED wherever it happens in a request (decoding the
  image at admission, inside the registry during a job), never INVALID_ARGUMENT "corrupt" or
  INTERNAL, and the server stays ready (issue 21.4).
"""

from __future__ import annotations

import gc
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from PIL import Image, ImageFile
from support import server as support

from server._proto import forgedit_pb2 as pb

stream = support.stream
QUICK_TRAINING = {"updates": 2, "batch_size": 1}
MIB = 1024 * 1024


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def photo_4096() -> bytes:
    """A 4096x4096 JPEG (a sample photo enlarged): about 1 MiB encoded, 48 MiB decoded."""
    image = Image.open(support.SAMPLE_PHOTOS / "cat.jpg").convert("RGB")
    buffer = io.BytesIO()
    image.resize((4096, 4096), Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def metric(h: Any, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{h.server.metrics_port}/metrics") as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} is not exported")


def test_finished_jobs_keep_no_input_image(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Issue 21.2: 70 Edits of a 4096x4096 JPEG took the server from 799 to 5,375 MiB, each
    finished job holding its request's bytes and the decoded full-resolution pixels. Here a
    dozen cheap Edits of such a photo (the first trains, the rest reuse its fine-tune) must
    leave the RSS where it was, every finished job without its image, and the events they
    keep counted in the retained-bytes gauge, within its budget."""
    before = support.Resources.now()
    request = support.edit_request(
        photo_4096(), training=QUICK_TRAINING, source_prompt="A photo of a cat."
    )
    with support.running_server(tmp_path, tiny_model_dir) as h:
        first = stream(h.stub.Edit, request)
        assert first.code == grpc.StatusCode.OK, first.details
        gc.collect()
        rss_before = rss_mib()
        job_ids = []
        for _ in range(12):
            done = stream(h.stub.Edit, request)
            assert done.code == grpc.StatusCode.OK, done.details
            assert done.of("registered")[0].deduplicated  # cheap: the fine-tune is reused
            job_ids.append(done.events[0].job_id)
        gc.collect()
        grown = rss_mib() - rss_before
        # 12 retained jobs x (48 MiB of pixels + 1 MiB of bytes) grew it by ~600 MiB before.
        assert grown < 150, f"the server grew by {grown:.0f} MiB over 12 finished Edits"
        for job_id in job_ids:
            assert h.scheduler.get(job_id).plan is None, "a finished job kept its request"
        kept = metric(h, "forgedit_retained_job_bytes")
        assert 0 < kept <= h.server.settings.max_retained_job_bytes
        assert metric(h, "forgedit_retained_jobs") == 13
        support.assert_nothing_left_behind(h)
    support.assert_resources_back(before)


class StarvedRegistry:
    """The real registry, whose ``load`` runs out of memory while ``starved`` is set: the
    MemoryError is wrapped in the registry's own error, as a layer that translates its
    dependencies' exceptions does."""

    def __init__(self, registry: Any) -> None:
        self._registry = registry
        self.starved = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._registry, name)

    def load(self, edit_model_id: str, **kwargs: Any) -> Any:
        if self.starved.is_set():
            from registry.errors import RegistryError

            try:
                raise MemoryError
            except MemoryError as e:
                raise RegistryError("the MLflow registry refused to load (MemoryError)") from e
        return self._registry.load(edit_model_id, **kwargs)


@pytest.fixture
def starved(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Any]:
    from registry import EditModelRegistry, RegistryConfig

    before = support.Resources.now()
    real = EditModelRegistry(RegistryConfig(data_dir=tmp_path / "data" / "registry"))
    registry = StarvedRegistry(real)
    try:
        with support.running_server(tmp_path, tiny_model_dir, registry=registry) as h:
            yield h, registry
    finally:
        real.close()
    support.assert_resources_back(before)


def _assert_out_of_memory(outcome: support.Outcome) -> None:
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (outcome.code, outcome.details)
    assert "ran out of memory" in outcome.details
    quota = outcome.detail(error_details_pb2.QuotaFailure)
    assert quota is not None and quota.violations[0].subject == "memory"
    retry = outcome.detail(error_details_pb2.RetryInfo)
    assert retry is not None and retry.retry_delay.seconds >= 1
    assert outcome.detail(error_details_pb2.BadRequest) is None  # not the client's request


def test_running_out_of_memory_is_resource_exhausted_wherever_it_happens(
    starved: tuple[Any, StarvedRegistry], monkeypatch: pytest.MonkeyPatch
) -> None:
    h, registry = starved
    photo = support.sample_photo("cat.jpg")

    # 1. At admission: the decoder cannot allocate the pixels (Pillow raises MemoryError
    # where it allocates the image buffer). Before issue 21.4 this was INVALID_ARGUMENT,
    # "truncated or corrupt".
    original = ImageFile.ImageFile.load_prepare

    def no_memory(self: ImageFile.ImageFile) -> None:
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load_prepare", no_memory)
    refused = stream(h.stub.Edit, support.edit_request(photo, training=QUICK_TRAINING))
    _assert_out_of_memory(refused)
    assert refused.events == []
    monkeypatch.setattr(ImageFile.ImageFile, "load_prepare", original)
    # A truncated image is still the client's fault, and the very same photo is fine.
    cut = stream(h.stub.Edit, support.edit_request(photo[: len(photo) // 2]))
    assert cut.code == grpc.StatusCode.INVALID_ARGUMENT and "truncated" in cut.details
    made = stream(h.stub.Edit, support.edit_request(photo, training=QUICK_TRAINING))
    assert made.code == grpc.StatusCode.OK, made.details
    edit_model_id = made.of("completed")[0].edit_model_id

    # 2. Inside a job: the registry runs out of memory loading the edit model and reports
    # it as its own error; the job still ends RESOURCE_EXHAUSTED, not INTERNAL.
    registry.starved.set()
    sample = pb.SampleRequest(
        edit_model_id=edit_model_id, target_prompts=["A photo of a dog."], sweep=support.QUICK_SWEEP
    )
    failed = stream(h.stub.Sample, sample)
    registry.starved.clear()
    _assert_out_of_memory(failed)
    assert failed.kinds()[0] == "accepted"
    job, _ = support.unary(h.stub.GetJob, pb.GetJobRequest(job_id=failed.events[0].job_id))
    assert job.job.error_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    again = stream(h.stub.Sample, sample)
    assert again.code == grpc.StatusCode.OK, again.details
    support.assert_nothing_left_behind(h)
