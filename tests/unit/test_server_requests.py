"""Request validation, the error mapping, bearer tokens and settings, without sockets."""

from __future__ import annotations

import io
import json
import shutil
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from PIL import Image
from pydantic import SecretStr, ValidationError

import server.validation as validation
from forgedit.cli.arguments import edit_options
from forgedit.cli.parser import build_parser
from forgedit.config import content_seed
from forgedit.errors import BaseModelMismatchError, CancelledError, InvalidInputError
from forgedit.requests import build_training, check_strategies
from registry.errors import EditModelNotFoundError, RegistryUnavailableError
from server._proto import forgedit_pb2 as pb
from server.auth import (
    ANONYMOUS,
    Authenticator,
    BearerTokenInterceptor,
    Principal,
    TokenEntry,
    token_entries,
)
from server.catalog import ServedModels
from server.errors import QueueFullError, StreamLimitError, UnauthenticatedError, to_rpc_status
from server.interceptors import CallLimiter, LogBudget, UnparsedRequest, tolerant_deserializer
from server.main import stream_share
from server.plans import Defaults, EditRequestPlan, SampleRequestPlan, edit_plan, sample_plan
from server.ports import BaseModelInfo
from server.settings import ServerSettings
from server.shares import Refusal, ShareRule
from server.transport import MIB, server_options
from server.validation import Limits
from server.wire import edit_call, payload_digest, sample_call

NATIVE = {"native_height": 64, "native_width": 64}
BASES = {"tiny": BaseModelInfo("tiny", "f" * 64, 64, 64, can_caption=True)}


def _png(size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def plan_edit(
    request: pb.EditRequest,
    limits: Limits,
    bases: dict[str, BaseModelInfo],
    default: str,
    default_precision: str = "faithful",
    delta_format: str | None = None,
) -> EditRequestPlan:
    """An Edit request decoded as the service decodes it (``wire``), then planned against
    the served base models ``bases`` (``default`` first), at any size (as
    FORGEDIT_OTHER_RESOLUTIONS=torch: the resolution check has tests of its own)."""
    others = (b for n, b in bases.items() if n != default)
    served = ServedModels.of(bases[default], *others, other_resolutions="torch")
    defaults = Defaults(default_precision, delta_format)  # type: ignore[arg-type]
    return edit_plan(edit_call(request), limits, served, defaults)


def plan_sample(request: pb.SampleRequest, limits: Limits, mode_of: Any) -> SampleRequestPlan:
    return sample_plan(sample_call(request), limits, mode_of)


def _edit(**fields: object) -> pb.EditRequest:
    defaults: dict[str, object] = {"image": _png(), "target_prompts": ["A photo of a cat."]}
    defaults.update(fields)
    return pb.EditRequest(**defaults)  # type: ignore[arg-type]


def test_a_valid_edit_becomes_a_complete_plan() -> None:
    plan = plan_edit(
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


def test_labels_and_the_time_to_live_reach_the_plan_with_the_servers_default() -> None:
    served = ServedModels.of(BASES["tiny"])
    plan = edit_plan(
        edit_call(_edit(labels={"team": "red"}, ttl_seconds=60)), Limits(), served, Defaults()
    )
    assert dict(plan.labels) == {"team": "red"} and plan.ttl_s == 60
    unset = edit_call(_edit())
    assert edit_plan(unset, Limits(), served, Defaults()).ttl_s is None
    assert edit_plan(unset, Limits(), served, Defaults(ttl_s=3600.0)).ttl_s == 3600.0
    with pytest.raises(InvalidInputError, match="label key 'Team'") as bad:
        edit_plan(edit_call(_edit(labels={"Team": "red"})), Limits(), served, Defaults())
    assert bad.value.field == "labels"
    with pytest.raises(InvalidInputError) as zero:
        edit_plan(edit_call(_edit(ttl_seconds=0)), Limits(), served, Defaults(ttl_s=60.0))
    assert zero.value.field == "ttl_seconds"
    with pytest.raises(ValidationError, match=r"time-to-live must be 1\.\.315360000 seconds"):
        ServerSettings(edit_model_ttl_s=0)


def test_unset_sampling_seeds_are_drawn_and_the_training_seed_is_the_contents() -> None:
    plan = plan_edit(_edit(sweep=pb.SweepOptions(seed_count=3)), Limits(), BASES, "tiny")
    assert len(plan.sweep.seeds) == 3
    assert plan.train_seed_from == "content"
    training = plan.training_for("f" * 64, "A photo of a dog")
    assert training.seed == content_seed(
        plan.image.sha256, "f" * 64, "A photo of a dog", plan.training
    )
    assert 0 <= training.seed < 2**63
    # The same request, on any replica, at any time: the same seed. Anything training sees
    # changes it; the target prompt (never seen in training) does not.
    again = plan_edit(_edit(target_prompts=["A dog."]), Limits(), BASES, "tiny")
    assert again.training_for("f" * 64, "A photo of a dog").seed == training.seed
    assert again.training_for("f" * 64, "A photo of a cat").seed != training.seed
    assert again.training_for("e" * 64, "A photo of a dog").seed != training.seed
    other = plan_edit(_edit(image=_png((33, 24))), Limits(), BASES, "tiny")
    assert other.training_for("f" * 64, "A photo of a dog").seed != training.seed


def test_fresh_seed_asks_for_a_new_fine_tune_that_a_retry_repeats() -> None:
    content = plan_edit(_edit(), Limits(), BASES, "tiny").training_for("f" * 64, "a dog")
    fresh = pb.TrainingOptions(fresh_seed=True)
    seeds = {
        plan_edit(_edit(training=fresh), Limits(), BASES, "tiny")
        .training_for("f" * 64, "a dog")
        .seed
        for _ in range(3)
    }
    assert len(seeds) == 3 and content.seed not in seeds  # no request id: random each time
    # With a request id, a retry (expired job, restart, other replica) gets the same seed.
    retried = [
        plan_edit(_edit(training=fresh, request_id="r-1"), Limits(), BASES, "tiny")
        .training_for("f" * 64, "a dog")
        .seed
        for _ in range(2)
    ]
    assert retried[0] == retried[1] != content.seed
    with pytest.raises(InvalidInputError) as e:
        plan_edit(
            _edit(training=pb.TrainingOptions(fresh_seed=True, seed=3)), Limits(), BASES, "tiny"
        )
    assert e.value.field == "training.fresh_seed"


def test_the_servers_precision_is_the_default_for_training_and_sampling() -> None:
    plan = plan_edit(_edit(), Limits(), BASES, "tiny", default_precision="fast")
    assert plan.training.precision == "fast"
    plan = plan_edit(
        _edit(training=pb.TrainingOptions(precision=pb.PRECISION_FAITHFUL)),
        Limits(),
        BASES,
        "tiny",
        default_precision="fast",
    )
    assert plan.training.precision == "faithful"


def test_per_stage_overrides_mean_what_the_engine_cli_means() -> None:
    request = _edit(
        training=pb.TrainingOptions(
            mode=pb.TRAINING_MODE_TWO_STAGE, updates=5, stage2_updates=7, stage2_batch_size=2
        )
    )
    stages = plan_edit(request, Limits(), BASES, "tiny").training.stages
    assert [(s.updates, s.batch_size) for s in stages] == [(5, 1), (7, 2)]
    args = build_parser().parse_args(
        [
            "edit",
            "x.png",
            "--prompt",
            "A dog.",
            "--mode",
            "two_stage",
            "--updates",
            "5,7",
            "--batch-size",
            "1,2",
        ]
    )
    cli_config, _ = build_training(edit_options(args).training, **NATIVE)
    assert cli_config.stages == stages
    # One value is the first stage's in both.
    first = plan_edit(
        _edit(training=pb.TrainingOptions(mode=pb.TRAINING_MODE_TWO_STAGE, updates=5)),
        Limits(),
        BASES,
        "tiny",
    ).training.stages
    assert [s.updates for s in first] == [5, 1000]
    args.updates, args.batch_size = "5", None
    assert build_training(edit_options(args).training, **NATIVE)[0].stages == first
    for field in ("stage2_updates", "stage2_batch_size"):
        with pytest.raises(InvalidInputError) as e:
            plan_edit(_edit(training=pb.TrainingOptions(**{field: 2})), Limits(), BASES, "tiny")
        assert e.value.field == f"training.{field}" and "joint training has 1 stage" in str(e.value)
    with pytest.raises(InvalidInputError) as e:
        plan_edit(
            _edit(training=pb.TrainingOptions(mode=pb.TRAINING_MODE_TWO_STAGE, stage2_updates=0)),
            Limits(),
            BASES,
            "tiny",
        )
    assert e.value.field == "training.stage2_updates"


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
            plan_edit(request, Limits(), BASES, "tiny")
        assert e.value.field == field


def test_source_prompt_required_without_a_captioner() -> None:
    bases = {"tiny": BaseModelInfo("tiny", "f" * 64, 64, 64, can_caption=False)}
    with pytest.raises(InvalidInputError) as e:
        plan_edit(_edit(), Limits(), bases, "tiny")
    assert e.value.field == "source_prompt"
    plan = plan_edit(_edit(source_prompt="A photo of a cat."), Limits(), bases, "tiny")
    assert plan.source_prompt == "A photo of a cat."


def test_limits_come_from_settings() -> None:
    limits = Limits.from_settings(ServerSettings(max_steps=10, image_formats=["png"]))
    assert limits.max_steps == 10 and limits.image_formats == ("PNG",)
    with pytest.raises(InvalidInputError) as e:
        plan_edit(_edit(sweep=pb.SweepOptions(steps=11)), limits, BASES, "tiny")
    assert "1..10" in str(e.value)


def test_delta_format_request_setting_and_precision_default() -> None:
    """The request's format wins; unset, the server setting; unset too, the precision's."""

    def stored(options: pb.TrainingOptions, server_format: str | None) -> str | None:
        return plan_edit(
            _edit(training=options), Limits(), BASES, "tiny", delta_format=server_format
        ).training.delta_format

    assert stored(pb.TrainingOptions(), None) == "fp32"
    assert stored(pb.TrainingOptions(precision=pb.PRECISION_FAST), None) == "int8"
    fp16_server = ServerSettings(delta_format="fp16").delta_format
    assert stored(pb.TrainingOptions(), fp16_server) == "fp16"
    int8 = pb.TrainingOptions(delta_format=pb.DELTA_FORMAT_INT8)
    assert stored(int8, fp16_server) == "int8"
    with pytest.raises(ValidationError, match="delta_format"):
        ServerSettings(delta_format="int4")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError) as e:
        stored(pb.TrainingOptions(delta_format=9), None)  # type: ignore[arg-type]
    assert e.value.field == "training.delta_format"
    assert "DELTA_FORMAT_FP32, DELTA_FORMAT_FP16, DELTA_FORMAT_INT8" in str(e.value)


def _mode(mode: str):  # type: ignore[no-untyped-def]
    return lambda edit_model_id: mode


def test_sample_validation_checks_the_id_first() -> None:
    def unasked(edit_model_id: str) -> str:
        raise AssertionError("the registry was asked before the cheap checks")

    with pytest.raises(InvalidInputError) as e:
        plan_sample(
            pb.SampleRequest(edit_model_id="../../etc/passwd", target_prompts=["x"]),
            Limits(),
            unasked,
        )
    assert e.value.field == "edit_model_id"
    with pytest.raises(InvalidInputError) as e:
        plan_sample(
            pb.SampleRequest(
                edit_model_id="em_" + "b" * 26,
                target_prompts=["x"],
                sweep=pb.SweepOptions(gammas=[0.1] * 65),
            ),
            Limits(),
            unasked,
        )
    assert e.value.field == "sweep.gammas"
    plan = plan_sample(
        pb.SampleRequest(edit_model_id="em_" + "b" * 26, target_prompts=["x"]),
        Limits(),
        _mode("joint"),
    )
    assert plan.sweep.forget == ("donotforget",)


def test_sample_defaults_are_the_edit_models_variants() -> None:
    request = pb.SampleRequest(edit_model_id="em_" + "b" * 26, target_prompts=["x"])
    two_stage = plan_sample(request, Limits(), _mode("two_stage")).sweep
    assert two_stage.forget == ("encoderattn",)
    vp = pb.SampleRequest(
        edit_model_id="em_" + "b" * 26,
        target_prompts=["x"],
        sweep=pb.SweepOptions(interpolation=pb.INTERPOLATION_VP),
    )
    dreambooth = plan_sample(vp, Limits(), _mode("dreambooth")).sweep
    assert dreambooth.gammas == (0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6)
    assert dreambooth.alphas == (0.8, 0.9)
    edit = plan_edit(
        _edit(training=pb.TrainingOptions(mode=pb.TRAINING_MODE_TWO_STAGE)),
        Limits(),
        BASES,
        "tiny",
    )
    assert edit.sweep.forget == ("encoderattn",)


def test_strategies_are_checked_against_the_variant() -> None:
    request = pb.SampleRequest(
        edit_model_id="em_" + "b" * 26,
        target_prompts=["x"],
        sweep=pb.SweepOptions(forget_strategies=["nodecoder"]),
    )
    sweep = plan_sample(request, Limits(), _mode("dreambooth")).sweep
    check_strategies(sweep.forget, "dreambooth")  # DreamBooth-Forgedit defines it
    with pytest.raises(InvalidInputError) as e:
        check_strategies(sweep.forget, "joint")
    assert e.value.field == "sweep.forget_strategies"
    with pytest.raises(InvalidInputError) as e:
        plan_sample(request, Limits(), _mode("joint"))
    assert e.value.field == "sweep.forget_strategies"


def test_payload_digest_ignores_request_id_and_detach() -> None:
    a = _edit(request_id="r1", detach=True)
    b = _edit(request_id="r2")
    c = _edit(target_prompts=["A photo of a dog."])
    assert payload_digest(pb.JOB_KIND_EDIT, a, "") == payload_digest(pb.JOB_KIND_EDIT, b, "")
    assert payload_digest(pb.JOB_KIND_EDIT, a, "") != payload_digest(pb.JOB_KIND_EDIT, c, "")


@pytest.mark.parametrize(
    "error, code, detail",
    [
        (
            InvalidInputError("bad steps", field="sweep.steps"),
            code_pb2.INVALID_ARGUMENT,
            error_details_pb2.BadRequest,
        ),
        (
            QueueFullError("full", subject="job-queue", limit=4, setting="Q", retry_after_s=12.0),
            code_pb2.RESOURCE_EXHAUSTED,
            error_details_pb2.RetryInfo,
        ),
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
    interceptor = BearerTokenInterceptor(
        Authenticator([SecretStr("alpha-token"), SecretStr("beta-token")])
    )
    ok = SimpleNamespace(response_streaming=False, response_serializer=None)

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
        refused = interceptor.intercept_service(handler, _details(metadata))
        # Refused without reading the request: request-streaming, no deserializer.
        assert refused is not ok and refused.request_streaming
        assert refused.request_deserializer is None
    health = SimpleNamespace(method="/grpc.health.v1.Health/Check", invocation_metadata=())
    assert interceptor.intercept_service(handler, health) is ok
    with pytest.raises(ValueError):
        BearerTokenInterceptor(Authenticator([]))


def test_principals_named_admin_and_legacy_tokens() -> None:
    auth = Authenticator(
        [
            TokenEntry(name="alice", token=SecretStr("alice-token")),
            TokenEntry(name="ops", token=SecretStr("ops-token"), admin=True),
            SecretStr("plain-token"),
        ]
    )
    alice = auth.identify((("authorization", "Bearer alice-token"),))
    ops = auth.identify((("authorization", "Bearer ops-token"),))
    legacy = auth.identify((("authorization", "Bearer plain-token"),))
    assert alice == Principal("alice") and ops == Principal("ops", admin=True)
    assert legacy.name.startswith("token-") and "plain" not in legacy.name and not legacy.admin
    assert legacy == auth.identify((("authorization", "Bearer plain-token"),))  # stable
    assert alice.may_see("alice") and not alice.may_see("bob") and not alice.may_see("")
    assert ops.may_see("bob") and ops.may_see("")
    for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", "x"),)):
        with pytest.raises(UnauthenticatedError):
            auth.identify(metadata)
    assert Authenticator([]).identify(()) == ANONYMOUS and ANONYMOUS.may_see("anyone")


def test_token_settings_objects_and_plain_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "FORGEDIT_AUTH_TOKENS",
        '[{"name": "alice", "token": "a-token"}, {"name": "ops", "token": "o-token", '
        '"admin": true}, "plain-token"]',
    )
    settings = ServerSettings()
    assert "a-token" not in repr(settings) and "plain-token" not in repr(settings)
    names = [e.name for e in token_entries(settings.auth_tokens)]
    assert names[:2] == ["alice", "ops"] and names[2].startswith("token-")
    # Rotation: two tokens of one principal, both accepted as that principal.
    monkeypatch.setenv(
        "FORGEDIT_AUTH_TOKENS",
        '[{"name": "alice", "token": "old-token"}, {"name": "alice", "token": "new-token"}]',
    )
    auth = Authenticator(ServerSettings().auth_tokens)
    for token in ("old-token", "new-token"):
        assert auth.identify((("authorization", f"Bearer {token}"),)) == Principal("alice")
    for bad in (
        '[{"name": "a", "token": "t1"}, {"name": "a", "token": "t2", "admin": true}]',
        '[{"name": "a", "token": "t1"}, {"name": "b", "token": "t1"}]',  # one token twice
        '[{"name": "a b", "token": "t1"}]',  # not a usable name
        '[{"name": "a", "token": "t1", "admn": true}]',  # a typo is an error, not ignored
    ):
        monkeypatch.setenv("FORGEDIT_AUTH_TOKENS", bad)
        with pytest.raises(ValidationError):
            ServerSettings()


def _share(capacity: int, per_client: int, kept: int) -> ShareRule:
    return ShareRule(capacity, per_client, kept, "CAPACITY", "PER_CLIENT", "KEPT")


def test_stream_limiter_bounds_per_client_and_in_all() -> None:
    limiter = CallLimiter(
        stream_share(ServerSettings(max_streams=3, max_streams_per_client=2)),
        noun="open streams",
        subject="streams",
    )
    a1, a2 = limiter.acquire("a"), limiter.acquire("a")
    with pytest.raises(StreamLimitError, match="FORGEDIT_MAX_STREAMS_PER_CLIENT") as refused:
        limiter.acquire("a")
    assert refused.value.subject == "streams-per-client"
    b1 = limiter.acquire("b")
    with pytest.raises(StreamLimitError, match=r"FORGEDIT_MAX_STREAMS\b"):
        limiter.acquire("c")
    a1()
    a1()  # releasing twice frees one slot only
    assert limiter.open_calls == 2
    limiter.acquire("c")
    with pytest.raises(StreamLimitError):
        limiter.acquire("a")
    a2(), b1()
    assert limiter.open_calls == 1
    mapped = to_rpc_status(refused.value)
    assert mapped.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    quota = error_details_pb2.QuotaFailure()
    assert any(d.Unpack(quota) for d in mapped.status.details)
    assert quota.violations[0].subject == "streams-per-client"
    assert "FORGEDIT_MAX_STREAMS_PER_CLIENT" in quota.violations[0].description


def test_the_last_slots_are_kept_for_clients_that_hold_none() -> None:
    """Three greedy clients cannot take every slot (issue 21.3): with 12 slots, 4 per client
    and 3 kept for new clients, they get 4 + 4 + 1, and three more clients one each."""
    rule = _share(12, 4, 3)
    held: Counter[str] = Counter()

    def take(client: str) -> bool:
        if rule.refusal(held[client], sum(held.values())) is not None:
            return False
        held[client] += 1
        return True

    for greedy in ("a", "b", "c"):
        while take(greedy):
            pass
    assert (held["a"], held["b"], held["c"]) == (4, 4, 1)
    assert rule.refusal(held["c"], 9) == Refusal("kept-for-new-clients", 3, "KEPT", 1)
    assert [take(new) for new in ("d", "e", "f", "g")] == [True, True, True, False]
    assert rule.refusal(0, 12) == Refusal("capacity", 12, "CAPACITY", 0)
    # A slot that frees while the pool is that full goes to a client that holds none.
    held["a"] -= 1
    assert not take("a") and not take("d") and take("h")
    with pytest.raises(ValueError, match="KEPT"):
        _share(4, 4, 4)


def test_streams_must_leave_threads_for_unary_calls_and_health() -> None:
    with pytest.raises(ValidationError, match="FORGEDIT_MAX_STREAMS"):
        ServerSettings(grpc_threads=24, max_streams=16)
    ServerSettings(grpc_threads=24, max_streams=8)
    with pytest.raises(ValidationError, match="FORGEDIT_STREAMS_KEPT_FOR_NEW_CLIENTS"):
        ServerSettings(streams_kept_for_new_clients=48)
    with pytest.raises(ValidationError, match="FORGEDIT_QUEUE_KEPT_FOR_NEW_CLIENTS"):
        ServerSettings(queue_size=4, queue_kept_for_new_clients=4)
    defaults = ServerSettings(_env_file=None)  # type: ignore[call-arg]
    assert (defaults.streams_kept, defaults.queue_kept) == (12, 4)  # a quarter of each


def test_max_connection_age_becomes_channel_arguments() -> None:
    options = dict(server_options(MIB * 8, 300.0, 30.0))
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert options["grpc.max_connection_age_grace_ms"] == 30_000
    assert "grpc.max_connection_age_ms" not in dict(server_options(MIB * 8, None, None))


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


def test_time_priors_per_model_size_and_device(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from forgedit.config import default_stages
    from forgedit.zoo.tiny import sd1_unet_config
    from server.main import time_prior_key

    tiny = {"tiny": tiny_model_dir / "stable-diffusion"}
    assert time_prior_key(tiny, ServerSettings()) == "tiny-cpu"
    sd1 = tmp_path / "sd-1.5"
    (sd1 / "unet").mkdir(parents=True)
    (sd1 / "unet" / "config.json").write_text(json.dumps(sd1_unet_config()))
    cuda = ServerSettings(devices=["cuda:0"])
    assert time_prior_key({"sd-1.5": sd1}, cuda) == "sd1-cuda"

    # SD 1.x on an A100: 30-40 s of joint training, ~1.6 s per 50-step 512² image.
    prior = cuda.time_prior("sd1-cuda")
    joint_samples = sum(s.updates * s.batch_size for s in default_stages("joint"))
    assert 30 <= joint_samples * prior.training_sample_s <= 40
    assert 50 * prior.image_step_s == pytest.approx(1.6)

    # An operator sets their own; the other built-in priors stay.
    monkeypatch.setenv(
        "FORGEDIT_TIME_PRIORS", '{"sd1-cuda": {"training_sample_s": 0.05, "image_step_s": 0.02}}'
    )
    settings = ServerSettings()
    assert settings.time_prior("sd1-cuda").training_sample_s == 0.05
    assert settings.time_prior("tiny-cpu") == ServerSettings().time_prior("tiny-cpu")
    with pytest.raises(ValueError, match="FORGEDIT_TIME_PRIORS"):
        settings.time_prior("sd2-tpu")


def test_a_base_model_without_a_vae_is_served_with_vae_dirs(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from forgedit.errors import ModelDirectoryError
    from server.main import default_engine_factory

    no_vae = tmp_path / "novae"
    shutil.copytree(tiny_model_dir / "stable-diffusion", no_vae)
    shutil.move(no_vae / "vae", tmp_path / "vae")
    bases = {"rv-novae": no_vae}
    with pytest.raises(ModelDirectoryError, match="vae"):
        default_engine_factory(ServerSettings(base_models=bases), bases)("rv-novae", "cpu")
    settings = ServerSettings(base_models=bases, vae_dirs={"rv-novae": tmp_path / "vae"})
    engine = default_engine_factory(settings, bases)("rv-novae", "cpu")
    assert engine.base.vae is not None and engine.base.name == "rv-novae"
    with pytest.raises(ValidationError, match="FORGEDIT_VAE_DIRS"):
        ServerSettings(base_models=bases, vae_dirs={"other": tmp_path / "vae"})


def test_log_budget_allows_one_line_per_interval_and_counts_the_rest() -> None:
    now = [100.0]
    budget = LogBudget(10.0, clock=lambda: now[0])
    assert budget.take() == (True, 0)
    assert budget.take() == (False, 0) and budget.take() == (False, 0)
    now[0] += 10.0
    assert budget.take() == (True, 2)  # the next line reports the two left out
    assert budget.take() == (False, 0)


def test_tolerant_deserializer_names_the_type_and_the_bad_utf8_field() -> None:
    parse = tolerant_deserializer(pb.EditRequest.FromString)
    assert isinstance(
        parse(pb.EditRequest(target_prompts=["ok"]).SerializeToString()), pb.EditRequest
    )
    garbage = parse(b"\xff\xff\xff")
    assert isinstance(garbage, UnparsedRequest) and "forgedit.v1.EditRequest" in garbage.problem
    number = pb.EditRequest.DESCRIPTOR.fields_by_name["source_prompt"].number
    bad = parse(bytes([number << 3 | 2, 2, 0xC3, 0x28]))
    assert isinstance(bad, UnparsedRequest) and bad.field == "source_prompt"
    assert "UTF-8" in bad.problem
    # A repeated text field is found too; a nested one is named by its message only.
    prompts = pb.EditRequest.DESCRIPTOR.fields_by_name["target_prompts"].number
    ok = pb.EditRequest(target_prompts=["fine"]).SerializeToString()
    bad = parse(ok + bytes([prompts << 3 | 2, 1, 0xFF]))
    assert isinstance(bad, UnparsedRequest) and bad.field == "target_prompts"
    sweep = pb.EditRequest.DESCRIPTOR.fields_by_name["sweep"].number
    strategies = pb.SweepOptions.DESCRIPTOR.fields_by_name["forget_strategies"].number
    nested = bytes([strategies << 3 | 2, 1, 0xFF])
    bad = parse(bytes([sweep << 3 | 2, len(nested)]) + nested)
    assert isinstance(bad, UnparsedRequest) and bad.field == "request"
    assert "a text field of forgedit.v1.EditRequest is not valid UTF-8" in bad.problem


def test_an_edit_whose_batch_cannot_fit_a_device_is_refused_naming_the_limit() -> None:
    # The case: a valid 2048x2048 Edit with a training batch of 64.
    request = _edit(training=pb.TrainingOptions(height=2048, width=2048, batch_size=64))
    with pytest.raises(InvalidInputError) as refused:
        plan_edit(request, Limits(), BASES, "tiny")
    assert refused.value.field == "training.batch_size"
    assert "FORGEDIT_MAX_BATCH_PIXELS" in str(refused.value) and "2048x2048" in str(refused.value)
    mapped = to_rpc_status(refused.value)
    assert mapped.code == grpc.StatusCode.INVALID_ARGUMENT
    # The limit is a setting: the same request fits a device given a larger budget.
    roomy = Limits(max_batch_pixels=2048 * 2048 * 64)
    assert plan_edit(request, roomy, BASES, "tiny").training.stages[0].batch_size == 64


def test_forgedits_own_512_batch_of_10_fits_the_default_budget() -> None:
    request = _edit(training=pb.TrainingOptions(height=512, width=512, batch_size=10))
    settings = ServerSettings(_env_file=None)  # type: ignore[call-arg]
    plan = plan_edit(request, Limits.from_settings(settings), BASES, "tiny")
    assert plan.training.stages[0].batch_size == 10


def test_sampling_batches_shrink_to_fit_the_budget_and_one_image_must_fit() -> None:
    limits = Limits(max_batch_pixels=3 * 64 * 64, sampling_batch=8)
    assert validation.sampling_batch_size(64, 64, limits) == 3
    assert validation.sampling_batch_size(32, 32, limits) == 8
    sweep = plan_sample(
        pb.SampleRequest(edit_model_id="em_" + "a" * 26, target_prompts=["a dog"]),
        limits,
        _mode("joint"),
    ).sweep
    assert sweep.num_images == 3
    validation.check_sampling_memory(64, 64, limits)
    with pytest.raises(InvalidInputError, match="FORGEDIT_MAX_BATCH_PIXELS"):
        validation.check_sampling_memory(128, 128, limits)


def test_registry_calls_give_up_before_the_deadline_and_stay_bounded() -> None:
    from server.registry_client import RegistryCalls

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


def test_memory_exhaustion_behind_another_error_is_still_resource_exhausted() -> None:
    """Issue 21.4: a layer that wraps a MemoryError in its own error (the registry's, a
    loader's) does not turn it into the client's fault or an internal error."""
    from registry.errors import RegistryError

    try:
        try:
            raise MemoryError
        except MemoryError as e:
            raise RegistryError("the MLflow registry refused to load (MemoryError)") from e
    except RegistryError as wrapped:
        mapped = to_rpc_status(wrapped)
    assert mapped.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    kinds = {d.TypeName() for d in mapped.status.details}
    assert {"google.rpc.QuotaFailure", "google.rpc.RetryInfo"} <= kinds


def test_a_request_that_cannot_be_parsed_for_lack_of_memory_is_resource_exhausted() -> None:
    def no_memory(data: bytes) -> None:
        raise MemoryError

    parsed = tolerant_deserializer(no_memory)(b"\x0a\x00")
    assert isinstance(parsed, UnparsedRequest)
    assert to_rpc_status(parsed.error).code == grpc.StatusCode.RESOURCE_EXHAUSTED
