"""The MLflow layer's error classification and the registry's configuration."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_ALREADY_EXISTS,
    TEMPORARILY_UNAVAILABLE,
)

from registry import RegistryConfig
from registry.backend import is_transient, redact


def http_error(status: int) -> requests.exceptions.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.exceptions.HTTPError(response=response)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (requests.exceptions.ConnectionError("refused"), True),
        (requests.exceptions.ReadTimeout("slow"), True),
        (http_error(503), True),
        (http_error(429), True),
        (http_error(404), False),
        (http_error(400), False),
        (ConnectionResetError(), True),
        (MlflowException("x", error_code=TEMPORARILY_UNAVAILABLE), True),
        (MlflowException("API request to /api failed with exception Max retries exceeded"), True),
        (MlflowException("(sqlite3.OperationalError) database is locked"), True),
        (MlflowException("x", error_code=INVALID_PARAMETER_VALUE), False),
        (MlflowException("x", error_code=RESOURCE_ALREADY_EXISTS), False),
        (MlflowException("a local bug"), False),
        (RestException({"error_code": "INTERNAL_ERROR", "message": "boom"}), True),
        (RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no"}), False),
        (ValueError("a bug"), False),
    ],
)
def test_transient_errors_are_told_apart(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_redact_hides_credentials_and_machine_paths() -> None:
    text = redact("GET https://ann:pw@mlflow:5000/api/2.0/x failed: '/srv/data/mlflow.db' locked")
    assert "pw" not in text and "ann" not in text and "/srv" not in text
    assert "mlflow:5000/api/2.0/x" in text


def test_mlflow_defaults_never_override_the_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    RegistryConfig(data_dir=Path("unused"), http_max_retries=3).apply_mlflow_defaults()
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"


def test_config_uris_and_validation(tmp_path: Path) -> None:
    embedded = RegistryConfig(data_dir=tmp_path)
    assert embedded.embedded
    assert embedded.resolved_tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert embedded.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()
    shared = RegistryConfig(data_dir=tmp_path / "r", tracking_uri=f"sqlite:///{tmp_path}/s.db")
    assert shared.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()
    server = RegistryConfig(data_dir=tmp_path, tracking_uri="http://mlflow:5000")
    assert server.artifact_location is None and server.resolved_registry_uri == server.tracking_uri
    with pytest.raises(ValueError, match="registered model"):
        RegistryConfig(data_dir=tmp_path, registered_model="x' or '1'='1")
    with pytest.raises(ValueError):
        RegistryConfig(data_dir=tmp_path, fetch_attempts=0)
