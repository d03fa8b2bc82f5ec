#!/usr/bin/env bash
# Create .venv at the repository root and install the project, its dev tools, and the SDK.
# Idempotent: a second run only checks. Works on a fresh machine with Python 3.11 and pip.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

stamp=.venv/.forgedit-installed
want=$(cat pyproject.toml clients/python/pyproject.toml deploy/mlflow/requirements.txt scripts/setup.sh 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# torch first and exactly: on these CPU machines 2.13.0 is a local CPU build; any looser
# request lets pip pick a newer multi-GB CUDA build.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[dev]"
# The tiny model uses SD's real CLIP BPE vocabulary, which ships inside this wheel. --no-deps:
# its dependencies (torchvision) break next to this torch; we only read one data file from it.
"${PIP[@]}" --no-deps "open-clip-torch==3.3.0"
# The MLflow tracking server exactly as deploy/mlflow.Dockerfile builds it (basic auth, the
# PostgreSQL driver): scripts/fleet.sh and the tests run `mlflow server` from this .venv.
"${PIP[@]}" -r deploy/mlflow/requirements.txt
if [ -f clients/python/pyproject.toml ]; then
  "${PIP[@]}" -e clients/python
fi
# open-clip-torch is installed without its dependencies on purpose (see above); anything
# else pip check reports is a real conflict.
problems=$(.venv/bin/python -m pip check 2>&1 | grep -v -e '^open-clip-torch ' -e '^No broken' || true)
if [ -n "$problems" ]; then
  echo "setup: dependency conflicts:" >&2
  echo "$problems" >&2
  exit 1
fi
echo "$want" > "$stamp"
echo "setup: .venv ready (forgedit-server, forgedit and python -m forgedit installed)" >&2
