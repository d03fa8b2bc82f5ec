"""The scores of an edit, as the paper reports them and as editing papers define them.

- **CLIP score**: the cosine similarity of the CLIP image embedding of the output and the CLIP
  text embedding of the target text (raw cosine in [-1, 1]; CLIPScore's ×2.5 or ×100
  scalings are not applied).
- **CLIP directional similarity** (StyleGAN-NADA, InstructPix2Pix): the cosine of
  ``E_img(output) - E_img(input)`` and ``E_txt(target) - E_txt(source)``: does the image move
  the way the text moves? 0 when the output equals the input.
- **LPIPS** (Zhang et al. 2018, v0.1, AlexNet): perceptual distance of the output to the
  input; lower is closer. Weights come from a path (none ship): one safetensors file holding
  the ``lpips`` package's ``LPIPS(net="alex")`` state dict (``net.slice1.0.weight`` …
  ``net.slice5.10.bias`` from torchvision's AlexNet, ``lin0.model.1.weight`` …
  ``lin4.model.1.weight`` from ``lpips/weights/v0.1/alex.pth``); the network definition below
  is the package's, so the same file gives the same numbers.
- **SSIM** (Gaussian window 11, σ 1.5) and **PSNR** (data range 1) of the output against the
  input resized to the output's size (bicubic), by torchmetrics.

CLIP is loaded with transformers' own ``CLIPModel`` and ``CLIPProcessor`` from a local
directory, so the same code scores with real ``openai/clip-vit-large-patch14`` weights and
with the toy world's small CLIP. Everything runs in fp32, one image at a time, on the CPU
unless told otherwise.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from forgedit.errors import ModelDirectoryError

if TYPE_CHECKING:
    from PIL import Image

CLIP_ACCEPTED = (
    "accepted: a transformers CLIPModel directory (config.json with model_type 'clip', "
    "model.safetensors or its fp16 variant, preprocessor_config.json, and the tokenizer's "
    "vocab.json + merges.txt or tokenizer.json), e.g. openai/clip-vit-large-patch14"
)


class ClipScorer:
    """A CLIP model and its processor; embeddings are L2-normalised, fp32."""

    def __init__(self, model: Any, processor: Any, device: torch.device) -> None:
        self.model = model
        self.processor = processor
        self.device = device
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def load(cls, directory: str | os.PathLike[str], device: str = "cpu") -> ClipScorer:
        """Load a CLIP model offline from ``directory``; ``ModelDirectoryError`` names what is
        wrong with the directory."""
        from transformers import CLIPModel, CLIPProcessor

        from forgedit.models import find_safetensors, quiet_loading, read_json, scrub_paths

        root, shown = Path(directory), os.fspath(directory)
        if not root.is_dir():
            state = "does not exist" if not root.exists() else "is not a directory"
            raise ModelDirectoryError(f"CLIP directory {shown!r} {state}; {CLIP_ACCEPTED}")
        config_path = root / "config.json"
        if not config_path.is_file():
            raise ModelDirectoryError(
                f"CLIP directory {shown!r} has no config.json; {CLIP_ACCEPTED}"
            )
        model_type = read_json(config_path, f"{shown}/config.json").get("model_type")
        if model_type != "clip":
            raise ModelDirectoryError(
                f"{shown!r} is a {model_type or 'unknown'} model directory, not CLIP; "
                f"{CLIP_ACCEPTED}"
            )
        missing: list[str] = []
        pickled: list[str] = []
        weights = find_safetensors(root, "model", shown, missing, pickled)
        if weights is None or missing or pickled:
            problems = [*(f"missing {m}" for m in missing), *(f"pickle only: {p}" for p in pickled)]
            raise ModelDirectoryError(
                f"CLIP directory {shown!r} is incomplete ({'; '.join(problems)}); {CLIP_ACCEPTED}"
            )
        dev = torch.device(device)
        try:
            with quiet_loading():
                processor = CLIPProcessor.from_pretrained(root, local_files_only=True)
                model: Any = CLIPModel.from_pretrained(
                    root,
                    local_files_only=True,
                    use_safetensors=True,
                    variant=weights.variant,
                    dtype=torch.float32,
                )
        except Exception as err:  # corrupt files surface as many exception types
            detail = scrub_paths(str(err), [(root, shown)])
            raise ModelDirectoryError(
                f"could not load CLIP from {shown!r}: {type(err).__name__}: {detail}"
            ) from err
        model.to(dev).eval().requires_grad_(False)
        return cls(model, processor, dev)

    @torch.inference_mode()
    def image_embedding(self, image: Image.Image) -> torch.Tensor:
        """[D] unit vector for one image."""
        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt").pixel_values
        features = _tensor(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        return _unit(features[0].float().cpu())

    @torch.inference_mode()
    def text_embedding(self, text: str) -> torch.Tensor:
        """[D] unit vector for one text (cached: prompts repeat across outputs)."""
        if text not in self._text_cache:
            tokens = self.processor.tokenizer(
                [text], padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            features = _tensor(self.model.get_text_features(**tokens))
            self._text_cache[text] = _unit(features[0].float().cpu())
        return self._text_cache[text]

    def score(self, image_embedding: torch.Tensor, text: str) -> float:
        """CLIP score: cosine of an image embedding and a text."""
        return float(image_embedding @ self.text_embedding(text))

    def rank(self, image_embedding: torch.Tensor, texts: Sequence[str]) -> list[float]:
        """CLIP score of one image against each of ``texts`` (for top-1 classification)."""
        return [self.score(image_embedding, t) for t in texts]

    def directional(
        self,
        input_embedding: torch.Tensor,
        output_embedding: torch.Tensor,
        source_text: str,
        target_text: str,
    ) -> float:
        """CLIP directional similarity (module doc); 0 if either difference vanishes."""
        image_delta = output_embedding - input_embedding
        text_delta = self.text_embedding(target_text) - self.text_embedding(source_text)
        denominator = image_delta.norm() * text_delta.norm()
        if float(denominator) < 1e-12:
            return 0.0
        return float(image_delta @ text_delta / denominator)


def _tensor(features: Any) -> torch.Tensor:
    """transformers 5 may return a model output rather than a tensor; take the embeddings."""
    if isinstance(features, torch.Tensor):
        return features
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(features, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected CLIP features of type {type(features).__name__}")


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp(min=1e-12)


# ----------------------------------------------------------------------------------------------
# LPIPS (the `lpips` package's network definition, v0.1, AlexNet backbone)

LPIPS_CHANNELS = (64, 192, 384, 256, 256)
LPIPS_ACCEPTED = (
    "accepted: one .safetensors file with the lpips package's LPIPS(net='alex') state dict "
    "(net.slice1.0.weight ... net.slice5.10.bias, lin0.model.1.weight ... lin4.model.1.weight; "
    "scaling_layer.* optional), e.g. written by safetensors.torch.save_file(lpips.LPIPS("
    "net='alex').state_dict(), 'lpips_alex.safetensors')"
)


class _ScalingLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift: torch.Tensor = self.shift  # type: ignore[assignment]
        scale: torch.Tensor = self.scale  # type: ignore[assignment]
        return (x - shift) / scale


class _AlexSlices(nn.Module):
    """torchvision's ``alexnet().features`` cut into lpips' five slices, keeping its indices
    (``slice2.3`` is ``features[3]``), so the state-dict names are lpips'."""

    def __init__(self) -> None:
        super().__init__()
        relu = lambda: nn.ReLU(inplace=False)  # noqa: E731
        features: list[nn.Module] = [
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            relu(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            relu(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            relu(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            relu(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            relu(),
        ]
        bounds = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))
        for n, (lo, hi) in enumerate(bounds, start=1):
            layers = OrderedDict((str(i), features[i]) for i in range(lo, hi))
            self.add_module(f"slice{n}", nn.Sequential(layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for n in range(1, 6):
            x = getattr(self, f"slice{n}")(x)
            out.append(x)
        return out


class _NetLinLayer(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class Lpips(nn.Module):
    """LPIPS v0.1 with the AlexNet backbone; ``distance`` takes images in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = _ScalingLayer()
        self.net = _AlexSlices()
        for n, channels in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{n}", _NetLinLayer(channels))

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu") -> Lpips:
        """LPIPS with the weights in ``path`` (module doc); ``ModelDirectoryError`` names every
        missing, unexpected or mis-shaped tensor."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        shown = os.fspath(path)
        file = Path(path)
        if not file.is_file():
            state = "does not exist" if not file.exists() else "is not a file"
            raise ModelDirectoryError(f"LPIPS weights {shown!r} {state}; {LPIPS_ACCEPTED}")
        if file.suffix != ".safetensors":
            raise ModelDirectoryError(
                f"LPIPS weights {shown!r} are not a .safetensors file (pickle files such as "
                f".pth are never loaded: convert them); {LPIPS_ACCEPTED}"
            )
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelDirectoryError(
                f"LPIPS weights {shown!r} are not readable safetensors ({err})"
            ) from err
        model = cls()
        expected = {k: v.shape for k, v in model.state_dict().items()}
        optional = {k for k in expected if k.startswith("scaling_layer.")}
        missing = sorted(set(expected) - set(tensors) - optional)
        unexpected = sorted(set(tensors) - set(expected))
        wrong = sorted(
            f"{k} {tuple(tensors[k].shape)} (want {tuple(expected[k])})"
            for k in set(tensors) & set(expected)
            if tensors[k].shape != expected[k]
        )
        problems = [
            *([f"missing {', '.join(missing)}"] if missing else []),
            *([f"unexpected {', '.join(unexpected)}"] if unexpected else []),
            *([f"wrong shape {', '.join(wrong)}"] if wrong else []),
        ]
        if problems:
            raise ModelDirectoryError(
                f"LPIPS weights {shown!r} do not fit LPIPS(net='alex'): {'; '.join(problems)}; "
                f"{LPIPS_ACCEPTED}"
            )
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
        model.to(torch.device(device)).eval().requires_grad_(False)
        return model

    @torch.inference_mode()
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """LPIPS between two [3, H, W] (or [1, 3, H, W]) images in [0, 1]."""
        device = next(self.parameters()).device
        x = self.scaling_layer(_batched(a).to(device) * 2 - 1)
        y = self.scaling_layer(_batched(b).to(device) * 2 - 1)
        total = torch.zeros(())
        for n, (fx, fy) in enumerate(zip(self.net(x), self.net(y), strict=True)):
            diff = (_normalise(fx) - _normalise(fy)) ** 2
            lin: _NetLinLayer = getattr(self, f"lin{n}")
            total = total + lin.model(diff).mean(dim=(2, 3)).sum().cpu()
        return float(total)


def _normalise(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + eps)


def _batched(x: torch.Tensor) -> torch.Tensor:
    return x[None] if x.dim() == 3 else x


# ----------------------------------------------------------------------------------------------
# SSIM and PSNR (torchmetrics)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """SSIM of two [3, H, W] images in [0, 1] (Gaussian window 11, σ 1.5, data range 1)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    value = structural_similarity_index_measure(_batched(a), _batched(b), data_range=1.0)
    return float(value)  # type: ignore[arg-type]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [3, H, W] images in [0, 1] (inf for identical images)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(_batched(a), _batched(b), data_range=1.0))


def to_tensor(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """[3, H, W] float in [0, 1]; resized to ``size`` (width, height) with bicubic first."""
    import numpy as np
    from PIL import Image as PILImage

    rgb = image.convert("RGB")
    if size is not None and rgb.size != size:
        rgb = rgb.resize(size, PILImage.Resampling.BICUBIC)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
