"""The ``edit`` command: load, caption, fine-tune (or load an edit model), sample the sweep,
write the results, as numbered steps over small helpers."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from forgedit.cli.arguments import EditCommand
from forgedit.cli.output import CONTACT_SHEET_STEM, SUMMARY, StagedOutput, display_path
from forgedit.cli.progress import Progress
from forgedit.durable import JsonObject
from forgedit.events import CancelToken, PhaseTimer
from forgedit.images import (
    CONTACT_SHEET_MAX_IMAGES,
    contact_sheet,
    encode_image,
    image_file_name,
    sheet_label,
    slug,
)
from forgedit.requests import training_with_seed

if TYPE_CHECKING:
    from PIL import Image

    from forgedit.artifact import EditModel
    from forgedit.backends.select import Fallback
    from forgedit.engine import EditedImage, Engine


@dataclass
class SweepOutput:
    """Where the sampled images go as they arrive: a PNG each in the staged output, their
    summary entries, and the contact sheet's tiles (no more than it shows)."""

    command: EditCommand
    output: StagedOutput
    progress: Progress
    files: list[JsonObject] = field(default_factory=list)
    tiles: list[tuple[Image.Image, str]] = field(default_factory=list)

    @property
    def with_prompt(self) -> bool:
        """File names and labels carry the prompt when a sweep has several."""
        return len(self.command.prompts) > 1

    def on_image(self, edited: EditedImage) -> None:
        spec = edited.spec
        name = image_file_name(
            spec.index,
            spec.forget,
            spec.interpolation,
            spec.gamma,
            spec.alpha,
            spec.seed,
            slug(spec.prompt) if self.with_prompt else None,
            self.command.output.suffix,
        )
        self.output.write(name, encode_image(edited.image, self.command.output))
        self.files.append({"path": display_path(self.command.out, name), **spec.to_dict()})
        if len(self.tiles) < CONTACT_SHEET_MAX_IMAGES:
            self.tiles.append((edited.image, sheet_label(spec, self.with_prompt)))
        self.progress.image_done(len(self.files), self.command.sweep.num_images)


def run_edit(command: EditCommand, cancel: CancelToken, stderr: TextIO) -> JsonObject:
    """Load the models, get the source prompt, fine-tune (or load the edit model), sample the
    sweep and write the results. Returns the summary. Raises ``ForgeditError`` on bad input,
    ``CancelledError`` when ``cancel`` fires; on any failure --out is left as it was."""
    timer = PhaseTimer()
    started = time.perf_counter()
    progress = Progress(stderr)
    output = StagedOutput(command.out)
    try:
        # 1. Load the base model (and a captioner, only if a caption is needed).
        with timer.phase("load_models"):
            engine, base_dir_label = _load_engine(command)
        cancel.check()

        # 2. Caption and fine-tune, or load the given edit model.
        edit_model, edit_model_dir = _edit_model(command, engine, timer, progress, cancel)

        # 3. Sample the sweep, writing each image as its batch finishes.
        images = SweepOutput(command, output, progress)
        with timer.phase("sample"):
            engine.sample(
                edit_model,
                command.sweep,
                on_image=images.on_image,
                on_progress=progress.sampling,
                cancel=cancel,
                max_batch=command.max_batch,
            )
        progress.close()
        cancel.check()

        # 4. The contact sheet and the summary; then move everything into --out.
        with timer.phase("contact_sheet"):
            sheet = contact_sheet(command.image.image, images.tiles)
            output.write(_sheet_name(command), encode_image(sheet, command.output))
        timer.record("total", time.perf_counter() - started)
        summary = _summary(command, engine, base_dir_label, edit_model, edit_model_dir, images)
        summary["timings"] = {name: round(s, 4) for name, s in timer.timings.items()}
        output.write(SUMMARY, (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode())
        output.commit()
        return summary
    except BaseException:
        progress.close()
        output.abort()
        raise


def _summary(
    command: EditCommand,
    engine: Engine,
    base_dir_label: str,
    edit_model: EditModel,
    edit_model_dir: str | None,
    images: SweepOutput,
) -> JsonObject:
    """``summary.json`` (and ``--json``'s output), less the timings."""
    config = edit_model.training
    return {
        "images": sorted(images.files, key=lambda f: f["index"]),
        "contact_sheet": display_path(command.out, _sheet_name(command)),
        "contact_sheet_images": len(images.tiles),
        "summary": display_path(command.out, SUMMARY),
        "edit_model": edit_model_dir,
        "source_prompt": edit_model.source_prompt,
        "train_seed": config.seed,
        "seeds": list(command.sweep.seeds),
        "random_seeds": command.random_seeds,
        "random_train_seed": command.train_seed_from == "random",
        "train_seed_from": command.train_seed_from,
        "base_model": {
            "path": base_dir_label,
            "name": engine.base_model_name,
            "fingerprint": engine.fingerprint,
        },
        "image": {
            "path": command.image_arg,
            "sha256": command.image.sha256,
            "format": command.image.format,
            "width": command.image.width,
            "height": command.image.height,
        },
        "size": {"width": config.width, "height": config.height},
        "device": command.device,
        "precision": command.precision,
        "unet_backend": {
            "requested": command.unet_backend,
            "sampled_with": engine.sampling_backend,
            "fallbacks": [
                {"backend": f.backend, "reason": f.reason, "message": f.message}
                for f in engine.backends.fallbacks
            ],
        },
        "training": config.to_dict(),
        "loss_curve": [float(x) for x in edit_model.loss_curve],
        "sweep": command.sweep.to_dict(),
        "output": {"format": command.output.format, "quality": command.output.quality},
    }


def _sheet_name(command: EditCommand) -> str:
    """contact_sheet.png, or .webp / .jpg: encoded as the images are."""
    return CONTACT_SHEET_STEM + command.output.suffix


def _load_engine(command: EditCommand) -> tuple[Engine, str]:
    """The engine on the requested (or tiny) base model, with a captioner only if needed."""
    from forgedit.engine import Engine

    blip_dir: Path | None
    if command.base_model is None:
        from forgedit.zoo import builtin_base_model

        builtin = builtin_base_model()
        base_dir, label = builtin.stable_diffusion, builtin.name
        blip_dir = command.blip or builtin.blip
    else:
        base_dir, label = command.base_model, os.fspath(command.base_model)
        blip_dir = command.blip
    needs_caption = command.source_prompt is None and command.load_model is None
    engine = Engine.load(
        base_dir,
        blip_dir=blip_dir if needs_caption else None,
        vae_dir=command.vae,
        device=command.device,
        precision=command.precision,
        unet_backend=command.unet_backend,
        cache_dir=command.engine_cache,
        max_batch=command.max_batch,
        on_backend_fallback=warn_fallback,
    )
    return engine, label


def warn_fallback(fallback: Fallback) -> None:
    """Say on stderr that a UNet backend could not serve and the next one takes over."""
    print(
        f"warning: UNet backend {fallback.backend} unavailable ({fallback.reason}): "
        f"{one_line(fallback.message)}",
        file=sys.stderr,
    )


def _edit_model(
    command: EditCommand,
    engine: Engine,
    timer: PhaseTimer,
    progress: Progress,
    cancel: CancelToken,
) -> tuple[EditModel, str | None]:
    """Load the edit model given by --load-model, or caption, fine-tune and maybe save one."""
    from forgedit.artifact import load_edit_model

    if command.load_model is not None:
        with timer.phase("load_edit_model"):
            model = load_edit_model(
                command.load_model, expected_base_fingerprint=engine.fingerprint
            )
        return model, os.fspath(command.load_model)

    config = command.config
    if not command.size_given:  # the base model's native resolution
        config = dataclasses.replace(config, height=engine.native_height, width=engine.native_width)
    with timer.phase("caption"):
        source_prompt = command.source_prompt or engine.source_prompt(
            command.image.image, command.prompts[0]
        )
    if command.train_seed_from == "content":
        config = training_with_seed(
            config,
            "content",
            image_sha256=command.image.sha256,
            base_fingerprint=engine.fingerprint,
            source_prompt=source_prompt,
        )
    cancel.check()
    with timer.phase("train"):
        model = engine.finetune(
            command.image.image,
            source_prompt,
            config,
            image_sha256=command.image.sha256,
            on_progress=progress.training,
            cancel=cancel,
        )
    progress.close()
    cancel.check()
    if command.save_model is None:
        return model, None
    with timer.phase("save_model"):
        model.save(command.save_model)
    return model, os.fspath(command.save_model)


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return " ".join(text.split())
