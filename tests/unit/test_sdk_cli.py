"""Unit tests of the ``forgedit`` command line (no sockets): argument parsing, the options it
sends, file naming, the contact sheet, and exit statuses, with the scripted fake stub of
test_sdk_client.py standing in for the server."""

from __future__ import annotations

import io
import json
from pathlib import Path

import forgedit_client.cli as cli
import grpc
import pytest
from forgedit_client import ForgeditClient
from forgedit_client._proto import forgedit_pb2 as pb
from forgedit_client.cli.parser import build_parser
from forgedit_client.cli.sheet import _drawable, _font, contact_sheet
from forgedit_client.events import event_from_proto
from forgedit_client.options import split_options
from PIL import Image
from test_sdk_client import FakeRpcError, FakeStub, bad_request, edit_job_events, event


def png(color: str = "red", size: tuple[int, int] = (16, 12)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(png("blue", (32, 32)))
    return path


def run_cli(monkeypatch: pytest.MonkeyPatch, stub: FakeStub, argv: list[str]) -> int:
    """Run the CLI with its client talking to ``stub``."""
    monkeypatch.setattr(
        cli, "_client", lambda args: ForgeditClient("fake:1", stub=stub, sleep=lambda s: None)
    )
    return cli.main(argv)


def real_png_events(job: str = "job-1") -> list[pb.Event]:
    """edit_job_events with decodable PNGs (the contact sheet opens them)."""
    events = edit_job_events(job)
    for e in events:
        if e.WhichOneof("kind") == "image":
            e.image.png = png("green")
    return events


# ------------------------------------------------------------------------------- parsing


def test_edit_flags_parse_to_python_values_and_global_flags_work_after_the_command() -> None:
    args = build_parser().parse_args(
        [
            "edit",
            "cat.png",
            "a dog",
            "a fox",
            "--out",
            "o",
            "--gammas",
            "0.5, 0.6",
            "--forget",
            "encoderkv,decoderattn+decoder2",
            "--seeds",
            "1,2",
            "--size",
            "512x384",
            "--mode",
            "two_stage",
            "--train-seed",
            "9",
            "--json",
            "--server",
            "h:1",
        ]
    )
    assert args.prompts == ["a dog", "a fox"] and args.gammas == [0.5, 0.6]
    assert args.forget == ["encoderkv", "decoderattn+decoder2"] and args.seeds == [1, 2]
    assert args.size == (512, 384) and args.json and args.server == "h:1"
    options = cli.job_options(args)
    assert options == {
        "gammas": [0.5, 0.6],
        "forget": ["encoderkv", "decoderattn+decoder2"],
        "seeds": [1, 2],
        "mode": "two_stage",
        "train_seed": 9,
        "width": 512,
        "height": 384,
    }  # unset flags stay unset


def test_connection_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGEDIT_SERVER", "svc:7")
    monkeypatch.setenv("FORGEDIT_TOKEN", "tok-from-env")
    args = build_parser().parse_args(["models", "list"])
    assert (args.server, args.token, args.json) == ("svc:7", "tok-from-env", False)


def test_help_never_prints_the_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FORGEDIT_TOKEN", "tok-secret-value")
    for argv in (["--help"], ["edit", "--help"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
    assert "tok-secret-value" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["edit", "x.png", "p", "--out", "o", "--gammas", "a,b"],
        ["edit", "x.png", "p", "--out", "o", "--size", "512"],
        ["edit", "x.png", "p", "--out", "o", "--seeds", "-1"],
        ["edit", "x.png", "p"],  # --out is required
        ["sample", "em-1", "p", "--out", "o", "--mode", "joint"],  # no training for a stored model
    ],
)
def test_bad_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


# ------------------------------------------------------------------------- files, sheet


def test_image_filenames_are_safe_and_say_what_the_image_is() -> None:
    vs = event_from_proto(
        event(
            1,
            image=pb.ImageEvent(
                index=3,
                params=pb.ImageParams(
                    forget="decoderattn+decoder2",
                    interpolation=pb.INTERPOLATION_VS,
                    gamma=0.6,
                    seed=1,
                ),
            ),
        )
    )
    vp = event_from_proto(
        event(
            2,
            image=pb.ImageEvent(
                index=12,
                params=pb.ImageParams(
                    forget="../x y", interpolation=pb.INTERPOLATION_VP, gamma=1.2, alpha=0.9, seed=2
                ),
            ),
        )
    )
    assert cli.image_filename(vs) == "003-decoderattn+decoder2-g0.6-seed1.png"  # type: ignore[arg-type]
    assert cli.image_filename(vp) == "012-.._x_y-b1.2-a0.9-seed2.png"  # type: ignore[arg-type]


def test_contact_sheet_is_a_grid_of_captioned_tiles() -> None:
    tiles = [(png("blue", (64, 32)), "input")] + [
        (png("green"), f"encoderkv γ=0.{i} seed=1") for i in range(5)
    ]
    with Image.open(io.BytesIO(contact_sheet(tiles))) as sheet:
        assert sheet.format == "PNG"
        width, height = sheet.size
    assert width > height > 0  # 6 tiles: 3 columns × 2 rows
    with pytest.raises(ValueError):
        contact_sheet([])


def test_greek_letters_are_spelled_out_only_when_the_font_lacks_them() -> None:
    font = _font()
    text = _drawable("encoderkv γ=0.6 seed=1", font)
    assert text in ("encoderkv γ=0.6 seed=1", "encoderkv gamma=0.6 seed=1")
    assert _drawable("plain", font) == "plain"


# ---------------------------------------------------------------------- runs and statuses


def test_edit_writes_every_image_results_and_sheet(
    monkeypatch: pytest.MonkeyPatch,
    photo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stub = FakeStub({"Edit": [real_png_events()]})
    out = tmp_path / "out"
    status = run_cli(
        monkeypatch,
        stub,
        [
            "--json",
            "edit",
            str(photo),
            "a dog",
            "--out",
            str(out),
            "--gammas",
            "0.5,0.6",
            "--quiet",
        ],
    )
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["edit_model_id"] == "em-1" and summary["train_seed"] == 42
    assert sorted(p.name for p in out.iterdir()) == [
        "000-donotforget-g0.5-seed0.png",
        "001-donotforget-g0.6-seed1.png",
        "contact_sheet.png",
        "results.json",
    ]
    assert stub.calls[0][1].image == photo.read_bytes()


def test_previews_are_written_as_they_come_and_images_by_their_format(
    monkeypatch: pytest.MonkeyPatch,
    photo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    events = real_png_events()
    for e in events:  # this server answered in WebP
        if e.WhichOneof("kind") == "image":
            e.image.data, e.image.format = png("blue"), pb.IMAGE_FORMAT_WEBP
    shown = [
        pb.PreviewEvent(kind=pb.PREVIEW_KIND_TRAINING_FREE, data=b"first", format=2, step=10),
        pb.PreviewEvent(kind=pb.PREVIEW_KIND_X0_ESTIMATE, index=1, data=b"early", format=2),
        pb.PreviewEvent(kind=pb.PREVIEW_KIND_X0_ESTIMATE, index=1, data=b"late", format=2),
        pb.PreviewEvent(kind=7, data=b"from a newer server", format=2),  # skipped
    ]
    for i, preview in enumerate(shown):
        events.insert(1 + i, event(2 + i, "job-1", preview=preview))
    out = tmp_path / "out"
    argv = ["--json", "edit", str(photo), "a dog", "--out", str(out), "--image-format", "webp"]
    status = run_cli(monkeypatch, FakeStub({"Edit": [events]}), [*argv, "--x0-every", "4"])
    assert status == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["preview"] == "preview.webp" and summary["previews"] == 4
    assert (out / "preview.webp").read_bytes() == b"first"
    assert (out / "previews" / "x0-001.webp").read_bytes() == b"late"  # the latest only
    assert sorted(p.name for p in out.iterdir()) == [
        "000-donotforget-g0.5-seed0.webp",
        "001-donotforget-g0.6-seed1.webp",
        "contact_sheet.png",
        "preview.webp",
        "previews",
        "results.json",
    ]
    args = build_parser().parse_args([*argv[1:], "--image-quality", "70", "--no-preview"])
    assert cli.job_options(args) == {
        "image_format": "webp",
        "image_quality": 70,
        "training_free_preview": False,
    }
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "em-1", "a dog", "--out", "o", "--no-preview"])


def test_invalid_argument_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
    photo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    error = FakeRpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        "steps must be 1..200, got 0",
        bad_request("sweep.steps", "steps must be 1..200, got 0"),
    )
    stub = FakeStub({"Edit": [[error]]})
    status = run_cli(monkeypatch, stub, ["edit", str(photo), "a dog", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err == ["forgedit: error: INVALID_ARGUMENT: steps must be 1..200, got 0"]


def test_other_statuses_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stub = FakeStub(
        unary={"GetEditModel": [FakeRpcError(grpc.StatusCode.NOT_FOUND, "no edit model 'em-x'")]}
    )
    assert run_cli(monkeypatch, stub, ["models", "show", "em-x"]) == 1
    assert capsys.readouterr().err.strip() == ("forgedit: error: NOT_FOUND: no edit model 'em-x'")


def test_missing_image_file_exits_2(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = run_cli(
        monkeypatch,
        FakeStub(),
        ["edit", str(tmp_path / "nope.png"), "a dog", "--out", str(tmp_path)],
    )
    assert status == 2 and "image file not found" in capsys.readouterr().err


def test_ctrl_c_cancels_the_job_and_exits_130(
    monkeypatch: pytest.MonkeyPatch,
    photo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    events = real_png_events()
    stub = FakeStub(
        {"Edit": [[*events[:3], KeyboardInterrupt()]]},
        unary={"CancelJob": [pb.CancelJobResponse(job=pb.Job(job_id="job-1"))]},
    )
    status = run_cli(monkeypatch, stub, ["edit", str(photo), "a dog", "--out", str(tmp_path)])
    assert status == 130
    assert stub.methods() == ["Edit", "CancelJob"] and stub.calls[1][1].job_id == "job-1"
    assert "cancel" in capsys.readouterr().err


def test_ctrl_c_with_detach_leaves_the_job_running(
    monkeypatch: pytest.MonkeyPatch,
    photo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    events = real_png_events()
    stub = FakeStub({"Edit": [[*events[:3], KeyboardInterrupt()]]})
    status = run_cli(
        monkeypatch, stub, ["edit", str(photo), "a dog", "--out", str(tmp_path), "--detach"]
    )
    assert status == 130 and stub.methods() == ["Edit"]
    assert stub.calls[0][1].detach
    assert "forgedit jobs watch job-1" in capsys.readouterr().err


def test_models_list_paginates_and_prints_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pages = [
        pb.ListEditModelsResponse(
            edit_models=[pb.EditModel(edit_model_id="a")], next_page_token="t"
        ),
        pb.ListEditModelsResponse(edit_models=[pb.EditModel(edit_model_id="b")]),
    ]
    stub = FakeStub(unary={"ListEditModels": pages})
    assert run_cli(monkeypatch, stub, ["--json", "models", "list"]) == 0
    assert [m["edit_model_id"] for m in json.loads(capsys.readouterr().out)] == ["a", "b"]


def test_jobs_watch_needs_exactly_one_id(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(monkeypatch, FakeStub(), ["jobs", "watch"]) == 2
    assert "exactly one" in capsys.readouterr().err


def test_per_stage_flags_and_a_fresh_seed_mean_what_the_engine_cli_means(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = build_parser().parse_args(
        [
            "edit",
            "cat.png",
            "a dog",
            "--mode",
            "two_stage",
            "--updates",
            "5,7",
            "--batch-size",
            "2",
            "--train-seed",
            "random",
            "--out",
            "o",
            "--server",
            "h:1",
        ]
    )
    options = cli.job_options(args)
    assert options == {
        "mode": "two_stage",
        "updates": 5,
        "stage2_updates": 7,
        "batch_size": 2,
        "fresh_seed": True,
    }
    training = split_options(options).training
    msg = training.to_proto()
    assert (msg.updates, msg.stage2_updates, msg.batch_size, msg.fresh_seed) == (5, 7, 2, True)
    assert not msg.HasField("stage2_batch_size") and not msg.HasField("seed")
    with pytest.raises(SystemExit):
        build_parser().parse_args(
            ["edit", "cat.png", "a dog", "--out", "o", "--updates", "1,2,3", "--server", "h:1"]
        )
    assert "at most 2" in capsys.readouterr().err
