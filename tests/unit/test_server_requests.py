"""Request validation, the error mapping, bearer tokens and settings, without sockets."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from PIL import Image
from pydantic import ValidationError

import server.validation as validation
from forgedit.errors import BaseModelMismatchError, CancelledError, InvalidInputError
from registry.errors import EditModelNotFoundError, RegistryUnavailableError
from server._proto import forgedit_pb2 as pb
from server.auth import BearerTokenInterceptor
from server.errors import QueueFullError, to_rpc_status
from server.ports import BaseModelInfo
from server.service import _payload_digest
from server.settings import ServerSettings
from server.validation import Limits, validate_edit, validate_sample

BASES = {"tiny": BaseModelInfo("tiny", "f" * 64, 64, 64, has_captioner=True)}


def _png(size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def _edit(**fields: object) -> pb.EditRequest:
    defaults: dict[str, object] = {"image": _png(), "target_prompts": ["A photo of a cat."]}
    defaults.update(fields)
    return pb.EditRequest(**defaults)  # type: ignore[arg-type]


def test_a_valid_edit_becomes_a_complete_plan() -> None:
    plan = validate_edit(
        _edit(
            training=pb.TrainingOptions(updates=3, seed=5),
            sweep=pb.SweepOptions(seeds=[1, 2], gammas=[0.5]),
        ),
        Limits(),
        BASES,
        "tiny",
    )
    assert plan.base_model == "tiny" and plan.source_prompt is None
    assert (plan.training.height, plan.training.width) == (64, 64)  # the base's native size
    assert plan.training.stages[0].updates == 3 and plan.training.seed == 5
    assert plan.sweep.seeds == (1, 2) and plan.images_total == 2
    assert plan.image.width == 32 and plan.image.format == "PNG"


def test_unset_seeds_are_drawn_and_reported() -> None:
    plan = validate_edit(_edit(sweep=pb.SweepOptions(seed_count=3)), Limits(), BASES, "tiny")
    assert len(plan.sweep.seeds) == 3
    assert 0 <= plan.training.seed < 2**63


def test_cheap_checks_run_before_the_image_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*_: object, **__: object) -> None:
        raise AssertionError("the image was decoded before the cheap checks")

    monkeypatch.setattr("forgedit.images.load_image", never)
    for request, field in (
        (_edit(sweep=pb.SweepOptions(steps=0)), "sweep.steps"),
        (_edit(sweep=pb.SweepOptions(gammas=[0.1] * 65)), "sweep.gammas"),
        (_edit(target_prompts=["x" * 2000]), "target_prompts"),
        (_edit(base_model="nope"), "base_model"),
        (_edit(training=pb.TrainingOptions(width=12)), "training.width"),
    ):
        with pytest.raises(InvalidInputError) as e:
            validate_edit(request, Limits(), BASES, "tiny")
        assert e.value.field == field


def test_source_prompt_required_without_a_captioner() -> None:
    bases = {"tiny": BaseModelInfo("tiny", "f" * 64, 64, 64, has_captioner=False)}
    with pytest.raises(InvalidInputError) as e:
        validate_edit(_edit(), Limits(), bases, "tiny")
    assert e.value.field == "source_prompt"
    plan = validate_edit(_edit(source_prompt="A photo of a cat."), Limits(), bases, "tiny")
    assert plan.source_prompt == "A photo of a cat."


def test_limits_come_from_settings() -> None:
    limits = Limits.from_settings(ServerSettings(max_steps=10, image_formats=["png"]))
    assert limits.max_steps == 10 and limits.image_formats == ("PNG",)
    with pytest.raises(InvalidInputError) as e:
        validate_edit(_edit(sweep=pb.SweepOptions(steps=11)), limits, BASES, "tiny")
    assert "1..10" in str(e.value)


def test_sample_validation_checks_the_id_first() -> None:
    with pytest.raises(InvalidInputError) as e:
        validate_sample(
            pb.SampleRequest(edit_model_id="../../etc/passwd", target_prompts=["x"]), Limits()
        )
    assert e.value.field == "edit_model_id"
    plan = validate_sample(
        pb.SampleRequest(edit_model_id="em_" + "b" * 26, target_prompts=["x"]), Limits()
    )
    assert plan.sweep.forget == ("donotforget",)


def test_strategies_are_checked_against_the_variant() -> None:
    sweep = validate_sample(
        pb.SampleRequest(
            edit_model_id="em_" + "b" * 26,
            target_prompts=["x"],
            sweep=pb.SweepOptions(forget_strategies=["nodecoder"]),
        ),
        Limits(),
    ).sweep
    validation.check_strategies(sweep, "dreambooth")  # DreamBooth-Forgedit defines it
    with pytest.raises(InvalidInputError) as e:
        validation.check_strategies(sweep, "joint")
    assert e.value.field == "sweep.forget_strategies"


def test_payload_digest_ignores_request_id_and_detach() -> None:
    a = _edit(request_id="r1", detach=True)
    b = _edit(request_id="r2")
    c = _edit(target_prompts=["A photo of a dog."])
    assert _payload_digest(pb.JOB_KIND_EDIT, a) == _payload_digest(pb.JOB_KIND_EDIT, b)
    assert _payload_digest(pb.JOB_KIND_EDIT, a) != _payload_digest(pb.JOB_KIND_EDIT, c)


@pytest.mark.parametrize(
    "error, code, detail",
    [
        (
            InvalidInputError("bad steps", field="sweep.steps"),
            code_pb2.INVALID_ARGUMENT,
            error_details_pb2.BadRequest,
        ),
        (QueueFullError(4, 12.0), code_pb2.RESOURCE_EXHAUSTED, error_details_pb2.RetryInfo),
        (
            EditModelNotFoundError("em_" + "a" * 26),
            code_pb2.NOT_FOUND,
            error_details_pb2.ResourceInfo,
        ),
        (
            BaseModelMismatchError("other base"),
            code_pb2.FAILED_PRECONDITION,
            error_details_pb2.PreconditionFailure,
        ),
        (CancelledError("client cancelled"), code_pb2.CANCELLED, error_details_pb2.ErrorInfo),
        (RegistryUnavailableError("down"), code_pb2.UNAVAILABLE, error_details_pb2.RetryInfo),
    ],
)
def test_error_mapping(error: Exception, code: int, detail: Any) -> None:
    mapped = to_rpc_status(error)
    assert mapped.status.code == code
    assert any(d.Is(detail.DESCRIPTOR) for d in mapped.status.details)
    assert mapped.grpc_status().code == mapped.code
    if isinstance(error, InvalidInputError):
        bad = error_details_pb2.BadRequest()
        mapped.status.details[0].Unpack(bad)
        assert bad.field_violations[0].field == "sweep.steps"


def test_unexpected_errors_are_opaque(caplog: pytest.LogCaptureFixture) -> None:
    mapped = to_rpc_status(KeyError("/home/someone/secret"))
    assert mapped.code == grpc.StatusCode.INTERNAL
    assert "secret" not in mapped.status.message and "KeyError" not in mapped.status.message
    reference = mapped.status.message.split("reference ")[1].split()[0]
    assert any(reference in r.getMessage() and r.exc_info for r in caplog.records)


def _details(metadata: tuple) -> SimpleNamespace:
    return SimpleNamespace(
        method="/forgedit.v1.ForgeditService/GetJob", invocation_metadata=metadata
    )


def test_bearer_tokens() -> None:
    interceptor = BearerTokenInterceptor(["alpha-token", "beta-token"])
    ok = object()

    def handler(_: object) -> object:
        return ok

    assert (
        interceptor.intercept_service(handler, _details((("authorization", "Bearer beta-token"),)))
        is ok
    )
    assert (
        interceptor.intercept_service(handler, _details((("authorization", "bearer alpha-token"),)))
        is ok
    )
    for metadata in (
        (),
        (("authorization", "Bearer alpha"),),
        (("authorization", "Token alpha-token"),),
    ):
        assert interceptor._problem(metadata) is not None
    health = SimpleNamespace(method="/grpc.health.v1.Health/Check", invocation_metadata=())
    assert interceptor.intercept_service(handler, health) is ok
    with pytest.raises(ValueError):
        BearerTokenInterceptor([])


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGEDIT_AUTH_TOKENS", '["t1"]')
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("FORGEDIT_METRICS_PORT", "none")
    monkeypatch.setenv("FORGEDIT_QUEUE_SIZE", "3")
    settings = ServerSettings()
    assert [t.get_secret_value() for t in settings.auth_tokens] == ["t1"]
    assert "t1" not in repr(settings)
    assert settings.mlflow_tracking_uri == "http://mlflow:5000"
    assert settings.metrics_port is None and settings.queue_size == 3
    with pytest.raises(ValidationError):
        ServerSettings(tls_cert_file=Path("cert.pem"))  # a certificate needs its key
    with pytest.raises(ValidationError):
        ServerSettings(max_image_bytes=10**9)  # must stay below the message limit


def test_an_edit_whose_batch_cannot_fit_a_device_is_refused_naming_the_limit() -> None:
    # The case: a valid 2048x2048 Edit with a training batch of 64.
    request = _edit(training=pb.TrainingOptions(height=2048, width=2048, batch_size=64))
    with pytest.raises(InvalidInputError) as refused:
        validate_edit(request, Limits(), BASES, "tiny")
    assert refused.value.field == "training.batch_size"
    assert "FORGEDIT_MAX_BATCH_PIXELS" in str(refused.value) and "2048x2048" in str(refused.value)
    mapped = to_rpc_status(refused.value)
    assert mapped.code == grpc.StatusCode.INVALID_ARGUMENT
    # The limit is a setting: the same request fits a device given a larger budget.
    roomy = Limits(max_batch_pixels=2048 * 2048 * 64)
    assert validate_edit(request, roomy, BASES, "tiny").training.stages[0].batch_size == 64


def test_forgedits_own_512_batch_of_10_fits_the_default_budget() -> None:
    request = _edit(training=pb.TrainingOptions(height=512, width=512, batch_size=10))
    settings = ServerSettings(_env_file=None)  # type: ignore[call-arg]
    plan = validate_edit(request, Limits.from_settings(settings), BASES, "tiny")
    assert plan.training.stages[0].batch_size == 10


def test_sampling_batches_shrink_to_fit_the_budget_and_one_image_must_fit() -> None:
    limits = Limits(max_batch_pixels=3 * 64 * 64, sampling_batch=8)
    assert validation.sampling_batch_size(64, 64, limits) == 3
    assert validation.sampling_batch_size(32, 32, limits) == 8
    sweep = validate_sample(
        pb.SampleRequest(edit_model_id="em_" + "a" * 26, target_prompts=["a dog"]), limits
    ).sweep
    validation.check_sampling_memory(sweep, 64, 64, limits)
    with pytest.raises(InvalidInputError, match="FORGEDIT_MAX_BATCH_PIXELS"):
        validation.check_sampling_memory(sweep, 128, 128, limits)


def test_registry_calls_give_up_before_the_deadline_and_stay_bounded() -> None:
    from server.store import RegistryCalls

    calls = RegistryCalls(threads=2, timeout_s=30.0)
    hung = threading.Event()
    try:
        for _ in range(2):  # MLflow hangs: each call gives up within its request's deadline
            with pytest.raises(RegistryUnavailableError, match="did not answer within"):
                calls.run("list edit models", hung.wait, remaining_s=0.05)
        # Both pool threads still wait for MLflow: a third call is refused at once, no thread
        # is added however many requests arrive.
        with pytest.raises(RegistryUnavailableError, match="still waiting"):
            calls.run("list edit models", lambda: "never run", remaining_s=None)
        assert to_rpc_status(RegistryUnavailableError("x")).code == grpc.StatusCode.UNAVAILABLE
        hung.set()  # MLflow answers again (or its HTTP timeout fires): the slots come back
        assert _eventually(lambda: _try(calls) == "ok")
    finally:
        hung.set()
        calls.close()


def _try(calls: Any) -> str:
    try:
        return str(calls.run("describe", lambda: "ok", remaining_s=None))
    except RegistryUnavailableError:
        return "refused"


def _eventually(predicate: Any, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 4294967296 bytes."
        ),
        pytest.param("cuda", id="torch.cuda.OutOfMemoryError"),
    ],
)
def test_running_out_of_memory_is_resource_exhausted_not_internal(error: Any) -> None:
    if error == "cuda":
        import torch

        error = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    mapped = to_rpc_status(error, context="in job j-1")
    assert mapped.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "FORGEDIT_MAX_BATCH_PIXELS" in mapped.status.message
    assert mapped.reason == "resource_exhausted"
