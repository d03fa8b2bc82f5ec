"""Bad input against a real server: every item gets the stated status with machine-readable
details, and leaves nothing behind (no job queued or running, no temp file, no edit model
registered, the server still ready). Limits are enforced before any decoding or model work."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from support.server import (
    Harness,
    assert_nothing_left_behind,
    edit_request,
    encoded,
    png_claiming,
    psd_bytes,
    running_server,
    sample_photo,
    stream,
    unary,
    wait_for,
)

from server._proto import forgedit_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Harness]:
    with running_server(tmp_path_factory.mktemp("server-validation"), tiny_model_dir) as h:
        yield h


@pytest.fixture(scope="module")
def photo() -> bytes:
    return sample_photo()


def _no_edit_model_registered(h: Harness) -> None:
    listed, outcome = unary(h.stub.ListEditModels, pb.ListEditModelsRequest())
    assert outcome.code == grpc.StatusCode.OK
    assert list(listed.edit_models) == [], "a bad request registered an edit model"


def _expect_invalid(
    h: Harness, request: pb.EditRequest | pb.SampleRequest, field: str, *words: str
) -> None:
    call = h.stub.Edit if isinstance(request, pb.EditRequest) else h.stub.Sample
    outcome = stream(call, request)
    assert outcome.code == INVALID, (outcome.code, outcome.details)
    assert outcome.events == [], "a refused request must not create a job"
    assert outcome.field_violations() == [field], outcome.details
    for word in words:
        assert word.lower() in outcome.details.lower(), outcome.details
    assert_nothing_left_behind(h)
    _no_edit_model_registered(h)


def test_empty_request(harness: Harness) -> None:
    _expect_invalid(harness, pb.EditRequest(), "image", "required")
    _expect_invalid(harness, pb.SampleRequest(), "edit_model_id", "not valid")


def test_garbage_image_bytes(harness: Harness) -> None:
    _expect_invalid(harness, edit_request(b"\x00\x01garbage" * 100), "image", "not an image")


def test_png_header_claiming_20000x20000(harness: Harness) -> None:
    _expect_invalid(harness, edit_request(png_claiming(20000, 20000)), "image", "pixels")


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "PSD"])
def test_formats_other_than_png_jpeg_webp(harness: Harness, fmt: str) -> None:
    data = psd_bytes() if fmt == "PSD" else encoded(fmt)
    _expect_invalid(harness, edit_request(data), "image", fmt, "PNG, JPEG, WEBP")


def test_truncated_jpeg(harness: Harness, photo: bytes) -> None:
    _expect_invalid(harness, edit_request(photo[: len(photo) // 2]), "image", "truncated")


def test_message_over_the_size_limit(harness: Harness) -> None:
    huge = edit_request(b"\x89PNG" + b"\x00" * (65 * 1024 * 1024))
    outcome = stream(harness.stub.Edit, huge)
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert outcome.events == []
    assert_nothing_left_behind(harness)


def test_image_over_the_image_limit(harness: Harness) -> None:
    # Below the message limit, above FORGEDIT_MAX_IMAGE_BYTES: refused before decoding.
    big = edit_request(b"\x89PNG" + b"\x00" * (33 * 1024 * 1024))
    _expect_invalid(harness, big, "image", "MiB")


@pytest.mark.parametrize(
    "prompt, words",
    [
        ("x" * (1024 * 1024), ("characters", "1000")),
        ("A photo of a \x00dog.", ("control characters",)),
        ("A photo\x1b[31m of a dog.", ("control characters",)),
        ("   ", ("non-empty",)),
    ],
    ids=["1MB", "nul", "escape", "blank"],
)
def test_bad_prompts(harness: Harness, photo: bytes, prompt: str, words: tuple) -> None:
    _expect_invalid(harness, edit_request(photo, prompt), "target_prompts", *words)


def test_bad_source_prompt(harness: Harness, photo: bytes) -> None:
    _expect_invalid(
        harness, edit_request(photo, source_prompt="a\x07b"), "source_prompt", "control"
    )


@pytest.mark.parametrize("steps", [0, 10**9])
def test_steps_out_of_range(harness: Harness, photo: bytes, steps: int) -> None:
    _expect_invalid(harness, edit_request(photo, sweep={"steps": steps}), "sweep.steps", "1..")


@pytest.mark.parametrize("guidance", [math.nan, math.inf])
def test_non_finite_guidance(harness: Harness, photo: bytes, guidance: float) -> None:
    _expect_invalid(
        harness, edit_request(photo, sweep={"guidance": guidance}), "sweep.guidance", "finite"
    )


def test_ten_thousand_gammas(harness: Harness, photo: bytes) -> None:
    gammas = [i / 10000 for i in range(10_000)]
    _expect_invalid(
        harness, edit_request(photo, sweep={"gammas": gammas}), "sweep.gammas", "10000", "64"
    )


def test_alphas_with_vs_are_refused_as_the_engine_cli_refuses_them(
    harness: Harness, photo: bytes
) -> None:
    """One rule for the CLI and the server (forgedit.requests.build_sweep): vs has no α."""
    _expect_invalid(
        harness,
        edit_request(photo, sweep={"alphas": [0.9]}),
        "sweep.alphas",
        "applies only to sweep.interpolation vp",
    )


def test_sweep_too_large(harness: Harness, photo: bytes) -> None:
    sweep = {"gammas": [0.1 * i for i in range(10)], "seeds": list(range(30))}
    _expect_invalid(harness, edit_request(photo, sweep=sweep), "sweep", "300 images")


@pytest.mark.parametrize("name", ["forgeteverything", "../x", "ENCODERATTN"])
def test_unknown_forgetting_strategy(harness: Harness, photo: bytes, name: str) -> None:
    _expect_invalid(
        harness,
        edit_request(photo, sweep={"forget_strategies": [name]}),
        "sweep.forget_strategies",
        "encoderattn",
    )


def test_training_out_of_range(harness: Harness, photo: bytes) -> None:
    _expect_invalid(harness, edit_request(photo, training={"updates": 0}), "training.updates")
    _expect_invalid(
        harness, edit_request(photo, training={"updates": 10**6}), "training.updates", "5000"
    )
    _expect_invalid(
        harness, edit_request(photo, training={"width": 100}), "training.width", "multiple of 8"
    )
    _expect_invalid(harness, edit_request(photo, training={"seed": 2**64 - 1}), "training.seed")


def test_unknown_delta_format(harness: Harness, photo: bytes) -> None:
    _expect_invalid(
        harness,
        edit_request(photo, training={"delta_format": 7}),
        "training.delta_format",
        "unknown delta format 7",
        "DELTA_FORMAT_FP32, DELTA_FORMAT_FP16, DELTA_FORMAT_INT8",
    )


def test_unknown_base_model_and_bad_request_id(harness: Harness, photo: bytes) -> None:
    _expect_invalid(harness, edit_request(photo, base_model="sd15"), "base_model", "tiny")
    _expect_invalid(harness, edit_request(photo, request_id="a b/c"), "request_id")


@pytest.mark.parametrize("model_id", ["../../etc/passwd", "em_" + "a" * 200, "", "EM_x"])
def test_malformed_edit_model_id(harness: Harness, model_id: str) -> None:
    _expect_invalid(
        harness, pb.SampleRequest(edit_model_id=model_id, target_prompts=["x"]), "edit_model_id"
    )
    for call, request in (
        (harness.stub.GetEditModel, pb.GetEditModelRequest(edit_model_id=model_id)),
        (harness.stub.DeleteEditModel, pb.DeleteEditModelRequest(edit_model_id=model_id)),
    ):
        _, outcome = unary(call, request)
        assert outcome.code == INVALID
        assert outcome.field_violations() == ["edit_model_id"]
        assert "/etc" not in outcome.details.replace("'../../etc/passwd'", "")


def test_unknown_edit_model_id_is_not_found(harness: Harness) -> None:
    unknown = "em_" + "a" * 26
    outcome = stream(
        harness.stub.Sample, pb.SampleRequest(edit_model_id=unknown, target_prompts=["x"])
    )
    assert outcome.code == grpc.StatusCode.NOT_FOUND and outcome.events == []
    info = outcome.detail(error_details_pb2.ResourceInfo)
    assert info.resource_type == "edit_model" and info.resource_name == unknown
    for call, request in (
        (harness.stub.GetEditModel, pb.GetEditModelRequest(edit_model_id=unknown)),
        (harness.stub.DeleteEditModel, pb.DeleteEditModelRequest(edit_model_id=unknown)),
    ):
        _, outcome = unary(call, request)
        assert outcome.code == grpc.StatusCode.NOT_FOUND
    assert_nothing_left_behind(harness)


def test_deadline_shorter_than_the_estimate_is_refused_up_front(
    harness: Harness, photo: bytes
) -> None:
    request = edit_request(photo, training={"updates": 5000, "batch_size": 10})
    outcome = stream(harness.stub.Edit, request, timeout=3.0)
    assert outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert outcome.events == []
    info = outcome.detail(error_details_pb2.ErrorInfo)
    assert info.reason == "DEADLINE_TOO_SHORT"
    assert float(info.metadata["estimated_seconds"]) > 3.0
    assert_nothing_left_behind(harness)
    _no_edit_model_registered(harness)


def test_list_filters_are_validated(harness: Harness) -> None:
    _, outcome = unary(
        harness.stub.ListEditModels, pb.ListEditModelsRequest(image_sha256="not-a-hash")
    )
    assert outcome.code == INVALID and outcome.field_violations() == ["image_sha256"]
    _, outcome = unary(harness.stub.ListEditModels, pb.ListEditModelsRequest(page_token="!!"))
    assert outcome.code == INVALID and outcome.field_violations() == ["page_token"]


def test_metrics_exposition_passes_promtool(harness: Harness) -> None:
    """Scrape /metrics after a refused request and lint the exposition with promtool."""
    assert stream(harness.stub.Edit, pb.EditRequest()).code == INVALID
    url = f"http://127.0.0.1:{harness.server.metrics_port}/metrics"
    refused = 'forgedit_rpc_duration_seconds_count{code="INVALID_ARGUMENT",method="Edit"}'

    def scrape() -> bytes:
        return bytes(urllib.request.urlopen(url, timeout=10).read())

    # The call's duration is observed when the server finishes the RPC, a moment after the
    # client has seen its status.
    assert wait_for(lambda: refused in scrape().decode(), timeout=10)
    body = scrape()
    text = body.decode()
    for name in (
        "forgedit_queue_depth",
        "forgedit_running_jobs",
        "forgedit_queue_wait_seconds",
        "forgedit_time_to_first_image_seconds",
        "forgedit_cancellations_total",
        "forgedit_registry_cached_edit_models",
    ):
        assert name in text, name
    assert not re.search(r"job_[0-9a-f]{32}|em_[a-z2-7]{26}", text)  # never an ID in a label
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30
    )
    assert result.returncode == 0, (result.stdout + result.stderr).decode()[-2000:]
