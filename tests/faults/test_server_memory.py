"""Memory against a real server (real tiny engine, real embedded registry), one server per
scenario:

- running out of memory is RESOURCE_EXHAUSTED wherever it happens in a request (decoding the
  image at admission, inside the registry during a job), never INVALID_ARGUMENT "corrupt" or
  INTERNAL, and the server stays ready (issue 21.4);
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from PIL import ImageFile
from support import server as support

from server._proto import forgedit_pb2 as pb

stream = support.stream
QUICK_TRAINING = {"updates": 2, "batch_size": 1}


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
