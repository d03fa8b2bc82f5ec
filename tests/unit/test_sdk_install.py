"""The SDK installs without torch: build a throwaway venv, ``pip install clients/python`` into
it, and check what came along. Slow (≈40 s) and it reaches the package index, so marked ``slow``
and ``network``; it needs no server of ours."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "torchvision", "diffusers", "transformers", "mlflow", "numpy"}


@pytest.mark.slow
@pytest.mark.network
def test_sdk_installs_into_a_fresh_venv_without_torch(tmp_path: Path) -> None:
    # Install from a copy: pip builds in-tree and would leave build/ in the checkout.
    source = tmp_path / "forgedit-client"
    shutil.copytree(
        REPO / "clients" / "python",
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(REPO / "clients" / "python"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "forgedit-client" in names
    assert not names & HEAVY, f"the SDK pulled in {sorted(names & HEAVY)}"
    subprocess.run([str(python), "-m", "pip", "check"], check=True, capture_output=True)
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import forgedit_client, importlib.util as u;"
            "print(forgedit_client.__version__, u.find_spec('torch') is None)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.split() == ["0.1.0", "True"]
    helped = subprocess.run(
        [str(venv / "bin" / "forgedit"), "--help"], capture_output=True, text=True
    )
    assert helped.returncode == 0 and "forgedit edit" in helped.stdout
