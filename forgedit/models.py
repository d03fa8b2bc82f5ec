"""The base model: an SD 1.x pipeline's VAE, CLIP text encoder, tokenizer and UNet, loaded from a
local diffusers-format directory (FORGEDIT_SPEC.md §12).

Accepted: the Stable Diffusion 1.x family (SD 1.4, SD 1.5, Realistic Vision and other SD 1.x
fine-tunes) in diffusers format with safetensors weights, fp32 or an fp16 variant
(``*.fp16.safetensors``, upcast to fp32 on load). A snapshot without ``vae/`` (Realistic
Vision's "noVAE" release) needs ``vae_directory``. Loading is offline: nothing is downloaded.

Before any weight is read the directory is checked in one pass, so a bad directory gives one
``ModelDirectoryError`` that names every missing file, refuses pickle-only weights, or says what
kind of model it is instead. Paths in messages are shown as the caller gave them.

The fingerprint identifies the weights, not their location: sha256 over the (component-relative
path, sha256) pairs of the UNet, VAE and text-encoder weight files. Edit models record it, and
are refused on a base model with another fingerprint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from forgedit.artifact import sha256_file
from forgedit.durable import JsonObject
from forgedit.errors import ModelDirectoryError

if TYPE_CHECKING:
    # Module paths, not the package's lazy re-exports, so that type checkers see the classes.
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

T = TypeVar("T")

SD1_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD1_UP_BLOCKS = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
SD1_UNET_TENSORS = 686  # parameter tensors of every SD 1.x UNet (the forgetting name lists)
SD1_TEXT_LENGTH = 77
ACCEPTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
ACCEPTED = (
    "accepted: a Stable Diffusion 1.x pipeline in diffusers format (SD 1.4, SD 1.5, Realistic "
    "Vision or another SD 1.x fine-tune) with unet/, vae/, text_encoder/ and tokenizer/, "
    "safetensors weights, a UNet with CrossAttnDownBlock2D x3 + DownBlock2D and UpBlock2D + "
    "CrossAttnUpBlock2D x3, 4 latent channels, and a CLIPTextModel as wide as the UNet's "
    "cross-attention"
)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
CONVERT_HINT = (
    "pickle files are never loaded; convert them to safetensors (load once in a trusted "
    "environment and save_pretrained(..., safe_serialization=True))"
)
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
_TRANSFORMERS_WEIGHTS = "model"


@dataclass(eq=False)
class BaseModel:
    """A loaded SD 1.x base model, fp32, every module in eval mode with ``requires_grad``
    off (the engine turns on what it trains).

    ``name`` is a display name; ``fingerprint`` identifies the weights (see module doc).
    """

    name: str
    fingerprint: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return int(2 ** (len(self.vae.config["block_out_channels"]) - 1))

    @property
    def native_height(self) -> int:
        """The resolution the UNet was trained at, in pixels (512 for SD 1.x, 64 for tiny)."""
        return int(self.unet.config["sample_size"]) * self.vae_scale_factor

    @property
    def native_width(self) -> int:
        return int(self.unet.config["sample_size"]) * self.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        """z0 = scaling_factor · E_vae(x) (0.18215 for SD 1.x)."""
        return float(self.vae.config["scaling_factor"])

    @property
    def text_length(self) -> int:
        """Tokens per prompt, padded and truncated to this (77)."""
        return int(self.text_encoder.config.max_position_embeddings)


def load_base_model(
    directory: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    vae_directory: str | os.PathLike[str] | None = None,
    name: str | None = None,
) -> BaseModel:
    """Load an SD 1.x base model from a local diffusers-format directory, fp32, offline.

    ``vae_directory`` replaces the pipeline's ``vae/``: either a VAE folder (``config.json`` +
    weights) or a pipeline directory that has ``vae/``. It is required when ``directory`` has
    no ``vae/``. ``name`` defaults to the directory's base name.

    Raises ``ModelDirectoryError`` (one error per call) if a directory is missing or
    incomplete (every missing file listed), holds weights only in a pickle format, is of
    another kind (SD 2.x, SDXL, a BLIP captioner, ...), or a weight file cannot be read.
    """
    layout = check_base_model_directory(directory, vae_directory=vae_directory)
    fingerprint = layout.fingerprint()
    dev = torch.device(device)

    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = layout.unet.load(UNet2DConditionModel.from_pretrained, diffusers=True)
    vae = layout.vae.load(AutoencoderKL.from_pretrained, diffusers=True)
    text_encoder = layout.text_encoder.load(CLIPTextModel.from_pretrained, diffusers=False)
    tokenizer = _load(
        layout.tokenizer_shown,
        lambda: CLIPTokenizer.from_pretrained(layout.tokenizer_dir, local_files_only=True),
        layout.tokenizer_dir,
    )

    tensors = sum(1 for _ in unet.named_parameters())
    if tensors != SD1_UNET_TENSORS:
        raise ModelDirectoryError(
            f"{layout.shown!r} has a UNet with {tensors} parameter tensors, not SD 1.x's "
            f"{SD1_UNET_TENSORS}; {ACCEPTED}"
        )
    if len(tokenizer) > text_encoder.config.vocab_size:
        raise ModelDirectoryError(
            f"{layout.shown!r}: the tokenizer has {len(tokenizer)} tokens but the text encoder "
            f"only {text_encoder.config.vocab_size}; {ACCEPTED}"
        )
    # Some snapshots leave model_max_length unset (a huge sentinel): pad to the encoder's 77.
    tokenizer.model_max_length = min(tokenizer.model_max_length, SD1_TEXT_LENGTH)

    modules: tuple[torch.nn.Module, ...] = (unet, vae, text_encoder)
    for module in modules:
        # from_pretrained already gave fp32 (fp16 variants are upcast on load); move only.
        module.to(dev)
        module.eval()
        module.requires_grad_(False)
    return BaseModel(
        name=name or _base_name(directory),
        fingerprint=fingerprint,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        device=dev,
    )


def base_model_fingerprint(
    directory: str | os.PathLike[str], *, vae_directory: str | os.PathLike[str] | None = None
) -> str:
    """The fingerprint ``load_base_model`` would give, without loading any weights."""
    return check_base_model_directory(directory, vae_directory=vae_directory).fingerprint()


# ----------------------------------------------------------------------------------------------
# Finding weight files (shared with forgedit.caption)


@dataclass(frozen=True)
class WeightFiles:
    """The safetensors weights of one model folder: file names (relative to the folder) and
    the variant (``None`` for full precision, ``"fp16"``) they belong to."""

    files: tuple[str, ...]
    variant: str | None


def find_safetensors(
    directory: Path, stem: str, shown: str, missing: list[str], pickled: list[str]
) -> WeightFiles | None:
    """Find ``{stem}.safetensors`` (or its sharded index, or an fp16 variant of either) in
    ``directory``, preferring full precision.

    Problems are appended, not raised, so a caller can report every one at once: a missing
    file or shard to ``missing``, weights present only in a pickle format to ``pickled``
    (each as ``shown`` + the file name).
    """
    for variant in (None, "fp16"):
        single = _with_variant(f"{stem}.safetensors", variant)
        if (directory / single).is_file():
            return WeightFiles((single,), variant)
        index = _with_variant(f"{stem}.safetensors.index.json", variant)
        if (directory / index).is_file():
            shards = _shards_of(directory / index, display_path(shown, index))
            absent = [s for s in shards if not (directory / s).is_file()]
            missing.extend(display_path(shown, s) for s in absent)
            return WeightFiles(tuple(shards), variant) if not absent else None
    pickles = sorted(p.name for p in _files(directory) if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        pickled.extend(display_path(shown, p) for p in pickles)
    else:
        missing.append(display_path(shown, f"{stem}.safetensors"))
    return None


def read_json(path: Path, shown: str) -> JsonObject:
    """Read a JSON object, or raise ``ModelDirectoryError`` naming ``shown``."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelDirectoryError(f"{shown} is not readable JSON ({type(err).__name__})") from err
    if not isinstance(data, dict):
        raise ModelDirectoryError(f"{shown} must hold a JSON object")
    return data


def scrub_paths(message: str, replacements: Iterable[tuple[Path, str]]) -> str:
    """Replace the machine's absolute forms of each path in ``message`` by how the caller
    wrote it (library errors often quote resolved paths)."""
    for path, shown in replacements:
        for form in {str(path.resolve()), str(path.absolute())}:
            if len(form) > 1:
                message = message.replace(form, shown)
    return message


def _with_variant(name: str, variant: str | None) -> str:
    if variant is None:
        return name
    head, ext = name.rsplit(".", 1)
    return f"{head}.{variant}.{ext}"


def _shards_of(index: Path, shown: str) -> list[str]:
    weight_map = read_json(index, shown).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelDirectoryError(f"{shown} has no weight_map; it is not a sharded-weights index")
    return sorted({str(v) for v in weight_map.values()})


def _files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.is_file()] if directory.is_dir() else []


def display_path(shown: str, relative: str) -> str:
    """``relative`` inside a directory the caller wrote as ``shown`` (never made absolute)."""
    return relative if shown in ("", ".") else f"{shown.rstrip('/')}/{relative}"


# ----------------------------------------------------------------------------------------------
# Checking a base-model directory


@dataclass(frozen=True)
class ComponentFiles:
    """One model folder of the pipeline (UNet, VAE or text encoder), checked, ready to load."""

    role: str  # "unet", "vae" or "text_encoder": also its path prefix in the fingerprint
    directory: Path
    shown: str
    weights: WeightFiles
    config: JsonObject

    def load(self, from_pretrained: Callable[..., T], *, diffusers: bool) -> T:
        """``from_pretrained`` (a diffusers or transformers model class's) on this folder."""
        # diffusers and transformers name the dtype argument differently. diffusers materialises
        # a checkpoint twice unless it may load straight into empty modules, which needs
        # accelerate (a pinned dependency); transformers 5 always does.
        options: dict[str, object] = {"torch_dtype" if diffusers else "dtype": torch.float32}
        if diffusers:
            options["low_cpu_mem_usage"] = True
        return _load(
            self.shown,
            lambda: from_pretrained(
                self.directory,
                local_files_only=True,
                use_safetensors=True,
                variant=self.weights.variant,
                **options,
            ),
            self.directory,
        )


@dataclass(frozen=True)
class BaseModelLayout:
    """Where a checked base model's parts are; ``shown`` is the directory as the caller wrote
    it."""

    shown: str
    unet: ComponentFiles
    vae: ComponentFiles
    text_encoder: ComponentFiles
    tokenizer_dir: Path
    tokenizer_shown: str

    def fingerprint(self) -> str:
        return fingerprint_files(
            (f"{c.role}/{name}", c.directory / name)
            for c in (self.unet, self.vae, self.text_encoder)
            for name in c.weights.files
        )


def fingerprint_files(entries: Iterable[tuple[str, Path]]) -> str:
    """sha256 over sorted (relative path, sha256 of the file) pairs; files are streamed."""
    h = hashlib.sha256()
    for relative, path in sorted(entries):
        h.update(f"{relative}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def check_base_model_directory(
    directory: str | os.PathLike[str], *, vae_directory: str | os.PathLike[str] | None = None
) -> BaseModelLayout:
    """Check a base-model directory without reading weights; raise one ``ModelDirectoryError``
    describing everything wrong with it (see ``load_base_model``)."""
    root, shown = Path(directory), os.fspath(directory)
    _check_is_directory(root, shown, "base model directory")
    _check_not_other_kind(root, shown)

    missing: list[str] = []
    pickled: list[str] = []
    found: dict[str, tuple[Path, str, WeightFiles | None]] = {}
    for role, stem in (("unet", _DIFFUSERS_WEIGHTS), ("text_encoder", _TRANSFORMERS_WEIGHTS)):
        where, where_shown = root / role, display_path(shown, role)
        found[role] = _find_component(where, where_shown, stem, missing, pickled)

    vae_hint = ""
    if vae_directory is not None:
        vae_root, vae_shown = Path(vae_directory), os.fspath(vae_directory)
        _check_is_directory(vae_root, vae_shown, "vae_directory")
        if not (vae_root / "config.json").is_file() and (vae_root / "vae").is_dir():
            vae_root, vae_shown = vae_root / "vae", display_path(vae_shown, "vae")
        found["vae"] = _find_component(vae_root, vae_shown, _DIFFUSERS_WEIGHTS, missing, pickled)
    else:
        if not (root / "vae").is_dir():
            vae_hint = (
                f"{shown!r} has no vae/ (e.g. a 'noVAE' snapshot such as Realistic Vision's): "
                "give a separate VAE directory (--vae on the command line, vae_directory= in "
                "Python) with an SD 1.x VAE in diffusers format"
            )
        found["vae"] = _find_component(
            root / "vae", display_path(shown, "vae"), _DIFFUSERS_WEIGHTS, missing, pickled
        )

    tokenizer_dir = root / "tokenizer"
    tokenizer_shown = display_path(shown, "tokenizer")
    has_bpe = all((tokenizer_dir / f).is_file() for f in ("vocab.json", "merges.txt"))
    if not has_bpe and not (tokenizer_dir / "tokenizer.json").is_file():
        missing.append(
            f"{display_path(tokenizer_shown, 'vocab.json')} and merges.txt "
            f"(or {display_path(tokenizer_shown, 'tokenizer.json')})"
        )

    if missing or pickled:
        raise ModelDirectoryError(_problems_message(shown, missing, pickled, vae_hint))

    components = {}
    for role, (where, where_shown, weights) in found.items():
        assert weights is not None  # no missing files and no pickles: all found
        config = read_json(where / "config.json", display_path(where_shown, "config.json"))
        components[role] = ComponentFiles(role, where, where_shown, weights, config)

    problems = _structure_problems(
        root,
        shown,
        components["unet"].config,
        components["vae"].config,
        components["text_encoder"].config,
    )
    if problems:
        raise ModelDirectoryError(f"{shown!r} is {'; '.join(problems)}; {ACCEPTED}")
    return BaseModelLayout(
        shown=shown,
        unet=components["unet"],
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer_dir=tokenizer_dir,
        tokenizer_shown=tokenizer_shown,
    )


def _find_component(
    directory: Path, shown: str, stem: str, missing: list[str], pickled: list[str]
) -> tuple[Path, str, WeightFiles | None]:
    if not (directory / "config.json").is_file():
        missing.append(display_path(shown, "config.json"))
    return directory, shown, find_safetensors(directory, stem, shown, missing, pickled)


def _problems_message(shown: str, missing: list[str], pickled: list[str], vae_hint: str) -> str:
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing)}")
    if pickled:
        parts.append(f"weights only in a pickle format ({', '.join(pickled)}): {CONVERT_HINT}")
    message = f"base model directory {shown!r} is incomplete: {'; '.join(parts)}"
    if vae_hint:
        message += f". {vae_hint}"
    return f"{message}. {ACCEPTED[0].upper()}{ACCEPTED[1:]}"


def _check_is_directory(path: Path, shown: str, what: str) -> None:
    if path.is_dir():
        return
    if not path.exists():
        raise ModelDirectoryError(f"{what} {shown!r} does not exist")
    if path.suffix in (".safetensors", ".ckpt", ".bin", ".pt", ".pth"):
        raise ModelDirectoryError(
            f"{what} {shown!r} is a single file; single-file checkpoints are not accepted: "
            "convert it to a diffusers-format directory (diffusers' "
            "StableDiffusionPipeline.from_single_file(...).save_pretrained(DIR, "
            "safe_serialization=True))"
        )
    raise ModelDirectoryError(f"{what} {shown!r} is not a directory")


def _check_not_other_kind(root: Path, shown: str) -> None:
    """Name the kind of a directory that is recognisably not an SD 1.x pipeline."""
    what = None
    if (root / "model_index.json").is_file():
        index = read_json(root / "model_index.json", display_path(shown, "model_index.json"))
        pipeline = str(index.get("_class_name", ""))
        if pipeline and pipeline not in ACCEPTED_PIPELINES:
            xl = " (Stable Diffusion XL)" if "XL" in pipeline else ""
            what = f"a {pipeline} directory{xl}"
    elif (root / "config.json").is_file():
        config = read_json(root / "config.json", display_path(shown, "config.json"))
        if config.get("model_type") == "blip":
            what = (
                "a BLIP captioning model directory (pass it as the captioner, not as the base "
                "model)"
            )
        elif "_class_name" in config:
            what = (
                f"a single {config['_class_name']} component directory, not a whole pipeline "
                "(give the folder that contains unet/, vae/, text_encoder/ and tokenizer/)"
            )
        elif "model_type" in config:
            what = f"a {config['model_type']} model directory"
    if what:
        raise ModelDirectoryError(f"{shown!r} is {what}; {ACCEPTED}")


def _structure_problems(
    root: Path,
    shown: str,
    unet: JsonObject,
    vae: JsonObject,
    text: JsonObject,
) -> list[str]:
    """Read the component configs and say what the model is, if not SD 1.x-shaped."""
    problems: list[str] = []
    cross = unet.get("cross_attention_dim")
    if unet.get("addition_embed_type") == "text_time":
        return ["Stable Diffusion XL (its UNet takes text_time embeddings)"]
    if cross == 1024 or unet.get("use_linear_projection"):
        problems.append(
            "Stable Diffusion 2.x-shaped (1024-wide cross-attention / linear projections)"
        )
    scheduler = root / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        config = read_json(scheduler, display_path(shown, "scheduler/scheduler_config.json"))
        if config.get("prediction_type") == "v_prediction":
            problems.append("a v-prediction model (e.g. SD 2.x 768-v); SD 1.x predicts noise")
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        problems.append(f"a model whose unet/ is a {unet['_class_name']}")
    down, up = tuple(unet.get("down_block_types", ())), tuple(unet.get("up_block_types", ()))
    if down != SD1_DOWN_BLOCKS or up != SD1_UP_BLOCKS:
        problems.append(f"a UNet with blocks down={list(down)} up={list(up)}")
    if unet.get("layers_per_block", 2) != 2:
        problems.append(f"a UNet with {unet.get('layers_per_block')} layers per block, not 2")
    layers = unet.get("transformer_layers_per_block", 1)
    if layers != 1 and not (isinstance(layers, Sequence) and set(layers) == {1}):
        problems.append(f"a UNet with transformer_layers_per_block={layers}, not 1")
    extra = [
        k
        for k in (
            "class_embed_type",
            "addition_embed_type",
            "encoder_hid_dim",
            "time_cond_proj_dim",
            "num_class_embeds",
        )
        if unet.get(k) is not None
    ]
    if extra:
        problems.append(f"a UNet with extra conditioning inputs ({', '.join(extra)})")
    channels = (unet.get("in_channels", 4), unet.get("out_channels", 4))
    if channels != (4, 4):
        kind = {9: " (an inpainting model)", 8: " (an InstructPix2Pix-style model)"}
        problems.append(
            f"a UNet with {channels[0]} input / {channels[1]} output channels, not 4"
            + kind.get(channels[0], "")
        )
    if vae.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        problems.append(f"a model whose VAE is a {vae['_class_name']}, not an AutoencoderKL")
    if vae.get("latent_channels", 4) != 4:
        problems.append(f"a model with {vae.get('latent_channels')} latent channels, not 4")
    levels = len(vae.get("block_out_channels", (0,) * 4))
    if levels != 4:
        problems.append(f"a model whose VAE has {levels} levels, not 4 (8 px per latent)")
    if text.get("model_type") != "clip_text_model":
        problems.append(
            f"a model whose text encoder is {text.get('model_type')!r}, not a CLIPTextModel"
        )
    if text.get("hidden_size") != cross:
        problems.append(
            f"a model whose text encoder is {text.get('hidden_size')} wide but whose UNet "
            f"cross-attention expects {cross}"
        )
    if text.get("max_position_embeddings", SD1_TEXT_LENGTH) != SD1_TEXT_LENGTH:
        problems.append(
            f"a model whose text encoder reads {text.get('max_position_embeddings')} tokens, "
            f"not {SD1_TEXT_LENGTH}"
        )
    return problems


def _load(shown: str, build: Callable[[], T], directory: Path | None = None) -> T:
    """Run a ``from_pretrained`` call; turn any failure into a ``ModelDirectoryError`` whose
    message shows paths as the caller gave them."""
    try:
        with quiet_loading():
            return build()
    except ModelDirectoryError:
        raise
    except Exception as err:  # corrupt or truncated files surface as many exception types
        detail = str(err)
        if directory is not None:
            detail = scrub_paths(detail, [(directory, shown)])
        raise ModelDirectoryError(
            f"could not load {shown}: {type(err).__name__}: {detail}"
        ) from err


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' per-load "Loading weights" progress bars (server logs are not a
    terminal), restoring the previous setting afterwards."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _base_name(directory: str | os.PathLike[str]) -> str:
    path = Path(directory)
    return path.name or path.resolve().name or "base-model"
