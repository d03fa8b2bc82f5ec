"""``python -m forgedit``: argument checking, one-line errors with exit status 2 before any
model is loaded, nothing left behind on failure or Ctrl-C, and end-to-end runs on the tiny
model."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from forgedit import cli
from forgedit.cli.arguments import check_edit_args
from forgedit.cli.output import StagedOutput
from forgedit.cli.parser import build_parser
from forgedit.cli.progress import Progress
from forgedit.config import TrainingConfig, content_seed
from forgedit.events import CancelToken
from forgedit.images import image_file_name, slug

# The end-to-end settings: tiny model, 64x64, 4 DDIM steps, 2 updates of batch 2.
FAST = ["--size", "64x64", "--steps", "4", "--updates", "2", "--batch-size", "2"]


def run(capsys: pytest.CaptureFixture[str], *argv: object, cancel: CancelToken | None = None):
    code = cli.main([str(a) for a in argv], cancel=cancel)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def edit(capsys, image: object, out: object, *extra: object, cancel: CancelToken | None = None):
    """``edit IMAGE --prompt 'A dog.' --out OUT EXTRA...``"""
    return run(capsys, "edit", image, "--prompt", "A dog.", "--out", out, *extra, cancel=cancel)


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Validation must fail before any model is loaded or the tiny model is built."""
    import forgedit.engine
    import forgedit.zoo.tiny

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the arguments were validated")

    monkeypatch.setattr(forgedit.engine.Engine, "load", refuse)
    monkeypatch.setattr(forgedit.zoo.tiny, "ensure_tiny_model", refuse)
    yield


def assert_bad_input(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- bad input: exit 2, one line, nothing written --------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[:800]


def _bmp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "BMP")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (None, ["does not exist"]),
        (b"", ["is empty"]),
        (b"GIF89a? no, just garbage" * 10, ["not an image", "PNG, JPEG, WEBP"]),
        (_truncated_jpeg(), ["truncated"]),
        (_png_header_only(20000, 20000), ["at most 40,000,000 pixels"]),
        (_bmp(), ["is a BMP image", "accepted formats: PNG, JPEG, WEBP"]),
    ],
    ids=["missing", "empty", "garbage", "truncated", "bomb", "bmp"],
)
def test_bad_images(capsys, tmp_path, monkeypatch, no_model_loading, content, needles):
    monkeypatch.chdir(tmp_path)
    if content is not None:
        Path("input.jpg").write_bytes(content)
    code, out, err = edit(capsys, "input.jpg", "out")
    assert_bad_input(code, out, err, "'input.jpg'", *needles)
    assert str(tmp_path) not in err  # the path as typed, nothing more
    assert not Path("out").exists()


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--size", "500x512"], ["multiple of 8", "500x512"]),
        (["--size", "512"], ["WIDTHxHEIGHT", "'512'"]),
        (["--size", "4096x512"], ["between 8 and 2048"]),
        (["--forget", "encoderkv,nosuch"], ["unknown forgetting strategy 'nosuch'", "encoderkv"]),
        (["--forget", "nodecoder"], ["'nodecoder'", "vanilla"]),  # DreamBooth-only strategy
        (["--forget", "encoderkv,"], ["--forget", "empty items"]),
        (["--gammas", "0.5,9"], ["gammas", "[-1.0, 3.0]", "9"]),
        (["--gammas", "a,b"], ["--gammas takes numbers", "'a'"]),
        (["--gammas", "0.5,nan"], ["gammas", "finite"]),
        (["--interpolation", "vp", "--alphas", "0.8,-1"], ["alphas", "[0.0, 3.0]"]),
        (["--alphas", "0.8"], ["--alphas applies only to --interpolation vp"]),
        (["--seeds", "-1"], ["seeds must be an integer in [0, 2^63-1]"]),
        (["--seeds", "1.5"], ["--seeds takes whole numbers", "'1.5'"]),
        (["--seeds", str(2**63)], ["seeds must be an integer"]),
        (["--train-seed", "x"], ["--train-seed takes whole numbers"]),
        (["--steps", "0"], ["steps must be 1..1000"]),
        (["--guidance", "inf"], ["--guidance must be a finite number"]),
        (["--forget-degree", "1.5"], ["forget degree must be in [0, 1]"]),
        (["--max-batch", "0"], ["--max-batch must be 1..64"]),
        (["--updates", "0"], ["updates must be 1..100000"]),
        (["--batch-size", "65"], ["batch size must be 1..64"]),
        (["--updates", "1,2"], ["one value (for the first stage) or one per stage (1: joint)"]),
        (["--mode", "two_stage", "--updates", "1,2,3"], ["(2: embedding, unet), got 3"]),
        (["--device", "tpu:banana"], ["device", "cpu, cuda"]),
        (["--mode", "magic"], ["invalid choice: 'magic'", "--help"]),
        (["--delta-format", "int4"], ["--delta-format", "invalid choice: 'int4'", "int8"]),
        (["--source-prompt", " "], ["--source-prompt must be non-empty text"]),
        (["--vae", "."], ["--vae needs --base-model"]),
        (["--gammas", ",".join(["0.5"] * 4097)], ["at most 4096 are accepted"]),
        (["--image-format", "gif"], ["--image-format", "invalid choice: 'gif'", "webp"]),
        (["--image-quality", "80"], ["--image-quality applies only to", "webp and jpeg"]),
        (["--image-format", "jpeg", "--image-quality", "0"], ["--image-quality must be", "1..100"]),
        (["--image-format", "webp", "--image-quality", "x"], ["--image-quality takes whole"]),
    ],
)
def test_bad_arguments(capsys, tmp_path, photo, no_model_loading, extra, needles):
    out_dir = tmp_path / "out"
    code, out, err = edit(capsys, photo, out_dir, *extra)
    assert_bad_input(code, out, err, *needles)
    assert not out_dir.exists()


@pytest.mark.parametrize(
    ("prompt", "needles"),
    [
        ("", ["--prompt must be non-empty text"]),
        ("   ", ["non-empty"]),
        ("x" * 1001, ["1001 characters", "at most 1000"]),
        ("a\x00b", ["control characters"]),
    ],
    ids=["empty", "blank", "overlong", "control"],
)
def test_bad_prompts(capsys, tmp_path, photo, no_model_loading, prompt, needles):
    code, out, err = run(capsys, "edit", photo, "--prompt", prompt, "--out", tmp_path / "o")
    assert_bad_input(code, out, err, *needles)
    assert not (tmp_path / "o").exists()


def test_missing_prompt_and_unknown_command_are_usage_errors(capsys, photo, no_model_loading):
    assert_bad_input(*run(capsys, "edit", photo), "--prompt", "see 'python -m forgedit edit")
    assert_bad_input(*run(capsys, "paint", photo), "invalid choice: 'paint'")
    assert_bad_input(*run(capsys), "required: COMMAND")


def test_help_teaches_and_exits_0(capsys):
    code, out, _ = run(capsys, "edit", "--help")
    assert code == 0
    out = " ".join(out.split())  # argparse wraps lines at the terminal width
    for text in (
        "--gammas",
        "default: 0.5,0.6,0.7",
        "encoderattn+encoder1",
        "nodecoder",
        "WIDTHxHEIGHT",
        "--updates",
    ):
        assert text in out


def test_real_base_model_needs_blip_or_source_prompt(
    capsys, tmp_path, photo, tiny_model_dir, no_model_loading
):
    code, out, err = edit(
        capsys, photo, tmp_path / "o", "--base-model", tiny_model_dir / "stable-diffusion"
    )
    assert_bad_input(code, out, err, "--blip DIR", "--source-prompt TEXT")


@pytest.mark.parametrize("which", ["missing", "empty", "blip-as-base", "base-as-blip"])
def test_model_directories_of_the_wrong_kind(
    capsys, tmp_path, photo, tiny_model_dir, no_model_loading, which
):
    (tmp_path / "empty").mkdir()
    base, blip = tiny_model_dir / "stable-diffusion", tiny_model_dir / "blip"
    args = {
        "missing": ["--base-model", tmp_path / "nope", "--source-prompt", "a cat"],
        "empty": ["--base-model", tmp_path / "empty", "--source-prompt", "a cat"],
        "blip-as-base": ["--base-model", blip, "--source-prompt", "a cat"],
        "base-as-blip": ["--base-model", base, "--blip", base],
    }[which]
    code, out, err = edit(capsys, photo, tmp_path / "o", *args)
    assert_bad_input(code, out, err)
    assert not (tmp_path / "o").exists()


def test_out_must_be_new_or_empty(capsys, tmp_path, photo, no_model_loading):
    used = tmp_path / "used"
    used.mkdir()
    (used / "summary.json").write_text("{}")
    code, out, err = edit(capsys, photo, used)
    assert_bad_input(code, out, err, "is not empty")
    assert sorted(p.name for p in used.iterdir()) == ["summary.json"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert_bad_input(*edit(capsys, photo, a_file), "is not a directory")


def test_save_model_must_be_new(capsys, tmp_path, photo, no_model_loading):
    taken = tmp_path / "m"
    taken.mkdir()
    (taken / "x").write_text("x")
    code, out, err = edit(capsys, photo, tmp_path / "o", "--save-model", taken)
    assert_bad_input(code, out, err, "--save-model", "not an empty directory")


def test_save_model_and_out_must_not_overlap(capsys, tmp_path, photo, no_model_loading):
    for save in (tmp_path / "a" / "o", tmp_path / "a"):
        code, out, err = edit(capsys, photo, tmp_path / "a" / "o", "--save-model", save)
        assert_bad_input(code, out, err, "--save-model", "must not be --out or contain it")


def test_load_model_must_be_an_edit_model(capsys, tmp_path, photo, no_model_loading):
    (tmp_path / "notamodel").mkdir()
    code, out, err = edit(capsys, photo, tmp_path / "o", "--load-model", tmp_path / "notamodel")
    assert_bad_input(code, out, err, "not an edit model", "manifest.json")


def test_training_flags_conflict_with_load_model(capsys, tmp_path, photo, no_model_loading):
    (tmp_path / "m").mkdir()
    for flag, value in (
        ("--train-seed", "1"),
        ("--updates", "3"),
        ("--save-model", "x"),
        ("--delta-format", "int8"),
        ("--source-prompt", "a dog"),
    ):
        code, out, err = run(
            capsys,
            "edit",
            photo,
            "--prompt",
            "A dog.",
            "--out",
            tmp_path / "o",
            "--load-model",
            tmp_path / "m",
            flag,
            value,
        )
        assert_bad_input(code, out, err, flag, "--load-model skips training")


# --- helpers ---------------------------------------------------------------------------------


def test_file_names_are_safe_and_carry_the_parameters():
    assert image_file_name(7, "encoderattn+encoder1", "vs", 0.6, 0.0, 12) == (
        "007_encoderattn+encoder1_vs_g0.6_s12.png"
    )
    assert image_file_name(0, "decoderkv", "vp", 1.1, 0.8, 3, "a-photo") == (
        "000_a-photo_decoderkv_vp_g1.1_a0.8_s3.png"
    )
    assert slug("A photo of a dog/../../etc & <b>!") == "a-photo-of-a-dog-etc-b"
    assert len(slug("word " * 50)) <= 32
    assert slug("¿¡!") == "prompt"


def test_staged_output_commits_whole_or_leaves_nothing(tmp_path):
    out = tmp_path / "a" / "b"
    staged = StagedOutput(out)
    staged.write("x.png", b"1")
    assert not (out / "x.png").exists()  # invisible until commit
    staged.abort()
    assert not (tmp_path / "a").exists()  # and the directories this run created are gone

    staged = StagedOutput(out)
    staged.write("x.png", b"1")
    staged.write("summary.json", b"{}")
    staged.commit()
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "x.png"]


# --- end to end on the tiny model ------------------------------------------------------------


@pytest.fixture(scope="module")
def first_run(tiny_model_dir: Path, photos_dir: Path, tmp_path_factory) -> dict:
    """One real edit, saved as an edit model; shared by the end-to-end tests."""
    root = tmp_path_factory.mktemp("cli-e2e")
    sweep = ["--forget", "donotforget,encoderkv", "--gammas", "0.5,1.0", "--seeds", "1,2"]
    argv = [
        *("edit", photos_dir / "cat.jpg"),
        *("--prompt", "A photo of a sitting dog.", "--train-seed", "3", "--json", *FAST, *sweep),
        *("--max-batch", "3"),
        *("--base-model", tiny_model_dir / "stable-diffusion", "--blip", tiny_model_dir / "blip"),
        *("--out", root / "out", "--save-model", root / "model"),
    ]
    stdout = io.StringIO()
    stderr = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main([str(a) for a in argv])
    return {"code": code, "out": stdout.getvalue(), "err": stderr.getvalue(), "root": root}


def test_edit_end_to_end(first_run):
    assert first_run["code"] == 0, first_run["err"]
    root: Path = first_run["root"]
    summary = json.loads(first_run["out"])
    assert summary == json.loads((root / "out" / "summary.json").read_text())
    images = summary["images"]
    assert len(images) == 2 * 2 * 2  # strategies × seeds × gammas
    assert [i["index"] for i in images] == list(range(8))
    assert {(i["forget"], i["seed"], i["gamma"]) for i in images} == {
        (f, s, g) for f in ("donotforget", "encoderkv") for s in (1, 2) for g in (0.5, 1.0)
    }
    for item in images:
        assert set(item) >= {"path", "forget", "interpolation", "gamma", "alpha", "seed", "prompt"}
        path = Path(item["path"])
        assert path.parent == root / "out"
        assert path.name.startswith(f"{item['index']:03d}_{item['forget']}_vs_g")
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"
    assert summary["edit_model"] == str(root / "model")
    assert (root / "model" / "manifest.json").is_file()
    assert summary["train_seed"] == 3 and summary["random_train_seed"] is False
    assert summary["source_prompt"].startswith("A photo of ")  # BLIP caption + the rule
    assert summary["size"] == {"width": 64, "height": 64}
    assert len(summary["loss_curve"]) == 2
    assert {"load_models", "caption", "train", "save_model", "sample", "total"} <= set(
        summary["timings"]
    )
    assert summary["contact_sheet_images"] == 8
    with Image.open(summary["contact_sheet"]) as sheet:
        # input + 8 results = 9 tiles in a 3x3 grid; 64 px tiles are shown at 3x = 192 px
        assert sheet.width == 3 * 192 + 4 * 8
        assert sheet.height > 3 * 192
    names = sorted(p.name for p in (root / "out").iterdir())
    assert names == sorted(
        [Path(i["path"]).name for i in images] + ["contact_sheet.png", "summary.json"]
    )  # no staging left
    assert "training" in first_run["err"] and "sampling" in first_run["err"]  # progress


def test_reloaded_edit_model_gives_the_same_images(
    capsys, first_run, tiny_model_dir, photos_dir, tmp_path
):
    assert first_run["code"] == 0
    root: Path = first_run["root"]
    image = photos_dir / "cat.jpg"
    sweep = ["--forget", "encoderkv", "--gammas", "1.0", "--seeds", "2", "--steps", "4", "--json"]
    code, out, err = run(
        capsys,
        "edit",
        image,
        "--prompt",
        "A photo of a sitting dog.",
        "--out",
        tmp_path / "again",
        *("--base-model", tiny_model_dir / "stable-diffusion", "--load-model", root / "model"),
        *sweep,
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["edit_model"] == str(root / "model")
    assert summary["train_seed"] == 3  # from the manifest
    (image,) = summary["images"]
    first = json.loads(first_run["out"])["images"]
    (same,) = [i for i in first if (i["forget"], i["gamma"], i["seed"]) == ("encoderkv", 1.0, 2)]
    assert Path(image["path"]).read_bytes() == Path(same["path"]).read_bytes()


def test_webp_and_jpeg_images_and_their_contact_sheet(
    capsys, first_run, tiny_model_dir, photos_dir, tmp_path
):
    """The same pixels as the PNG run, encoded as asked: the files and the contact sheet."""
    root: Path = first_run["root"]
    first = json.loads(first_run["out"])["images"]
    (png,) = [i for i in first if (i["forget"], i["gamma"], i["seed"]) == ("encoderkv", 1.0, 2)]
    for fmt, pil, suffix in (("webp", "WEBP", ".webp"), ("jpeg", "JPEG", ".jpg")):
        out = tmp_path / fmt
        code, stdout, err = run(
            capsys,
            "edit",
            photos_dir / "cat.jpg",
            "--prompt",
            "A photo of a sitting dog.",
            "--out",
            out,
            *("--base-model", tiny_model_dir / "stable-diffusion", "--load-model", root / "model"),
            *("--forget", "encoderkv", "--gammas", "1.0", "--seeds", "2", "--steps", "4"),
            *("--image-format", fmt, "--image-quality", "95", "--json"),
        )
        assert code == 0, err
        summary = json.loads(stdout)
        assert summary["output"] == {"format": fmt, "quality": 95}
        (image,) = summary["images"]
        assert image["path"].endswith(suffix) and summary["contact_sheet"].endswith(suffix)
        with Image.open(image["path"]) as im, Image.open(png["path"]) as ref:
            assert im.format == pil and im.size == ref.size
            diff = np.abs(np.asarray(im, np.int16) - np.asarray(ref, np.int16))
            # Lossy, yet the same picture: the tiny model's images are noise-like (hard for
            # WebP's 4:2:0 chroma), and two unrelated ones differ by about 85 on average.
            assert diff.max() > 0 and diff.mean() < 24
        with Image.open(summary["contact_sheet"]) as sheet:
            assert sheet.format == pil
        assert sorted(p.suffix for p in out.iterdir()) == sorted([suffix, suffix, ".json"])


def test_int8_edit_model_is_a_quarter_and_samples_within_one_level(
    capsys, first_run, tiny_model_dir, photos_dir, tmp_path
):
    """The same fine-tune as ``first_run`` saved with --delta-format int8: its Δ file is about
    a quarter of the fp32 one, its images are within 1/255 of the fp32 edit model's, and
    --load-model of it samples exactly the images of the job that made it."""
    assert first_run["code"] == 0
    root: Path = first_run["root"]
    image = photos_dir / "cat.jpg"
    sweep = ["--forget", "donotforget,encoderkv", "--gammas", "0.5,1.0", "--seeds", "1,2"]
    common = [
        *("edit", image, "--prompt", "A photo of a sitting dog.", "--json", "--steps", "4"),
        *(*sweep, "--max-batch", "3", "--base-model", tiny_model_dir / "stable-diffusion"),
    ]
    source = json.loads(first_run["out"])["source_prompt"]
    code, out, err = run(
        capsys,
        *common,
        *FAST,
        *("--train-seed", "3", "--source-prompt", source, "--delta-format", "int8"),
        *("--out", tmp_path / "int8", "--save-model", tmp_path / "int8-model"),
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["training"]["delta_format"] == "int8"
    fp32_bytes = (root / "model" / "delta.safetensors").stat().st_size
    int8_bytes = (tmp_path / "int8-model" / "delta.safetensors").stat().st_size
    assert 0.2 * fp32_bytes < int8_bytes < 0.3 * fp32_bytes, (int8_bytes, fp32_bytes)

    def pixels(images: list[dict]) -> dict[tuple, np.ndarray]:
        return {
            (i["forget"], i["seed"], i["gamma"]): np.asarray(Image.open(i["path"]), np.int16)
            for i in images
        }

    exact, ours = pixels(json.loads(first_run["out"])["images"]), pixels(summary["images"])
    assert exact.keys() == ours.keys()
    assert max(int(np.abs(exact[k] - ours[k]).max()) for k in exact) <= 1
    code, out, err = run(
        capsys, *common, "--out", tmp_path / "again", "--load-model", tmp_path / "int8-model"
    )
    assert code == 0, err
    again = pixels(json.loads(out)["images"])
    assert all(np.array_equal(again[k], ours[k]) for k in ours)


def test_edit_model_of_another_base_model_is_refused(capsys, tmp_path, tiny_model_dir, photo):
    import torch

    from forgedit.artifact import EditModel
    from forgedit.config import TrainingConfig

    alien = EditModel(
        delta={},
        source_embedding=torch.zeros(1, 77, 32),
        base_model_name="sd-2-1",
        base_model_fingerprint="0" * 64,
        source_prompt="a dog",
        training=TrainingConfig.for_mode("joint", height=64, width=64),
    )
    alien.save(tmp_path / "alien")
    code, out, err = edit(
        capsys,
        photo,
        tmp_path / "o",
        "--base-model",
        tiny_model_dir / "stable-diffusion",
        "--load-model",
        tmp_path / "alien",
        "--seeds",
        "1",
    )
    assert_bad_input(code, out, err, "'sd-2-1'", "fingerprint")
    assert not (tmp_path / "o").exists()


def test_cancel_during_training_leaves_nothing(
    capsys, tmp_path, tiny_model_dir, photo, monkeypatch
):
    token = CancelToken()
    original = Progress.training

    def cancel_on_first_update(self, p):  # as Ctrl-C would, from inside the run
        original(self, p)
        token.cancel("interrupted")

    monkeypatch.setattr(Progress, "training", cancel_on_first_update)
    code, out, err = edit(
        capsys,
        photo,
        tmp_path / "o",
        "--base-model",
        tiny_model_dir / "stable-diffusion",
        "--source-prompt",
        "a cat",
        "--save-model",
        tmp_path / "m",
        *FAST,
        "--updates",
        "5",
        cancel=token,
    )
    assert code == 130
    assert out == ""
    assert err.strip().splitlines()[-1].startswith("error: interrupted")
    assert not (tmp_path / "o").exists()
    assert not (tmp_path / "m").exists()


def test_ctrl_c_during_sampling_leaves_nothing(
    capsys, tmp_path, tiny_model_dir, photo, monkeypatch
):
    previous = signal.getsignal(signal.SIGINT)
    original = Progress.sampling

    def ctrl_c_at_first_step(self, p):
        original(self, p)
        if p.step == 1 and p.images_done == 0:
            os.kill(os.getpid(), signal.SIGINT)  # the handler turns it into a cancel

    monkeypatch.setattr(Progress, "sampling", ctrl_c_at_first_step)
    code, _out, err = edit(
        capsys,
        photo,
        tmp_path / "o",
        "--base-model",
        tiny_model_dir / "stable-diffusion",
        "--source-prompt",
        "a cat",
        "--seeds",
        "1",
        *FAST,
    )
    assert code == 130, err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert signal.getsignal(signal.SIGINT) is previous  # handler restored


def test_default_is_the_tiny_model(capsys, tmp_path, tiny_model_dir, photo, monkeypatch):
    # ensure_tiny_model() uses $FORGEDIT_HOME/tiny-model: point it at the session's copy.
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "tiny-model").symlink_to(tiny_model_dir)
    monkeypatch.setenv("FORGEDIT_HOME", str(tmp_path / "home"))
    code, out, err = run(
        capsys,
        "edit",
        photo,
        "--prompt",
        "A dog.",
        "--prompt",
        "A cat.",
        "--gammas",
        "0.5",
        "--out",
        tmp_path / "o",
        "--steps",
        "2",
        "--updates",
        "1",
        "--batch-size",
        "1",
        "--json",
    )
    assert code == 0, err
    summary = json.loads(out)
    names = [Path(i["path"]).name for i in summary["images"]]
    assert names[0].startswith("000_a-dog_donotforget_vs_g0.5_s")  # prompts get a slug
    assert names[1].startswith("001_a-cat_donotforget_vs_g0.5_s")
    assert summary["base_model"]["path"] == "tiny"
    assert summary["size"] == {"width": 64, "height": 64}  # the tiny model's native size
    assert summary["random_seeds"] and not summary["random_train_seed"]
    assert len(summary["seeds"]) == 1 and summary["train_seed"] == summary["training"]["seed"]
    assert summary["source_prompt"]  # captioned by the tiny BLIP
    # The training seed is the content's: the same image, base model, source prompt and
    # training config give the same seed, hence the same edit model.
    training = TrainingConfig.from_dict(summary["training"])
    expected = content_seed(
        summary["image"]["sha256"],
        summary["base_model"]["fingerprint"],
        summary["source_prompt"],
        training,
    )
    assert summary["train_seed_from"] == "content" and summary["train_seed"] == expected


def test_train_seed_random_asks_for_a_fresh_fine_tune(capsys, tmp_path, tiny_model_dir, photo):
    source = ("--base-model", tiny_model_dir / "stable-diffusion", "--source-prompt", "a cat")
    runs = []
    for i, seed in enumerate(["random", "random", None]):
        extra = ["--train-seed", seed] if seed else []
        code, out, err = edit(
            capsys, photo, tmp_path / f"o{i}", *source, *extra, *FAST, "--seeds", "1", "--json"
        )
        assert code == 0, err
        runs.append(json.loads(out))
    assert [r["train_seed_from"] for r in runs] == ["random", "random", "content"]
    assert runs[0]["random_train_seed"] and runs[0]["train_seed"] != runs[1]["train_seed"]


def test_two_stage_defaults_to_encoderattn_and_one_value_overrides_the_first_stage(
    capsys, tmp_path, tiny_model_dir, photo
):
    args = build_parser().parse_args(
        [
            "edit",
            str(photo),
            "--prompt",
            "A dog.",
            "--mode",
            "two_stage",
            "--updates",
            "7",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    plan = check_edit_args(args)
    assert plan.sweep.forget == ("encoderattn",)
    assert [s.updates for s in plan.config.stages] == [7, 1000]


@pytest.mark.parametrize(
    ("mode", "training", "forget"),
    [
        ("dreambooth", ["--updates", "2", "--batch-size", "2"], "nodecoder,encoderkv"),
        ("two_stage", ["--updates", "2,2", "--batch-size", "1,2"], "decoderkv"),
    ],
)
def test_other_training_modes(capsys, tmp_path, tiny_model_dir, photo, mode, training, forget):
    code, out, err = edit(
        capsys,
        photo,
        tmp_path / "o",
        "--mode",
        mode,
        *training,
        "--forget",
        forget,
        *("--base-model", tiny_model_dir / "stable-diffusion", "--source-prompt", "a cat"),
        *("--size", "64x64", "--steps", "2", "--gammas", "0.7", "--seeds", "5", "--json"),
    )
    assert code == 0, err
    summary = json.loads(out)
    stages = summary["training"]["stages"]
    assert summary["training"]["mode"] == mode
    assert [s["updates"] for s in stages] == [2] * len(stages)
    assert [i["forget"] for i in summary["images"]] == forget.split(",")
    assert len(summary["loss_curve"]) == 2 * len(stages)


def test_strategies_json_and_table(capsys):
    code, out, err = run(capsys, "strategies", "--json")
    assert code == 0, err
    counts = json.loads(out)
    assert counts["vanilla"]["encoderkv"] == {"tensors": 234, "parameters": 242731200}
    assert counts["dreambooth"]["encoderkv"]["tensors"] == 12  # the inverted one
    code, out, _ = run(capsys, "strategies")
    assert code == 0
    assert "encoderattn+encoder1" in out and "242,731,200" in out


def test_strategies_on_a_base_model(capsys, tiny_model_dir):
    code, out, err = run(
        capsys, "strategies", "--json", "--base-model", tiny_model_dir / "stable-diffusion"
    )
    assert code == 0, err
    counts = json.loads(out)
    assert counts["vanilla"]["donotforget"]["tensors"] == 0
    assert counts["vanilla"]["encoderkv"]["tensors"] == 234  # same names, tiny widths
    assert counts["vanilla"]["encoderkv"]["parameters"] < 242731200


def test_make_tiny_model_refuses_a_used_directory(capsys, tmp_path):
    (tmp_path / "x").write_text("x")
    assert_bad_input(*run(capsys, "make-tiny-model", tmp_path), "not an empty directory")
