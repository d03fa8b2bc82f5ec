"""Tiny deterministic models in the real on-disk formats, for tests and demos without weights.

``make_tiny_model(DIR)`` writes two model directories that the engine loads through exactly
the same code as real checkpoints (``make_random_model(DIR, preset)`` writes the first alone at
other sizes, up to SD 1.x itself: ``PRESETS``):

``DIR/stable-diffusion/``
    A diffusers Stable Diffusion 1.x pipeline (``model_index.json``, ``unet/``, ``vae/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/``), safetensors only.

    - The UNet has SD 1.x's block layout (CrossAttnDownBlock2D ×3 + DownBlock2D, UpBlock2D +
      CrossAttnUpBlock2D ×3, two layers per block, one transformer layer), so its 686 parameter
      tensors have the same names in the same order as SD 1.4's; only the widths are tiny
      (3.26 M parameters). ``sample_size`` 8 makes its native resolution 64×64 px.
    - The VAE has 4 levels, so H×W px become H/8×W/8 latents as in SD; scaling factor 0.18215.
    - The text encoder is a tiny CLIP (width 32, 2 layers, 77 positions) behind SD's *real*
      CLIP tokenizer (49,408 tokens), rebuilt from the BPE merges that ship in the
      ``open-clip-torch`` wheel, so prompts tokenize exactly as in SD.
    - The scheduler is SD's own PNDM config, ``steps_offset=1`` included, like real checkpoints.

``DIR/blip/``
    A BLIP captioner in the ``Salesforce/blip-image-captioning-base`` layout (``config.json``,
    ``model.safetensors``, the real BLIP image-processor settings, a BERT-uncased-style
    tokenizer over a hand-written vocabulary of common English words), so its random captions
    read as words.

Everything is drawn from one fixed seed: two calls give byte-identical weight files. The
directory is written atomically (built in a temporary sibling, then renamed into place).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgedit.durable import JsonObject, fsync_dir, fsync_tree, write_json_atomic
from forgedit.errors import ModelDirectoryError

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

SEED = 0
RECIPE_VERSION = 1
STAMP_FILE = "tiny-model.json"
STAMP_FORMAT = "forgedit.tiny-model"
SD_SUBDIR = "stable-diffusion"
BLIP_SUBDIR = "blip"

OPEN_CLIP_INSTALL = "pip install --no-deps open-clip-torch==3.3.0"
_BPE_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
_CLIP_MERGES = 49152 - 256 - 2  # as in OpenAI's CLIP SimpleTokenizer: 48,894 merges

# SD 1.x (CompVis/stable-diffusion-v1-4) UNet structure; only the widths below are ours.
SD1_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
SD1_UP_BLOCKS = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
# Widths must grow where SD's grow (320 < 640 < 1280 = 1280): equal neighbours would drop the
# resnets' conv_shortcut tensors and change the parameter names.
TINY_UNET_WIDTHS = (32, 48, 72, 72)
TINY_TEXT_WIDTH = 32

# BLIP: BERT-uncased-style special tokens (the ones BLIP's tokenizer and generate() use), then
# words. [DEC] is BLIP's decoder BOS; [SEP] ends a caption; [ENC] marks image-grounded text.
BLIP_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BLIP_ADDED_TOKENS = ("[DEC]", "[ENC]")
# Common lower-case English words, mostly the kind that appear in photo captions.
_BLIP_WORDS_TEXT = """
a an the this that these those some two three four five many several one its their his her
of in on at with and or by for from to into onto over under near behind beside between
across through around above below along next front top side inside outside up down out off
is are was be being has have holding sitting standing lying walking running riding eating
drinking playing looking flying swimming jumping sleeping smiling wearing carrying reading
talking waiting parked covered filled made cut painted stacked hanging growing floating
man woman men women person people boy girl child children baby kid kids family couple
friend player crowd group team dog dogs cat cats horse horses bird birds cow cows sheep
bear bears elephant elephants giraffe zebra duck fish goat rabbit lion tiger monkey
car cars truck bus train bike bicycle motorcycle boat plane airplane kite skateboard
surfboard skis ball frisbee racket umbrella bag backpack suitcase hat shirt dress jacket
shoes glasses phone laptop computer keyboard book books clock vase bottle cup glass bowl
plate fork knife spoon pizza cake sandwich banana apple orange apples oranges bread
donut hot food meal table chair chairs couch bed bench desk door window wall floor
room kitchen bathroom sink toilet mirror shelf lamp picture painting sign light lights
house building buildings tower bridge church city town street road sidewalk park yard
garden field grass tree trees flower flowers plant plants bush forest mountain mountains
hill hills rock rocks sand beach ocean sea lake river water wave waves snow ice sky
cloud clouds sun moon night day sunset rain fire smoke field fence pole wire track
red blue green yellow white black brown gray grey orange pink purple gold silver
dark bright colorful wooden metal stone glass plastic old new young small little large
big tall long short open empty full busy wet dry cold warm sunny cloudy green lush
close view photo image picture shot scene background middle corner edge group pair
very together other another different same each all few lot lots of
"""
BLIP_WORDS = tuple(dict.fromkeys(_BLIP_WORDS_TEXT.split()))  # in order, repeats dropped


def make_tiny_model(directory: str | os.PathLike[str]) -> Path:
    """Write the tiny Stable Diffusion 1.x pipeline and tiny BLIP captioner to ``directory``.

    ``directory`` must not exist or be an empty directory; its parent is created if needed.
    Returns ``Path(directory)``, holding ``stable-diffusion/``, ``blip/`` and a stamp file.

    Raises ``ModelDirectoryError`` if ``directory`` exists and is not empty, or if the
    ``open-clip-torch`` distribution (the source of SD's tokenizer vocabulary) is not installed.
    Nothing is left at ``directory`` on failure.
    """
    target = _new_model_dir(directory, "the tiny model")
    with _building_next_to(target) as tmp:
        _write_tiny_model(tmp)
        os.rename(tmp, target)  # replaces an empty directory; fails on a non-empty one
    fsync_dir(target.parent)
    return target


def default_tiny_model_dir() -> Path:
    """Where ``ensure_tiny_model`` keeps the tiny model by default.

    ``$FORGEDIT_HOME/tiny-model`` if ``FORGEDIT_HOME`` is set, else
    ``${XDG_DATA_HOME:-~/.local/share}/forgedit/tiny-model``.
    """
    home = os.environ.get("FORGEDIT_HOME")
    if home:
        return Path(home) / "tiny-model"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join("~", ".local", "share")
    return Path(data).expanduser() / "forgedit" / "tiny-model"


def ensure_tiny_model(directory: str | os.PathLike[str] | None = None) -> Path:
    """Return the tiny model directory, writing it first if it does not exist yet.

    ``directory`` defaults to ``default_tiny_model_dir()``. Safe when several processes call it
    at once: each builds in its own temporary sibling and renames it into place; whoever loses
    the race discards its copy and uses the winner's (the contents are identical anyway).

    Raises ``ModelDirectoryError`` if ``directory`` holds something other than a tiny model of
    this version (it is never overwritten), or as ``make_tiny_model``.
    """
    target = Path(directory) if directory is not None else default_tiny_model_dir()
    shown = os.fspath(directory) if directory is not None else "the default tiny-model directory"
    if _is_empty_dir(target) or not target.exists():
        with _building_next_to(target) as tmp:
            _write_tiny_model(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir() or _is_empty_dir(target):
                    raise
                # Another process renamed its copy into place first: ours is discarded.
        fsync_dir(target.parent)
    _check_stamp(target, shown)
    return target


# ----------------------------------------------------------------------------------------------
# Building


def _write_tiny_model(root: Path) -> None:
    """Write every file of the tiny model into the (empty, private) directory ``root``."""
    import torch

    from forgedit.models import quiet_loading

    # Fork the RNG so building the model never disturbs the caller's random stream.
    with torch.random.fork_rng(devices=[]), quiet_loading():
        _write_stable_diffusion(root / SD_SUBDIR)
        _write_blip(root / BLIP_SUBDIR)
    stamp = {"format": STAMP_FORMAT, "version": RECIPE_VERSION, "seed": SEED}
    (root / STAMP_FILE).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    fsync_tree(root)


def _write_stable_diffusion(directory: Path, preset: str = "tiny") -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    recipe = PRESETS[preset]
    tokenizer = clip_tokenizer()

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**recipe.unet)
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        scaling_factor=0.18215,
        **recipe.vae,
    )
    torch.manual_seed(SEED + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            hidden_act="quick_gelu",  # SD 1.x's CLIP ViT-L/14 text tower
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            **recipe.text_encoder,
        )
    )
    # SD 1.4's scheduler_config.json, steps_offset=1 included.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory, safe_serialization=True)  # type: ignore[attr-defined]
    # transformers 5 saves a tokenizer as tokenizer.json only; real SD 1.x snapshots carry
    # OpenAI's vocab.json + merges.txt. Write that layout so loading takes the real path.
    shutil.rmtree(directory / "tokenizer")
    write_clip_tokenizer_files(directory / "tokenizer")


def tiny_unet_config() -> JsonObject:
    """The tiny UNet's config: SD 1.4's UNet config with tiny widths (same parameter names)."""
    return {
        **sd1_unet_config(),
        "block_out_channels": TINY_UNET_WIDTHS,
        "norm_num_groups": 8,
        "attention_head_dim": 8,  # SD 1.x's legacy name for the number of heads; 8 divides all
        "cross_attention_dim": TINY_TEXT_WIDTH,
        "sample_size": 8,  # 8 latents × 8 = 64 px native resolution
    }


def sd1_unet_config() -> JsonObject:
    """The UNet config of CompVis/stable-diffusion-v1-4 (shared by SD 1.5 and its fine-tunes)."""
    return {
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": (320, 640, 1280, 1280),
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": SD1_DOWN_BLOCKS,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": SD1_UP_BLOCKS,
    }


@dataclass(frozen=True)
class RandomPreset:
    """One random SD-1.x-shaped pipeline: the UNet config, the VAE's widths and the CLIP text
    tower's sizes (everything else is SD 1.x's own), and what it is for."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    purpose: str


PRESETS = {
    "tiny": RandomPreset(
        tiny_unet_config(),
        {"block_out_channels": (16, 16, 32, 32), "norm_num_groups": 8, "sample_size": 64},
        {
            "hidden_size": TINY_TEXT_WIDTH,
            "intermediate_size": 64,
            "projection_dim": TINY_TEXT_WIDTH,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        "tests and demos: 3.3 M UNet parameters, 64x64 px native",
    ),
    "medium": RandomPreset(
        {**sd1_unet_config(), "block_out_channels": (256, 512, 1024, 1024)},
        {"block_out_channels": (32, 64, 128, 128), "norm_num_groups": 32, "sample_size": 512},
        {
            "hidden_size": 768,
            "intermediate_size": 768,
            "projection_dim": 768,
            "num_hidden_layers": 1,
            "num_attention_heads": 12,
        },
        "SD 1.x's layout at 0.8x its widths: a 2.2 GB fp32 UNet, just over protobuf's 2 GB "
        "limit, with a small VAE and a one-layer text tower (512x512 px native)",
    ),
    "sd1": RandomPreset(
        sd1_unet_config(),
        {"block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "sample_size": 512},
        {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "projection_dim": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
        },
        "SD 1.x itself with random weights: 860 M UNet parameters (3.4 GB fp32), CLIP ViT-L/14 "
        "text encoder, the SD VAE, 512x512 px native",
    ),
}


def make_random_model(directory: str | os.PathLike[str], preset: str = "sd1") -> Path:
    """Write a diffusers Stable Diffusion 1.x pipeline with random weights, of ``preset``'s
    sizes (``PRESETS``), to ``directory`` (which must not exist or be empty), atomically.
    Deterministic: the same preset gives the same weights. The real CLIP tokenizer and SD's
    scheduler, as ``make_tiny_model``; no BLIP captioner. Returns ``Path(directory)``."""
    if preset not in PRESETS:
        raise ModelDirectoryError(
            f"unknown random-model preset {preset!r}; accepted: {', '.join(PRESETS)}"
        )
    target = _new_model_dir(directory, "the random model")
    import torch

    from forgedit.models import quiet_loading

    with _building_next_to(target) as tmp:
        with torch.random.fork_rng(devices=[]), quiet_loading():
            _write_stable_diffusion(tmp, preset)
        fsync_tree(tmp)
        os.rename(tmp, target)
    fsync_dir(target.parent)
    return target


# ----------------------------------------------------------------------------------------------
# SD's CLIP tokenizer, rebuilt from the open-clip-torch wheel


def clip_bpe_merges() -> list[tuple[str, str]]:
    """OpenAI CLIP's 48,894 BPE merges, read from the installed ``open-clip-torch`` wheel.

    The file is read as package data through ``importlib.metadata``; ``open_clip`` itself is
    never imported (it needs torchvision). Raises ``ModelDirectoryError`` with the install
    command if the distribution is missing.
    """
    try:
        dist = importlib.metadata.distribution("open-clip-torch")
    except importlib.metadata.PackageNotFoundError:
        raise ModelDirectoryError(
            "the tiny model needs SD's CLIP vocabulary from the open-clip-torch wheel, which is "
            f"not installed; install it with: {OPEN_CLIP_INSTALL}"
        ) from None
    path = Path(str(dist.locate_file(_BPE_FILE)))
    if not path.is_file():
        raise ModelDirectoryError(
            f"the installed open-clip-torch has no {_BPE_FILE}; reinstall it with: "
            f"{OPEN_CLIP_INSTALL}"
        )
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    # Line 0 is a version header; CLIP uses exactly the next 48,894 merges.
    merges = [tuple(line.split()) for line in lines[1 : 1 + _CLIP_MERGES]]
    if len(merges) != _CLIP_MERGES or any(len(m) != 2 for m in merges):
        raise ModelDirectoryError(
            f"{_BPE_FILE} in open-clip-torch is not CLIP's merge list; reinstall it with: "
            f"{OPEN_CLIP_INSTALL}"
        )
    return [(a, b) for a, b in merges]


def clip_vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's 49,408-token vocabulary, in OpenAI's order: the 256 byte symbols, the same with
    the end-of-word mark ``</w>``, one token per merge, then ``<|startoftext|>`` (49406) and
    ``<|endoftext|>`` (49407)."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def clip_tokenizer() -> CLIPTokenizer:
    """SD 1.x's CLIP tokenizer (a transformers ``CLIPTokenizer``), pad = ``<|endoftext|>``."""
    from transformers import CLIPTokenizer

    merges: Any = clip_bpe_merges()  # transformers 5 wants (a, b) tuples despite its hints
    return CLIPTokenizer(
        vocab=clip_vocabulary(merges),
        merges=merges,
        model_max_length=77,
        pad_token="<|endoftext|>",
    )


def write_clip_tokenizer_files(
    directory: Path, merges: list[tuple[str, str]] | None = None
) -> None:
    """Write a tokenizer folder as in CompVis/stable-diffusion-v1-4: CLIP's vocabulary built
    from ``merges`` (default: all of CLIP's; a subset gives a smaller vocabulary in the same
    format and order)."""
    if merges is None:
        merges = clip_bpe_merges()
    directory.mkdir(parents=True)
    vocab = clip_vocabulary(merges)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (directory / "merges.txt").write_text(merges_text, "utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    config = {
        **special,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
    }
    write_json_atomic(directory / "tokenizer_config.json", config)
    write_json_atomic(directory / "special_tokens_map.json", special)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


# ----------------------------------------------------------------------------------------------
# BLIP


def blip_vocabulary() -> list[str]:
    """The tiny BLIP tokenizer's vocabulary, one token per line of ``vocab.txt``."""
    return [*BLIP_SPECIAL_TOKENS, *BLIP_WORDS, *BLIP_ADDED_TOKENS]


def _write_blip(directory: Path) -> None:
    import torch
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipTextConfig,
        BlipVisionConfig,
    )

    vocab = blip_vocabulary()
    ids = {token: i for i, token in enumerate(vocab)}
    text_config = BlipTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        encoder_hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        bos_token_id=ids["[DEC]"],
        eos_token_id=ids["[SEP]"],
        sep_token_id=ids["[SEP]"],
        pad_token_id=ids["[PAD]"],
        # Larger than BLIP's 0.02 so that random weights give varied, image-dependent words.
        initializer_range=0.3,
    )
    vision_config = BlipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=384,
        patch_size=16,
        initializer_range=0.3,  # BLIP's own 1e-10 would make every image look the same
    )
    config = BlipConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        projection_dim=32,
    )
    torch.manual_seed(SEED + 3)
    model = BlipForConditionalGeneration(config)
    # Keep special tokens other than [SEP] out of captions: greedy decoding would otherwise
    # emit [MASK]/[PAD]/... which decode to nothing and could leave an empty caption.
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.bias
        for token in (*BLIP_SPECIAL_TOKENS, *BLIP_ADDED_TOKENS):
            if token != "[SEP]":
                bias[ids[token]] = -100.0
    model.save_pretrained(directory, safe_serialization=True)
    # blip-image-captioning-base ships no generation_config.json; captioning passes its
    # generation arguments explicitly, so don't let a saved default hide a missing one.
    (directory / "generation_config.json").unlink(missing_ok=True)

    (directory / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab), "utf-8")
    special = {
        "bos_token": "[DEC]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        "pad_token": "[PAD]",
        "sep_token": "[SEP]",
        "unk_token": "[UNK]",
        "additional_special_tokens": ["[ENC]"],
    }
    tokenizer_config = {
        **special,
        "do_basic_tokenize": True,
        "do_lower_case": True,
        "model_max_length": 512,
        "processor_class": "BlipProcessor",
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "tokenizer_class": "BertTokenizer",
    }
    write_json_atomic(directory / "tokenizer_config.json", tokenizer_config)
    write_json_atomic(directory / "special_tokens_map.json", special)
    # blip-image-captioning-base's image processor: 384×384 bicubic, 1/255, CLIP mean/std.
    preprocessor = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_processor_type": "BlipImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "processor_class": "BlipProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": 384, "width": 384},
    }
    write_json_atomic(directory / "preprocessor_config.json", preprocessor)


# ----------------------------------------------------------------------------------------------
# Files


@contextlib.contextmanager
def _building_next_to(target: Path) -> Iterator[Path]:
    """A fresh temporary directory beside ``target`` (same filesystem, so rename is atomic),
    removed afterwards unless it was renamed away."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_stamp(target: Path, shown: str) -> None:
    try:
        stamp = json.loads((target / STAMP_FILE).read_text())
    except (OSError, ValueError):
        stamp = None
    if not (
        isinstance(stamp, dict)
        and stamp.get("format") == STAMP_FORMAT
        and stamp.get("version") == RECIPE_VERSION
        and (target / SD_SUBDIR).is_dir()
        and (target / BLIP_SUBDIR).is_dir()
    ):
        raise ModelDirectoryError(
            f"{shown} exists but does not hold a version-{RECIPE_VERSION} tiny model "
            f"({STAMP_FILE}, {SD_SUBDIR}/, {BLIP_SUBDIR}/); remove it so it can be rebuilt, "
            "or choose another directory"
        )


def _new_model_dir(directory: str | os.PathLike[str], what: str) -> Path:
    """``directory`` as a path if it does not exist or is empty, else ``ModelDirectoryError``."""
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ModelDirectoryError(
            f"cannot write {what} to {os.fspath(directory)!r}: it already exists and is not an "
            "empty directory; give a new or empty directory"
        )
    return target


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())
