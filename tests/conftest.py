"""Shared fixtures. Torch runs on one thread: on these 2-core machines two threads under any
foreign load run 5–25× slower (ENVIRONMENT.md)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE_PHOTOS = REPO / "samples" / "photos"

# Shared helpers live in the tests/support package (imported as ``support``: pytest puts this
# folder on sys.path for its root conftest).


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    """The repository's openly licensed sample photos (samples/photos; licences in its README):
    real photographs for the tests that need one (EXIF orientation, alpha, a JPEG named .png)."""
    return SAMPLE_PHOTOS


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deterministic tiny SD-1.x-shaped pipeline + tiny BLIP, written once per session in
    the real on-disk formats (``DIR/stable-diffusion``, ``DIR/blip``)."""
    from forgedit.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(root / "model")
    return root / "model"


@pytest.fixture(scope="session")
def shapes_model_dir() -> Path:
    """The shipped toy-world model (forgedit/zoo/shapes/model), checked against its manifest."""
    from forgedit.zoo.shapes import shapes_model

    return shapes_model().root


@pytest.fixture(scope="session")
def shapes_clip(shapes_model_dir: Path) -> object:
    """The toy world's scoring CLIP, loaded once per session."""
    from forgedit.eval.scorers import ClipScorer

    return ClipScorer.load(shapes_model_dir / "clip")
