"""Fixtures the service tests share."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real registry (embedded MLflow) shared by a module's replicas, as MLflow is in a
    cluster."""
    from registry import EditModelRegistry, RegistryConfig

    shared = EditModelRegistry(RegistryConfig(data_dir=tmp_path_factory.mktemp("registry")))
    yield shared
    shared.close()
