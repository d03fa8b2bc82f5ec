"""MLflow-native use: a registered edit model loads with ``mlflow.pyfunc.load_model("models:/…")``
(models-from-code, nothing pickled) and samples the same edits as the engine called directly."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import shutil
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from forgedit.config import Stage, SweepConfig, TrainingConfig
from forgedit.errors import ModelDirectoryError
from registry import EditModelRegistry, RegistryConfig


@pytest.fixture(scope="module")
def registered(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    from forgedit.engine import Engine

    base_dir = tiny_model_dir / "stable-diffusion"
    engine = Engine.load(base_dir)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    config = TrainingConfig.for_mode(
        "joint",
        height=64,
        width=64,
        seed=0,
        stages=(Stage("joint", updates=2, batch_size=1, unet_lr=6e-5, text_lr=1e-3),),
    )
    edit_model = engine.finetune(
        image, "A photo of noise", config, image_sha256=hashlib.sha256(image.tobytes()).hexdigest()
    )
    reg = EditModelRegistry(RegistryConfig(data_dir=tmp_path_factory.mktemp("pyfunc-data")))
    result = reg.register(edit_model)
    assert result.version is not None
    uri = f"models:/{reg.config.registered_model}/{result.version}"
    return engine, edit_model, reg, uri, base_dir


def test_pyfunc_loads_from_the_registry_and_samples_like_the_engine(
    registered: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, edit_model, reg, uri, base_dir = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", reg.config.resolved_tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", reg.config.resolved_registry_uri)

    model = mlflow.pyfunc.load_model(uri, model_config={"base_model_dir": str(base_dir)})
    out = model.predict(
        pd.DataFrame(
            {
                "prompt": ["a photo of blue noise"],
                "gammas": [[0.5, 0.9]],
                "steps": [2],
                "seeds": [[3]],
            }
        )
    )
    assert list(out["gamma"]) == [0.5, 0.9]
    assert list(out["seed"]) == [3, 3]
    pngs = [base64.b64decode(s) for s in out["png_base64"]]
    for png in pngs:
        assert Image.open(io.BytesIO(png)).size == (64, 64)

    direct = engine.sample(
        edit_model,
        SweepConfig(prompts=("a photo of blue noise",), gammas=(0.5, 0.9), steps=2, seeds=(3,)),
    )
    assert pngs == [e.png_bytes() for e in direct]

    # params are defaults for every row; a bare prompt works too.
    one = model.predict("a photo of red noise", params={"gammas": [0.7], "steps": 1})
    assert len(one) == 1 and one["gamma"][0] == 0.7


def test_pyfunc_of_a_tiny_model_edit_model_loads_without_model_config(
    registered: tuple, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The tiny model is deterministic: the pyfunc re-makes it and samples the same edits."""
    engine, edit_model, reg, uri, _ = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", reg.config.resolved_tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", reg.config.resolved_registry_uri)
    monkeypatch.delenv("FORGEDIT_BASE_MODEL_DIR", raising=False)
    monkeypatch.setenv("FORGEDIT_HOME", str(tmp_path / "home"))  # nothing there yet
    model = mlflow.pyfunc.load_model(uri)
    out = model.predict("a photo of blue noise", params={"gammas": [0.5], "steps": 2, "seeds": [3]})
    direct = engine.sample(
        edit_model,
        SweepConfig(prompts=("a photo of blue noise",), gammas=(0.5,), steps=2, seeds=(3,)),
    )
    assert [base64.b64decode(s) for s in out["png_base64"]] == [e.png_bytes() for e in direct]


def test_pyfunc_of_a_real_base_model_names_the_setting(
    registered: tuple, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _, edit_model, reg, _, _ = registered
    real = dataclasses.replace(
        edit_model, base_model_name="sd-1.5", base_model_fingerprint="0" * 64
    )
    result = reg.register(real)
    uri = f"models:/{reg.config.registered_model}/{result.version}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", reg.config.resolved_tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", reg.config.resolved_registry_uri)
    monkeypatch.delenv("FORGEDIT_BASE_MODEL_DIR", raising=False)
    monkeypatch.setenv("FORGEDIT_HOME", str(tmp_path / "home"))
    with pytest.raises(ModelDirectoryError) as e:
        mlflow.pyfunc.load_model(uri)
    for needle in ("'sd-1.5'", "base_model_dir", "FORGEDIT_BASE_MODEL_DIR", "vae_dir"):
        assert needle in str(e.value)


def test_pyfunc_takes_a_separate_vae_directory(
    registered: tuple, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A base model without vae/ (Realistic Vision "noVAE") loads with vae_dir, as the CLI's
    --vae; the weights are the same, so the edits are too."""
    engine, edit_model, reg, uri, base_dir = registered
    no_vae = tmp_path / "novae"
    shutil.copytree(base_dir, no_vae)
    shutil.move(no_vae / "vae", tmp_path / "vae")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", reg.config.resolved_tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", reg.config.resolved_registry_uri)
    with pytest.raises(ModelDirectoryError, match="vae"):
        mlflow.pyfunc.load_model(uri, model_config={"base_model_dir": str(no_vae)})
    model = mlflow.pyfunc.load_model(
        uri, model_config={"base_model_dir": str(no_vae), "vae_dir": str(tmp_path / "vae")}
    )
    out = model.predict("a photo of blue noise", params={"gammas": [0.5], "steps": 2, "seeds": [3]})
    direct = engine.sample(
        edit_model,
        SweepConfig(prompts=("a photo of blue noise",), gammas=(0.5,), steps=2, seeds=(3,)),
    )
    assert [base64.b64decode(s) for s in out["png_base64"]] == [e.png_bytes() for e in direct]


def test_the_logged_model_contains_no_pickle(registered: tuple) -> None:
    _, _, reg, _, _ = registered
    model_id = reg.list_models().items[0].edit_model_id
    run_id = reg.show(model_id).run_id
    root = Path(reg.config.data_dir) / "mlartifacts"
    files = [p for p in root.rglob("*") if p.is_file() and run_id in p.parts]
    names = {p.name for p in files}
    assert {"MLmodel", "pyfunc_model.py", "delta.safetensors", "manifest.json"} <= names
    assert not [p for p in files if p.suffix in (".pkl", ".pickle", ".pt", ".bin")]
    mlmodel = next(p for p in files if p.name == "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel
    assert "python_model.pkl" not in mlmodel
