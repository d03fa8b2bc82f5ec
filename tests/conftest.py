"""Shared fixtures. Torch runs on one thread: on these 2-core machines two threads under any
foreign load run 5–25× slower (ENVIRONMENT.md)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

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


class _FallbackWatch(logging.Handler):
    """Every UNet backend fallback of this process (``forgedit.backends.select`` logs each
    with the ``Fallback`` attached)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        fallback = getattr(record, "fallback", None)
        if fallback is not None:
            self.seen.append(f"{fallback.backend}:{fallback.reason}")


_FALLBACKS = _FallbackWatch()
logging.getLogger("forgedit.backends").addHandler(_FALLBACKS)
_FALLBACKS_BEFORE = pytest.StashKey[int]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    # Counted before any fixture is set up, so an engine a module fixture builds for this
    # test is this test's to explain.
    item.stash[_FALLBACKS_BEFORE] = len(_FALLBACKS.seen)
    yield


@pytest.fixture(autouse=True)
def _backend_fallbacks_are_expected(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that asks for an accelerated backend and silently gets the next one would
    compare torch with torch and pass: every in-process fallback fails the test unless it
    names it, ``@pytest.mark.backend_fallback("tensorrt:no_cuda", ...)`` (backend:reason)."""
    yield
    marker = request.node.get_closest_marker("backend_fallback")
    expected = set(marker.args) if marker is not None else set()
    happened = _FALLBACKS.seen[request.node.stash.get(_FALLBACKS_BEFORE, 0) :]
    unexpected = sorted(set(happened) - expected)
    if unexpected:
        pytest.fail(
            f"unexpected UNet backend fallback(s): {', '.join(unexpected)}; a test that "
            "expects one says so with @pytest.mark.backend_fallback(...)",
            pytrace=False,
        )


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
    from forgedit.zoo.tiny import make_tiny_model

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
