"""Engine-side faults against a real server: an unexpected exception inside a job becomes
INTERNAL with an opaque reference that the log carries (with the traceback), never a path or a
traceback on the wire; an edit model of a base model this replica does not serve is
FAILED_PRECONDITION before anything is queued. The server keeps serving afterwards."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from support import server as support

from server._proto import forgedit_pb2 as pb
from server.auth import legacy_principal_name
from server.main import default_engine_factory
from server.settings import ServerSettings

SECRET = "/srv/secret-mount/weights"


class FlakyEngine:
    """The real engine, except that a fine-tune with source prompt "explode" raises an
    unexpected error naming a machine path (the injected fault)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def finetune(self, image: Any, source_prompt: str, config: Any, **kwargs: Any) -> Any:
        if source_prompt == "explode":
            raise RuntimeError(f"could not read {SECRET}/unet.bin")
        return self._engine.finetune(image, source_prompt, config, **kwargs)


@pytest.fixture
def harness(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Any]:
    """A server of its own for each scenario, resources compared after it stops."""
    before = support.Resources.now()
    settings = ServerSettings(
        base_models={"tiny": tiny_model_dir / "stable-diffusion"},
        blip_dir=tiny_model_dir / "blip",
        unet_backend="torch",
    )
    real = default_engine_factory(settings, dict(settings.base_models))
    with support.running_server(
        tmp_path,
        tiny_model_dir,
        engine_factory=lambda name, device: FlakyEngine(real(name, device)),
    ) as h:
        yield h
    support.assert_resources_back(before)


def test_unexpected_error_is_internal_with_a_logged_reference(
    harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="server.errors")
    request = support.edit_request(support.sample_photo(), source_prompt="explode")
    outcome = support.stream(harness.stub.Edit, request)
    assert outcome.code == grpc.StatusCode.INTERNAL
    assert SECRET not in outcome.details and "Traceback" not in outcome.details
    assert "RuntimeError" not in outcome.details
    info = outcome.detail(error_details_pb2.ErrorInfo)
    reference = info.metadata["reference"]
    assert reference in outcome.details
    logged = [r for r in caplog.records if reference in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback goes to the log only
    job, _ = support.unary(harness.stub.GetJob, pb.GetJobRequest(job_id=outcome.events[0].job_id))
    assert job.job.state == pb.JOB_STATE_FAILED
    assert job.job.error_code == grpc.StatusCode.INTERNAL.value[0]
    support.assert_nothing_left_behind(harness)
    # The neighbour request after the failure is served normally.
    ok = support.stream(harness.stub.Edit, support.edit_request(support.sample_photo()))
    assert ok.code == grpc.StatusCode.OK, ok.details
    support.assert_nothing_left_behind(harness)


def test_edit_model_of_another_base_model_is_failed_precondition(harness: Any) -> None:
    made = support.stream(
        harness.stub.Edit,
        support.edit_request(support.sample_photo("cat.jpg")),
    )
    assert made.code == grpc.StatusCode.OK, made.details
    edit_model = harness.registry.load(made.of("completed")[0].edit_model_id)
    foreign = dataclasses.replace(
        edit_model, base_model_name="sd15", base_model_fingerprint="f" * 64
    )
    registered = harness.registry.register(
        foreign,
        principal=legacy_principal_name(support.TOKEN),  # the test token's own
    )
    outcome = support.stream(
        harness.stub.Sample,
        pb.SampleRequest(
            edit_model_id=registered.edit_model_id, target_prompts=["A photo of a banana."]
        ),
    )
    assert outcome.code == grpc.StatusCode.FAILED_PRECONDITION, outcome.details
    assert outcome.events == [] and "sd15" in outcome.details
    assert outcome.detail(error_details_pb2.PreconditionFailure) is not None
    support.assert_nothing_left_behind(harness)
