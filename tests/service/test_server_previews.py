"""Previews and output formats through a real server on the tiny model: the training-free
preview first (and off on request), x0 previews tied to each image and bounded, images in PNG,
WebP and JPEG, every bad combination refused with one field violation naming what is accepted,
the replay buffer keeping only each image's latest preview, a job cancelled during its preview,
previews past the byte budget dropped without failing the job, and the metrics."""

from __future__ import annotations

import io
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image
from support.server import (
    Harness,
    Outcome,
    assert_nothing_left_behind,
    edit_request,
    refused,
    running_server,
    sample_photo,
    stream,
    unary,
    wait_for,
)

from server._proto import forgedit_pb2 as pb
from server.main import default_engine_factory
from server.settings import ServerSettings

TWO_IMAGES = {"seeds": [3, 4]}  # 2 images of 2 steps (QUICK_SWEEP's steps and gamma)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Harness]:
    with running_server(tmp_path_factory.mktemp("server-previews"), tiny_model_dir) as h:
        yield h


def metric_values(h: Harness) -> dict[str, float]:
    url = f"http://127.0.0.1:{h.server.metrics_port}/metrics"
    values = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# -- the training-free preview ------------------------------------------------------------------


def test_the_first_look_arrives_first_and_can_be_turned_off(harness: Harness) -> None:
    """The metrics exist at 0 from start-up, then count the preview."""
    before = metric_values(harness)
    for kind, method in (("training_free", "Edit"), ("x0", "Edit"), ("x0", "Sample")):
        series = f'forgedit_time_to_first_preview_seconds_count{{kind="{kind}",method="{method}"}}'
        assert before[series] == 0.0
    assert 'forgedit_time_to_first_image_seconds_count{method="Sample"}' in before

    on = stream(harness.stub.Edit, edit_request(sample_photo()))
    assert on.code == grpc.StatusCode.OK, on.details
    kinds = [k for k in on.kinds() if k != "heartbeat"]
    assert kinds[:3] == ["accepted", "preview", "captioned"]
    preview = on.of("preview")
    assert len(preview) == 1 and preview[0].kind == pb.PREVIEW_KIND_TRAINING_FREE
    assert decoded(preview[0].data).size == (64, 64)
    assert on.of("completed")[0].timings.preview_seconds > 0

    off = stream(
        harness.stub.Edit,
        edit_request(sample_photo(), preview=pb.PreviewOptions(training_free=False)),
    )
    assert off.code == grpc.StatusCode.OK, off.details
    assert "preview" not in off.kinds()
    assert off.of("completed")[0].timings.preview_seconds == 0
    # Same seeds, same preview: the preview of the first request again.
    again = stream(harness.stub.Edit, edit_request(sample_photo()))
    assert again.of("preview")[0].data == preview[0].data

    after = metric_values(harness)
    first = 'forgedit_time_to_first_preview_seconds_count{kind="training_free",method="Edit"}'
    assert after[first] == 2.0
    assert after['forgedit_previews_total{kind="training_free",method="Edit"}'] == 2.0
    assert_nothing_left_behind(harness)


# -- x0 previews --------------------------------------------------------------------------------


def test_x0_previews_are_tied_to_each_image_and_replayed_latest_only(harness: Harness) -> None:
    request = edit_request(
        sample_photo(),
        request_id="x0-previews-1",
        sweep=TWO_IMAGES,
        preview=pb.PreviewOptions(x0_every=1),
    )
    outcome = stream(harness.stub.Edit, request)
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    x0 = [p for p in outcome.of("preview") if p.kind == pb.PREVIEW_KIND_X0_ESTIMATE]
    assert sorted((p.index, p.step) for p in x0) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(p.steps == 2 and (p.width, p.height) == (8, 8) for p in x0)  # 1/8 of 64²
    assert all(decoded(p.data).size == (8, 8) for p in x0)
    # Each image's previews come before the image itself.
    kinds = outcome.kinds()
    assert kinds.index("image") > max(
        i for i, e in enumerate(outcome.events) if e.WhichOneof("kind") == "preview"
    )

    # A replay keeps only the latest preview of each kind and image; every other event stays.
    job_id = outcome.events[0].job_id
    replay = stream(harness.stub.WatchJob, pb.WatchJobRequest(job_id=job_id))
    assert replay.code == grpc.StatusCode.OK, replay.details
    replayed = [(p.kind, p.index, p.step) for p in replay.of("preview")]
    assert sorted(replayed) == [
        (pb.PREVIEW_KIND_TRAINING_FREE, 0, 10),
        (pb.PREVIEW_KIND_X0_ESTIMATE, 0, 2),
        (pb.PREVIEW_KIND_X0_ESTIMATE, 1, 2),
    ]
    live = [e for e in outcome.events if e.WhichOneof("kind") not in ("preview", "heartbeat")]
    again = [e for e in replay.events if e.WhichOneof("kind") not in ("preview", "heartbeat")]
    assert [e.sequence for e in again] == [e.sequence for e in live]

    # A Sample takes x0 previews too, but has no training-free preview.
    model = outcome.of("completed")[0].edit_model_id
    sample = stream(
        harness.stub.Sample,
        pb.SampleRequest(
            edit_model_id=model,
            target_prompts=["A photo of a plum."],
            sweep=pb.SweepOptions(steps=2, gammas=[0.6], seeds=[5]),
            preview=pb.PreviewOptions(x0_every=2),
        ),
    )
    assert sample.code == grpc.StatusCode.OK, sample.details
    assert [(p.kind, p.index, p.step) for p in sample.of("preview")] == [
        (pb.PREVIEW_KIND_X0_ESTIMATE, 0, 2)
    ]
    values = metric_values(harness)
    assert values['forgedit_time_to_first_preview_seconds_count{kind="x0",method="Sample"}'] == 1
    assert_nothing_left_behind(harness)


def test_x0_and_preview_options_out_of_bounds_are_refused(harness: Harness) -> None:
    photo = sample_photo()
    for x0_every, needle in ((0, "must be 1..2"), (3, "must be 1..2")):
        outcome = stream(
            harness.stub.Edit,
            edit_request(photo, preview=pb.PreviewOptions(x0_every=x0_every)),
        )
        refused(outcome, "preview.x0_every", needle)
    # More than FORGEDIT_PREVIEW_MAX_X0 (256): 256 images x 2 steps.
    many = edit_request(
        photo,
        sweep={"seeds": list(range(64)), "gammas": [0.5, 0.6, 0.7, 0.8]},
        preview=pb.PreviewOptions(x0_every=1),
    )
    refused(
        stream(harness.stub.Edit, many),
        "preview.x0_every",
        "asks for 512 x0 previews; at most 256",
        "FORGEDIT_PREVIEW_MAX_X0",
        "at least 2",
    )
    models, _ = unary(harness.stub.ListEditModels, pb.ListEditModelsRequest())
    sample = pb.SampleRequest(
        edit_model_id=models.edit_models[0].edit_model_id,
        target_prompts=["A photo of a plum."],
        sweep=pb.SweepOptions(steps=2, gammas=[0.6], seeds=[5]),
        preview=pb.PreviewOptions(training_free=True),
    )
    refused(stream(harness.stub.Sample, sample), "preview.training_free", "fine-tunes nothing")
    assert_nothing_left_behind(harness)


# -- output formats -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_format", "quality", "pil", "suffix"),
    [(pb.IMAGE_FORMAT_WEBP, 40, "WEBP", ".webp"), (pb.IMAGE_FORMAT_JPEG, None, "JPEG", ".jpg")],
)
def test_images_previews_and_the_contact_sheet_come_in_the_format_asked(
    harness: Harness, image_format: int, quality: int | None, pil: str, suffix: str
) -> None:
    output = pb.OutputOptions(format=image_format)  # type: ignore[arg-type]
    if quality is not None:
        output.quality = quality
    request = edit_request(
        sample_photo(),
        sweep=TWO_IMAGES,
        training={"seed": 100 + image_format},  # a fresh fine-tune: it gets a contact sheet
        output=output,
    )
    outcome = stream(harness.stub.Edit, request)
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    images = outcome.of("image")
    assert len(images) == 2
    for image in images:
        assert image.WhichOneof("encoded") == "data" and not image.png
        assert image.format == image_format
        assert decoded(image.data).format == pil and decoded(image.data).size == (64, 64)
    preview = outcome.of("preview")[0]
    assert preview.format == image_format and decoded(preview.data).format == pil

    # The registry's contact sheet is encoded the same way, named by its encoding.
    model = outcome.of("completed")[0].edit_model_id
    info = harness.registry.show(model)
    artifacts = Path(harness.registry.config.data_dir)  # the embedded store lives here
    sheets = [p for p in artifacts.rglob("contact_sheet.*") if info.run_id in str(p)]
    assert [p.suffix for p in sheets] == [suffix]
    assert decoded(sheets[0].read_bytes()).format == pil
    assert_nothing_left_behind(harness)


def test_a_lower_quality_gives_fewer_bytes_of_the_same_image(harness: Harness) -> None:
    sizes = {}
    for quality in (5, 95):
        output = pb.OutputOptions(format=pb.IMAGE_FORMAT_JPEG, quality=quality)
        request = edit_request(
            sample_photo(), preview=pb.PreviewOptions(training_free=False), output=output
        )
        outcome = stream(harness.stub.Edit, request)
        assert outcome.code == grpc.StatusCode.OK, outcome.details
        sizes[quality] = len(outcome.of("image")[0].data)
    assert sizes[5] < sizes[95]


@pytest.mark.parametrize(
    ("output", "field", "needles"),
    [
        (pb.OutputOptions(quality=80), "output.quality", ("webp and jpeg", "png is lossless")),
        (
            pb.OutputOptions(format=pb.IMAGE_FORMAT_PNG, quality=80),
            "output.quality",
            ("webp and jpeg",),
        ),
        (pb.OutputOptions(format=pb.IMAGE_FORMAT_JPEG, quality=0), "output.quality", ("1..100",)),
        (pb.OutputOptions(format=pb.IMAGE_FORMAT_WEBP, quality=101), "output.quality", ("1..100",)),
        (
            pb.OutputOptions(format=9),  # type: ignore[arg-type]
            "output.format",
            ("unknown image format 9", "IMAGE_FORMAT_PNG, IMAGE_FORMAT_WEBP, IMAGE_FORMAT_JPEG"),
        ),
    ],
)
def test_bad_format_and_quality_combinations_are_refused(
    harness: Harness, output: Any, field: str, needles: tuple[str, ...]
) -> None:
    refused(stream(harness.stub.Edit, edit_request(sample_photo(), output=output)), field, *needles)


# -- a cancelled preview, a spent budget ---------------------------------------------------------


class SlowPreviewEngine:
    """The real engine, whose training-free preview first waits (checking the job's cancel
    token as the real one does at every step) until ``release`` is set: a cancel then lands
    during the preview."""

    def __init__(self, engine: Any, started: threading.Event, release: threading.Event):
        self._engine = engine
        self._started = started
        self._release = release

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def preview(self, *args: Any, cancel: Any = None, **kwargs: Any) -> Any:
        self._started.set()
        deadline = time.monotonic() + 60
        while not self._release.is_set() and time.monotonic() < deadline:
            if cancel is not None and cancel.cancelled:
                break
            time.sleep(0.01)
        return self._engine.preview(*args, cancel=cancel, **kwargs)


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Any]:
    started, release = threading.Event(), threading.Event()
    settings = ServerSettings(
        base_models={"tiny": tiny_model_dir / "stable-diffusion"}, blip_dir=tiny_model_dir / "blip"
    )
    real = default_engine_factory(settings, dict(settings.base_models))
    with running_server(
        tmp_path_factory.mktemp("server-previews-slow"),
        tiny_model_dir,
        engine_factory=lambda name, device: SlowPreviewEngine(real(name, device), started, release),
        preview_max_bytes=1,  # every preview is over budget
    ) as h:
        yield h, started, release
        release.set()


def test_a_job_cancelled_during_its_preview_ends_cancelled_and_registers_nothing(
    slow: Any,
) -> None:
    h, started, release = slow
    started.clear()
    release.clear()
    outcome: list[Outcome] = []
    job_ids: list[str] = []

    def edit() -> None:
        request = edit_request(sample_photo())
        outcome.append(stream(h.stub.Edit, request, on_event=lambda e, _: job_ids.append(e.job_id)))

    thread = threading.Thread(target=edit)
    thread.start()
    assert started.wait(60) and wait_for(lambda: bool(job_ids))
    cancelled, _ = unary(h.stub.CancelJob, pb.CancelJobRequest(job_id=job_ids[0]))
    assert cancelled.job.state in (pb.JOB_STATE_CANCELLING, pb.JOB_STATE_CANCELLED)
    thread.join(60)
    (ended,) = outcome
    assert ended.code == grpc.StatusCode.CANCELLED, ended.details
    assert "preview" not in ended.kinds() and "captioned" not in ended.kinds()
    models, _ = unary(h.stub.ListEditModels, pb.ListEditModelsRequest())
    assert list(models.edit_models) == []
    assert_nothing_left_behind(h)


def test_previews_past_the_byte_budget_are_dropped_and_the_job_goes_on(slow: Any) -> None:
    h, _, release = slow
    release.set()
    outcome = stream(
        h.stub.Edit, edit_request(sample_photo(), preview=pb.PreviewOptions(x0_every=1))
    )
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert "preview" not in outcome.kinds() and len(outcome.of("image")) == 1
    values = metric_values(h)
    # The training-free preview and the x0 previews of 1 image x 2 steps: 3 dropped.
    assert values['forgedit_previews_dropped_total{method="Edit"}'] == 3
    assert_nothing_left_behind(h)
