"""The MLflow signature of the edit-model pyfunc: no input schema (rows are free-form, see
``pyfunc_model.py``), and a params schema for the sweep options so that ``predict(...,
params={...})`` is accepted by MLflow. Defaults are ``SweepConfig``'s own."""

from __future__ import annotations

import dataclasses
from typing import Any

from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ParamSchema, ParamSpec

from forgedit.config import SweepConfig

# field name → MLflow param type, for each sweep option a caller may set.
_PARAM_TYPES = {
    "interpolation": "string",
    "gammas": "double",
    "alphas": "double",
    "forget": "string",
    "forget_degree": "double",
    "seeds": "long",
    "steps": "long",
    "guidance": "double",
}


def sweep_signature() -> ModelSignature:
    defaults: dict[str, Any] = {
        f.name: f.default for f in dataclasses.fields(SweepConfig) if f.name in _PARAM_TYPES
    }
    specs = []
    for name, kind in _PARAM_TYPES.items():
        default = defaults[name]
        if isinstance(default, tuple):
            specs.append(ParamSpec(name, kind, list(default), (-1,)))
        else:
            specs.append(ParamSpec(name, kind, default))
    return ModelSignature(inputs=None, params=ParamSchema(specs))
