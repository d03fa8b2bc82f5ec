"""What an Edit or a Sample call asks for, and the plan a job runs.

A request message is decoded once, by ``server.wire``, into a call: the engine's typed options
(``forgedit.options``) and the few fields only the service has (request id, detach, the image
bytes, a base model's or an edit model's name, and the stored edit model's labels and
time-to-live, which the registry's rules check: ``registry.records``). ``edit_plan`` and
``sample_plan`` check a call and turn it into a plan, as numbered steps, cheapest first:

1. the service's limits on what was sent (``server.validation``: sizes, counts, lengths);
2. the engine's rules and defaults (``forgedit.requests``, the builder the engine CLI shares),
   whose errors already name the request field (``sweep.gammas``), with the service's limits
   on the work as the builder's ``Bounds`` (all updates, images per sweep, pixels per batch),
   then, for an Edit, that its resolution is served (``ServedModels.check_size``; a Sample's
   is checked with its edit model, ``ServedModels.require_served``);
3. for an Edit, only then, the image decoded under the service's byte, pixel and format limits,
   to refuse a corrupt one before it is queued; the plan keeps the checked bytes
   (``CheckedImage``), not the pixels, which the job decodes again only while it runs.

A plan carries ``step_cost``, one UNet step at its resolution over one at the native size
(``ServedModels.step_cost``), which the run-time estimates scale by (``server.estimator``).

Every refusal is an ``InvalidInputError`` whose ``field`` is the request field's path, so the
client gets one ``BadRequest`` field violation naming the problem and what is accepted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from forgedit.config import (
    DeltaFormat,
    OutputConfig,
    Precision,
    PreviewConfig,
    SweepConfig,
    TrainingConfig,
)
from forgedit.errors import InvalidInputError
from forgedit.images import ImageLimits, LoadedImage, load_image
from forgedit.options import EditOptions, SampleOptions
from forgedit.requests import TrainSeedFrom, build_edit, build_sample, training_with_seed
from registry.ids import validate_edit_model_id
from registry.records import check_labels, check_ttl
from server import validation
from server.catalog import ServedModels, StoredEditModel
from server.validation import Limits

# -- calls: a request, decoded ------------------------------------------------------------------


@dataclass(frozen=True)
class EditCall:
    """An ``EditRequest``, decoded (``server.wire.edit_call``)."""

    request_id: str  # "" = none
    detach: bool
    base_model: str  # "" = the server's default
    image: bytes
    options: EditOptions
    labels: Mapping[str, str] = field(default_factory=dict)  # the edit model's labels
    ttl_seconds: int | None = None  # None: the server's default time-to-live


@dataclass(frozen=True)
class SampleCall:
    """A ``SampleRequest``, decoded (``server.wire.sample_call``)."""

    request_id: str
    detach: bool
    edit_model_id: str
    options: SampleOptions


@dataclass(frozen=True)
class Defaults:
    """What the server decides for a request that leaves it unset (``ServerSettings``)."""

    precision: Precision = "faithful"  # for training and sampling alike
    delta_format: DeltaFormat | None = None  # None: the precision's default
    ttl_s: float | None = None  # an edit model's time-to-live; None: kept until deleted


# -- plans: a call, checked --------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedImage:
    """An input image that passed every check, kept as its encoded bytes: a decoded
    full-resolution image is 48 MiB at 4096x4096, so a queued job holds only ``data`` (at most
    FORGEDIT_MAX_IMAGE_BYTES) and what identifies it, and ``decode`` brings the pixels back,
    identical, for the job that runs (``server.runner``)."""

    data: bytes
    sha256: str
    format: str
    width: int
    height: int
    limits: ImageLimits

    @classmethod
    def of(cls, data: bytes, limits: ImageLimits) -> CheckedImage:
        """Decode ``data`` once to check it (``load_image``: ``InvalidImageError`` naming the
        problem), then let the pixels go."""
        loaded = load_image(data, limits=limits)
        return cls(data, loaded.sha256, loaded.format, loaded.width, loaded.height, limits)

    def decode(self) -> LoadedImage:
        """The pixels, decoded again (the bytes passed the same checks at admission)."""
        return load_image(self.data, limits=self.limits)


@dataclass(frozen=True)
class EditRequestPlan:
    """A validated Edit request: everything the worker needs, nothing left to check."""

    request_id: str
    image: CheckedImage
    base_model: str
    source_prompt: str | None  # None: caption with BLIP
    training: TrainingConfig  # its seed is a placeholder while train_seed_from is "content"
    sweep: SweepConfig
    detach: bool
    # "given" (the request's seed), "content" (derived from the content once the source prompt
    # and base model are known: ``training_for``) or "random" (fresh_seed).
    train_seed_from: TrainSeedFrom = "given"
    output: OutputConfig = OutputConfig()  # how images (and previews) are encoded
    preview: PreviewConfig = PreviewConfig(training_free=True)
    labels: Mapping[str, str] = field(default_factory=dict)  # checked (registry.records)
    ttl_s: float | None = None  # the edit model's time-to-live; None: kept until deleted
    step_cost: float = 1.0  # a UNet step at this resolution / one at the native size

    @property
    def images_total(self) -> int:
        return self.sweep.num_images

    def training_for(self, base_fingerprint: str, source_prompt: str) -> TrainingConfig:
        """The training config with its final seed. The content seed (``content_seed``) makes
        the same image + base model + source prompt + config train the same edit model, so
        the runner finds and reuses a stored one on any replica. A fresh fine-tune with a
        request id gets a seed salted with that id: random-looking, yet a retry of the same
        request (after its job expired, or on another replica) gets the same one
        (``forgedit.requests.training_with_seed``). Without a request id a fresh seed was
        drawn at validation: nothing to keep a retry consistent."""
        return training_with_seed(
            self.training,
            self.train_seed_from,
            image_sha256=self.image.sha256,
            base_fingerprint=base_fingerprint,
            source_prompt=source_prompt,
            salt=self.request_id,
        )


@dataclass(frozen=True)
class SampleRequestPlan:
    """A validated Sample request."""

    request_id: str
    edit_model_id: str
    sweep: SweepConfig
    detach: bool
    output: OutputConfig = OutputConfig()
    preview: PreviewConfig = PreviewConfig()
    step_cost: float = 1.0  # set once the edit model's size is known (``for_edit_model``)

    def for_edit_model(
        self, served: ServedModels, edit_model: StoredEditModel
    ) -> SampleRequestPlan:
        """This plan, once ``served`` admits ``edit_model`` (its base model and size:
        ``ServedModels.require_served``), with the step cost of its size."""
        base = served.require_served(edit_model)
        cost = served.step_cost(base, int(edit_model.height), int(edit_model.width))
        return dataclasses.replace(self, step_cost=cost)

    @property
    def images_total(self) -> int:
        return self.sweep.num_images


RequestPlan = EditRequestPlan | SampleRequestPlan


def edit_plan(
    call: EditCall, limits: Limits, served: ServedModels, defaults: Defaults = Defaults()
) -> EditRequestPlan:
    """Check an Edit call and decode its image (see the module docstring for the order);
    raise ``InvalidInputError`` naming the field otherwise."""
    options = call.options
    # 1. The service's limits on what was sent, and the base model it names.
    validation.check_request_id(call.request_id)
    validation.check_image_bytes(call.image, limits)
    validation.check_prompts(options.target_prompts, limits)
    if options.source_prompt is not None:
        validation.check_text(options.source_prompt, "source_prompt", limits)
    base = served.resolve(call.base_model)
    if options.source_prompt is None and not base.can_caption:
        raise InvalidInputError(
            "source_prompt is required: this server has no BLIP captioner for base model "
            f"{base.name!r}",
            field="source_prompt",
        )
    validation.check_training_options(options.training, limits)
    validation.check_sweep_options(options.sweep, limits)
    # The edit model's labels and time-to-live: the registry's rules, which own them.
    labels = check_labels(call.labels)
    ttl_s = defaults.ttl_s if call.ttl_seconds is None else check_ttl(call.ttl_seconds)

    # 2. The engine's rules and defaults: the fine-tune's config and the sweep, within the
    # service's bounds on the work; then the resolution, which must be one served here.
    default_height, default_width = base.default_size
    edit = build_edit(
        options,
        native_height=default_height,
        native_width=default_width,
        precision=defaults.precision,
        delta_format=defaults.delta_format,
        bounds=limits.bounds(),
    )
    height, width = edit.training.height, edit.training.width
    width_served = any(w == width for _, w in base.served_sizes)
    served.check_size(
        base, height, width, field="training.height" if width_served else "training.width"
    )

    # 3. Only now, with every cheap check passed, meet the image decoder.
    image = CheckedImage.of(call.image, validation.image_limits(limits))
    return EditRequestPlan(
        call.request_id,
        image,
        base.name,
        edit.source_prompt,
        edit.training,
        edit.sweep,
        call.detach,
        edit.train_seed_from,
        edit.output,
        edit.preview,
        labels,
        ttl_s,
        served.step_cost(base, height, width),
    )


def sample_plan(
    call: SampleCall, limits: Limits, training_mode_of: Callable[[str], str]
) -> SampleRequestPlan:
    """Check a Sample call. The sweep's defaults and strategy names depend on the edit
    model's variant, so once the cheap checks pass ``training_mode_of(edit_model_id)`` is asked
    for its training mode (it raises for an unknown edit model)."""
    # 1. The service's limits, before any registry lookup.
    validation.check_request_id(call.request_id)
    edit_model_id = validate_edit_model_id(call.edit_model_id)
    validation.check_prompts(call.options.target_prompts, limits)
    validation.check_sweep_options(call.options.sweep, limits)

    # 2. The engine's rules and the edit model's variant's defaults, within the bounds.
    mode = training_mode_of(edit_model_id)
    sample = build_sample(call.options, mode, limits.bounds())
    return SampleRequestPlan(
        call.request_id, edit_model_id, sample.sweep, call.detach, sample.output, sample.preview
    )
