"""An edit model as an MLflow pyfunc (models-from-code): MLflow's own tooling can load a
registered edit model and sample edits from it without the gRPC service.

This file is logged *as code* with every registered edit model (``mlflow.pyfunc.save_model(
python_model=<this file>, artifacts={"edit_model": …})``); MLflow executes it at load time and
takes the object passed to ``set_model``. Nothing Python is pickled: the model's state is the
edit-model artifact (safetensors + JSON) under ``artifacts/edit_model``.

Loading::

    model = mlflow.pyfunc.load_model(
        "models:/forgedit-edit-models/3",
        model_config={"base_model_dir": "/models/stable-diffusion-v1-4"},
    )

``model_config`` keys (each falls back to an environment variable, then a default):

``base_model_dir``  the diffusers SD-1.x directory the edit model was fine-tuned on
                    (``FORGEDIT_BASE_MODEL_DIR``). Its fingerprint must match the edit
                    model's, or loading fails with ``BaseModelMismatchError``. Unset: only an
                    edit model made on a built-in base model (``forgedit.zoo``: the
                    tiny model, re-made as it is deterministic, or the shipped toy world)
                    loads; any other names this setting. A built-in's name (``shapes``)
                    stands for its directory.
``vae_dir``         a separate VAE directory for a base model shipped without one (Realistic
                    Vision "noVAE"), as the engine CLI's ``--vae`` (``FORGEDIT_VAE_DIR``).
``device``          ``FORGEDIT_DEVICE``, default ``cpu``.
``precision``       ``FORGEDIT_PRECISION``, default ``faithful``.

Unset sweep options take the edit model's variant defaults (``forgedit.config.default_sweep``).

Prediction input: a ``pandas.DataFrame`` (or a dict of columns / a list of row dicts) with one
row per sweep. ``prompt`` is required; the optional columns are the ``SweepConfig`` fields
(``interpolation``, ``gammas``, ``alphas``, ``forget``, ``forget_degree``, ``seeds``,
``steps``, ``guidance``), a list or a scalar each. ``params`` given to ``predict`` are defaults
for every row. Output: a ``DataFrame`` with one row per image: ``row`` (input row),
``index``, ``prompt``, ``forget``, ``interpolation``, ``gamma``, ``alpha``, ``seed``,
``guidance``, ``steps`` and ``png_base64`` (the image as a base64-encoded PNG).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from typing import Any

import mlflow.models
from mlflow.pyfunc import PythonModel, PythonModelContext

ARTIFACT_KEY = "edit_model"
_TUPLE_FIELDS = ("gammas", "alphas", "forget", "seeds")
_SCALAR_FIELDS = ("interpolation", "forget_degree", "steps", "guidance")


class ForgeditEditModel(PythonModel):
    """Samples edits from one edit model with ``forgedit.engine.Engine.sample``."""

    def load_context(self, context: PythonModelContext) -> None:
        from forgedit.artifact import load_edit_model, read_manifest
        from forgedit.engine import Engine
        from forgedit.zoo import builtin_named

        config = dict(context.model_config or {})
        base_dir = config.get("base_model_dir") or os.environ.get("FORGEDIT_BASE_MODEL_DIR")
        vae_dir = config.get("vae_dir") or os.environ.get("FORGEDIT_VAE_DIR") or None
        if not base_dir:
            base_dir = _builtin_base_model_for(read_manifest(context.artifacts[ARTIFACT_KEY]))
        builtin = builtin_named(base_dir)  # a built-in's name, e.g. "shapes"
        if builtin is not None:
            base_dir = os.fspath(builtin.stable_diffusion)
        device = config.get("device") or os.environ.get("FORGEDIT_DEVICE", "cpu")
        precision = config.get("precision") or os.environ.get("FORGEDIT_PRECISION", "faithful")
        if precision not in ("faithful", "fast"):
            raise ValueError(f"precision must be 'faithful' or 'fast', got {precision!r}")
        self._engine = Engine.load(
            base_dir,
            vae_dir=vae_dir,
            device=device,
            precision="fast" if precision == "fast" else "faithful",
        )
        self._edit_model = load_edit_model(
            context.artifacts[ARTIFACT_KEY],
            expected_base_fingerprint=self._engine.fingerprint,
        )

    # No type hints on purpose: MLflow would derive an input schema from them and coerce the
    # free-form rows (it prints a warning about their absence; harmless).
    def predict(self, context, model_input, params=None):
        import pandas as pd

        from forgedit.config import SweepConfig

        rows = _rows(model_input)
        out: list[dict[str, Any]] = []
        for row_index, row in enumerate(rows):
            options = {**(params or {}), **{k: v for k, v in row.items() if not _missing(v)}}
            sweep = SweepConfig.for_mode(
                self._edit_model.training.mode,
                prompts=(str(options.pop("prompt")),),
                **_sweep_kwargs(options),
            )
            for edited in self._engine.sample(self._edit_model, sweep):
                spec = edited.spec
                out.append(
                    {
                        "row": row_index,
                        "index": spec.index,
                        "prompt": spec.prompt,
                        "forget": spec.forget,
                        "interpolation": spec.interpolation,
                        "gamma": spec.gamma,
                        "alpha": spec.alpha,
                        "seed": spec.seed,
                        "guidance": spec.guidance,
                        "steps": spec.steps,
                        "png_base64": base64.b64encode(edited.png_bytes()).decode("ascii"),
                    }
                )
        return pd.DataFrame(out)


def _builtin_base_model_for(manifest: Mapping[str, Any]) -> str:
    """The directory of the built-in base model (``forgedit.zoo``; written if absent: it is
    deterministic) the edit model was made on; otherwise raise naming the setting that gives
    a base model."""
    from forgedit.errors import ModelDirectoryError
    from forgedit.models import check_base_model_directory
    from forgedit.zoo import builtin_base_model, builtin_names

    base = manifest.get("base_model") or {}
    for name in builtin_names():
        directory = builtin_base_model(name).stable_diffusion
        if base.get("fingerprint") == check_base_model_directory(directory).fingerprint():
            return os.fspath(directory)
    raise ModelDirectoryError(
        f"this edit model was fine-tuned on base model {base.get('name', '?')!r}: pass "
        "model_config={'base_model_dir': DIR} to mlflow.pyfunc.load_model or set "
        "FORGEDIT_BASE_MODEL_DIR to that SD-1.x directory (and vae_dir / FORGEDIT_VAE_DIR if "
        f"it has no VAE); only the built-in base models ({', '.join(builtin_names())}) are "
        "found without it"
    )


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """Normalise a DataFrame, a dict of columns, a list of rows or a bare prompt to rows."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, str):
        rows = [{"prompt": model_input}]
    elif isinstance(model_input, Mapping):
        columns = dict(model_input)
        lengths = {len(v) for v in columns.values() if isinstance(v, list)}
        if not lengths:
            rows = [columns]
        else:
            n = lengths.pop()
            rows = [
                {k: (v[i] if isinstance(v, list) else v) for k, v in columns.items()}
                for i in range(n)
            ]
    elif isinstance(model_input, list):
        rows = [r if isinstance(r, Mapping) else {"prompt": r} for r in model_input]
    else:
        raise TypeError(
            "model_input must be a DataFrame, a dict of columns, a list of rows or a prompt, "
            f"got {type(model_input).__name__}"
        )
    for i, row in enumerate(rows):
        if _missing(row.get("prompt")):
            raise ValueError(f"row {i} has no 'prompt'; every row needs a target prompt")
    return [dict(r) for r in rows]


def _sweep_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(options) - set(_TUPLE_FIELDS) - set(_SCALAR_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown sweep option(s) {', '.join(sorted(unknown))}; accepted: prompt, "
            f"{', '.join(_TUPLE_FIELDS + _SCALAR_FIELDS)}"
        )
    kwargs: dict[str, Any] = {}
    for name in _TUPLE_FIELDS:
        if name in options:
            value = options[name]
            iterable = hasattr(value, "__iter__") and not isinstance(value, str)
            values = list(value) if iterable else [value]
            kwargs[name] = tuple(int(v) if name == "seeds" else v for v in values)
    for name in _SCALAR_FIELDS:
        if name in options:
            kwargs[name] = int(options[name]) if name == "steps" else options[name]
    if "gammas" in kwargs:
        kwargs["gammas"] = tuple(float(g) for g in kwargs["gammas"])
    if "alphas" in kwargs:
        kwargs["alphas"] = tuple(float(a) for a in kwargs["alphas"])
    return kwargs


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN from a DataFrame's missing cell
    except (TypeError, ValueError):
        return False


mlflow.models.set_model(ForgeditEditModel())
