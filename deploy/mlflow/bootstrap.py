"""Prepare an MLflow tracking server (``--app-name basic-auth``) for forgedit-server, as an
operator does once per installation, with MLflow's own clients. Idempotent: run it again after
rotating the service user's password, or on every install.

1. Wait until MLflow answers ``GET /health``.
2. As the MLflow admin: create the experiment and the registered model that hold the edit
   models, if missing.
3. Create the service user forgedit-server signs in as (not an admin), or set its password
   when it exists.
4. Grant that user MANAGE on exactly those two resources: it creates runs and versions,
   uploads and downloads artifacts, and deletes edit models (deleting needs MANAGE in MLflow).
   With ``default_permission = NO_PERMISSIONS`` in the auth config, that is all it can see.

Environment (nothing is read from files, nothing secret is printed):

    MLFLOW_TRACKING_URI                           the tracking server
    MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD   an MLflow admin
    FORGEDIT_MLFLOW_USERNAME, FORGEDIT_MLFLOW_PASSWORD   the service user to create or update
    FORGEDIT_MLFLOW_EXPERIMENT, FORGEDIT_MLFLOW_REGISTERED_MODEL
                                                  default forgedit-edit-models (the registry's
                                                  defaults, registry/config.py)
    FORGEDIT_BOOTSTRAP_WAIT_S                     how long to wait for MLflow (default 300)

Runs in the MLflow image (deploy/mlflow.Dockerfile: the Kubernetes Job mlflow-bootstrap) and
from scripts/fleet.sh; it needs only ``mlflow`` (deploy/mlflow/requirements.txt).
Exit status 0 when everything is in place, 1 with one line on stderr otherwise.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request

DEFAULT_NAME = "forgedit-edit-models"
SERVICE_PERMISSION = "MANAGE"


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if not value:
        raise SystemExit(f"mlflow bootstrap: {name} is not set")
    return value


def wait_for_mlflow(uri: str, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"mlflow bootstrap: MLflow did not answer /health in {wait_s:g} s")
        time.sleep(1.0)


def ensure_resources(experiment: str, registered_model: str) -> str:
    """The experiment's id, after creating it and the registered model where missing (both
    may be created by a racing replica or a second run at the same moment)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            client.create_experiment(experiment)
            print(f"mlflow bootstrap: created experiment {experiment!r}")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise SystemExit(f"mlflow bootstrap: experiment {experiment!r} cannot be read back")
    try:
        client.get_registered_model(registered_model)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(
                registered_model,
                description="Forgedit per-image edit models: one version per fine-tune.",
            )
            print(f"mlflow bootstrap: created registered model {registered_model!r}")
        except MlflowException as e2:
            if e2.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    return str(exp.experiment_id)


def ensure_user(auth: object, username: str, password: str) -> None:
    """Create the (non-admin) user, or set its password if it exists."""
    from mlflow.exceptions import MlflowException

    try:
        auth.create_user(username, password)  # type: ignore[attr-defined]
        print(f"mlflow bootstrap: created user {username!r}")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.update_user_password(username, password)  # type: ignore[attr-defined]
        print(f"mlflow bootstrap: user {username!r} exists; password set")
    auth.update_user_admin(username, False)  # type: ignore[attr-defined]


def ensure_permission(auth: object, username: str, resource_type: str, resource_id: str) -> None:
    """``username`` holds exactly ``SERVICE_PERMISSION`` on the resource."""
    current = auth.get_user_permission(username, resource_type, resource_id)  # type: ignore[attr-defined]
    if current.permission == SERVICE_PERMISSION:
        return
    from mlflow.exceptions import MlflowException

    try:
        auth.revoke_user_permission(username, resource_type, resource_id)  # type: ignore[attr-defined]
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    auth.grant_user_permission(username, resource_type, resource_id, SERVICE_PERMISSION)  # type: ignore[attr-defined]
    print(f"mlflow bootstrap: {username!r} may {SERVICE_PERMISSION} {resource_type} {resource_id}")


def main() -> int:
    uri = _env("MLFLOW_TRACKING_URI")
    _env("MLFLOW_TRACKING_USERNAME")
    _env("MLFLOW_TRACKING_PASSWORD")
    username = _env("FORGEDIT_MLFLOW_USERNAME")
    password = _env("FORGEDIT_MLFLOW_PASSWORD")
    if username == os.environ["MLFLOW_TRACKING_USERNAME"]:
        raise SystemExit("mlflow bootstrap: the service user must not be the MLflow admin")
    experiment = _env("FORGEDIT_MLFLOW_EXPERIMENT", DEFAULT_NAME)
    registered_model = _env("FORGEDIT_MLFLOW_REGISTERED_MODEL", DEFAULT_NAME)
    wait_for_mlflow(uri, float(os.environ.get("FORGEDIT_BOOTSTRAP_WAIT_S", "300")))

    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    try:
        experiment_id = ensure_resources(experiment, registered_model)
        auth = get_app_client("basic-auth", tracking_uri=uri)
        ensure_user(auth, username, password)
        ensure_permission(auth, username, "experiment", experiment_id)
        ensure_permission(auth, username, "registered_model", registered_model)
    except MlflowException as e:
        # MLflow's message names the operation and the status, never a password.
        print(f"mlflow bootstrap: {e.error_code}: {e.message[:300]}", file=sys.stderr)
        return 1
    print(f"mlflow bootstrap: ready for {username!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
