"""One MLflow requirement set for the image and the fleet (deploy/mlflow/requirements.txt):
the image installs that file, scripts/setup.sh installs it into .venv (where scripts/fleet.sh
and the tests run ``mlflow server``), and what it pins is what the server is developed
against and what is installed here."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "deploy" / "mlflow" / "requirements.txt"


def _requirements() -> dict[str, tuple[set[str], str]]:
    """name -> (extras, pinned version) of every line of the requirement file."""
    found = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[([a-z0-9_,-]+)\])?==([0-9][0-9A-Za-z.]*)", line)
        assert m, f"not an exact pin: {line!r}"
        found[m[1].lower()] = (set((m[2] or "").split(",")) - {""}, m[3])
    return found


def test_mlflow_comes_with_basic_auth_and_a_postgresql_driver() -> None:
    reqs = _requirements()
    extras, version = reqs["mlflow"]
    assert "auth" in extras  # `mlflow server --app-name basic-auth` needs Flask-WTF
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert f"mlflow=={version}" in pyproject["project"]["dependencies"]
    # SQLAlchemy 2.1 loads psycopg 3 for a plain postgresql:// URL, the form the manifests use.
    assert "binary" in reqs["psycopg"][0]


def test_the_image_and_the_fleet_install_the_same_file() -> None:
    dockerfile = (REPO / "deploy" / "mlflow.Dockerfile").read_text()
    assert "COPY mlflow/requirements.txt" in dockerfile
    assert re.search(r"pip install -r \S*requirements\.txt", dockerfile)
    assert not re.search(r"pip install (?!-r)", dockerfile), "a second, separate pin list"
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "-r deploy/mlflow/requirements.txt" in setup


def test_the_pinned_set_is_what_is_installed_here() -> None:
    for name, (_extras, version) in _requirements().items():
        assert importlib.metadata.version(name) == version, name
    # The auth extra's own requirement resolved too.
    importlib.metadata.version("Flask-WTF")
