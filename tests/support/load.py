"""The load driver (``benchmarks/load_driver.py``, a script, not a package) as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DRIVER = Path(__file__).resolve().parents[2] / "benchmarks" / "load_driver.py"


def load_driver() -> ModuleType:
    if "load_driver" in sys.modules:
        return sys.modules["load_driver"]
    spec = importlib.util.spec_from_file_location("load_driver", DRIVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
