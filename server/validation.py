"""The service's limits on a request: how much a client may send and ask for.

These are the server's own, set per replica (``ServerSettings``): image bytes and pixels,
prompt counts and lengths, list lengths, DDIM steps, training updates, images per sweep, and
pixels per batch on the device. What was sent is checked here, before the engine's rules
(``server.plans`` orders them); the limits on the work it builds up to (all stages' updates,
images per sweep, pixels per batch) need the engine's defaults, so they go to the builder as
its ``Bounds`` (``Limits.bounds``). Each refusal is an ``InvalidInputError`` whose ``field`` is
the request field's path and whose message names the limit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from forgedit.errors import InvalidInputError
from forgedit.images import ImageLimits
from forgedit.options import SweepOptions, TrainingOptions
from forgedit.requests import Bounds, check_batch_pixels
from server.errors import shown

if TYPE_CHECKING:
    from server.settings import ServerSettings

REQUEST_ID_PATTERN = re.compile(r"\A[A-Za-z0-9._:-]{1,128}\Z")
# What a strategy name may look like before it is echoed in an error or looked up.
_STRATEGY_NAME = re.compile(r"\A[a-z0-9_+]{1,64}\Z")


@dataclass(frozen=True)
class Limits:
    """The server's request limits (from ``ServerSettings``)."""

    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
    max_prompt_chars: int = 1000
    max_prompts: int = 16
    max_sweep_values: int = 64
    max_sweep_images: int = 256
    max_steps: int = 200
    max_training_updates: int = 5000
    max_batch_pixels: int = 2048 * 2048
    sampling_batch: int = 8  # images per denoising batch (the server's max_batch)
    max_x0_previews: int = 256  # x0 previews per job (refused up front beyond it)
    max_preview_bytes: int = 8 * 1024 * 1024  # preview bytes per job (not sent beyond it)

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> Limits:
        return cls(
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            image_formats=tuple(f.upper() for f in settings.image_formats),
            max_prompt_chars=settings.max_prompt_chars,
            max_prompts=settings.max_prompts,
            max_sweep_values=settings.max_sweep_values,
            max_sweep_images=settings.max_sweep_images,
            max_steps=settings.max_steps,
            max_training_updates=settings.max_training_updates,
            max_batch_pixels=settings.max_batch_pixels,
            sampling_batch=settings.max_batch,
            max_x0_previews=settings.preview_max_x0,
            max_preview_bytes=settings.preview_max_bytes,
        )

    def bounds(self) -> Bounds:
        """The limits on the work a request builds up to (all stages' updates, images per
        sweep, pixels per batch, x0 previews), which the engine's builder enforces once it knows the
        defaults (``forgedit.requests.Bounds``)."""
        return Bounds(
            max_total_updates=self.max_training_updates,
            max_sweep_images=self.max_sweep_images,
            max_batch_pixels=self.max_batch_pixels,
            batch_pixels_setting="FORGEDIT_MAX_BATCH_PIXELS",
            max_x0_previews=self.max_x0_previews,
            x0_previews_setting="FORGEDIT_PREVIEW_MAX_X0",
        )


# -- what was sent ------------------------------------------------------------------------------


def check_request_id(request_id: str) -> str:
    if request_id and not REQUEST_ID_PATTERN.match(request_id):
        raise InvalidInputError(
            "request_id must be 1-128 characters of A-Z a-z 0-9 . _ : - "
            f"(got {len(request_id)} characters)",
            field="request_id",
        )
    return request_id


def check_image_bytes(image: bytes, limits: Limits) -> None:
    """There is an image, and it is not too many bytes (its content is checked last)."""
    if not image:
        raise InvalidInputError(
            f"image is required: the bytes of a {'/'.join(limits.image_formats)} file",
            field="image",
        )
    if len(image) > limits.max_image_bytes:
        raise InvalidInputError(
            f"image is {len(image) / 2**20:.1f} MiB; at most "
            f"{limits.max_image_bytes / 2**20:g} MiB is accepted",
            field="image",
        )


def image_limits(limits: Limits) -> ImageLimits:
    """What ``forgedit.images.load_image`` accepts here: bytes, pixels, formats."""
    return ImageLimits(
        max_bytes=limits.max_image_bytes,
        max_pixels=limits.max_image_pixels,
        formats=limits.image_formats,
    )


def check_prompts(prompts: Sequence[str], limits: Limits) -> None:
    """How many target prompts, and how long each (their text is the engine's to judge)."""
    if len(prompts) > limits.max_prompts:
        raise InvalidInputError(
            f"{len(prompts)} target prompts given; at most {limits.max_prompts} are accepted",
            field="target_prompts",
        )
    for prompt in prompts:
        check_text(prompt, "target_prompts", limits)


def check_text(text: str, field: str, limits: Limits) -> None:
    if len(text) > limits.max_prompt_chars:
        raise InvalidInputError(
            f"{field} has a prompt of {len(text)} characters; at most {limits.max_prompt_chars} "
            "are accepted",
            field=field,
        )


def check_training_options(options: TrainingOptions, limits: Limits) -> None:
    """Each stage's updates within ``max_training_updates``."""
    for name, value in (("updates", options.updates), ("stage2_updates", options.stage2_updates)):
        if value is not None and not 1 <= value <= limits.max_training_updates:
            raise InvalidInputError(
                f"training.{name} must be 1..{limits.max_training_updates}, got {value}",
                field=f"training.{name}",
            )


def check_sweep_options(options: SweepOptions, limits: Limits) -> None:
    """The sweep's lists, strategy names, steps and seed count within the limits: what can be
    judged before knowing the edit model (a Sample checks this before any registry lookup)."""
    for field, values in (
        ("sweep.gammas", options.gammas),
        ("sweep.alphas", options.alphas),
        ("sweep.seeds", options.seeds),
        ("sweep.forget_strategies", options.forget_strategies),
    ):
        if len(values) > limits.max_sweep_values:
            raise InvalidInputError(
                f"{field} has {len(values)} values; at most {limits.max_sweep_values} are accepted",
                field=field,
            )
    for name in options.forget_strategies:
        if not _STRATEGY_NAME.match(name):
            raise InvalidInputError(
                f"forgetting strategy {shown(name)} is not a strategy name (lower-case letters, "
                "digits, '_' and '+'), e.g. 'encoderattn' or 'decoderattn+decoder2'",
                field="sweep.forget_strategies",
            )
    if options.steps is not None and not 1 <= options.steps <= limits.max_steps:
        raise InvalidInputError(
            f"steps must be 1..{limits.max_steps}, got {options.steps}", field="sweep.steps"
        )
    count = options.seed_count
    if not options.seeds and count is not None and not 1 <= count <= limits.max_sweep_values:
        raise InvalidInputError(
            f"seed_count must be 1..{limits.max_sweep_values}, got {count}",
            field="sweep.seed_count",
        )


# -- the work it asks for -----------------------------------------------------------------------


def check_sampling_memory(height: int, width: int, limits: Limits) -> None:
    """One image at this resolution must fit a sampling batch on the device (the engine's
    ``check_batch_pixels`` with this server's budget); larger sweeps are split into batches
    that fit (``sampling_batch_size``). For a Sample, once the edit model's size is known."""
    check_batch_pixels(height, width, 1, limits.bounds(), what="sampling", field="sweep")


def sampling_batch_size(height: int, width: int, limits: Limits) -> int:
    """Images per denoising batch: the server's ``sampling_batch``, fewer when larger batches
    would exceed ``max_batch_pixels`` at this resolution (at least one)."""
    return max(1, min(limits.sampling_batch, limits.max_batch_pixels // (height * width)))
