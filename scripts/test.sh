#!/usr/bin/env bash
# The test command: set up, lint, type-check, check generated code, run every test.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/tools.sh
# One torch thread: two threads on two shared cores run 5-25x slower under load.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "== ruff" >&2
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== yamllint (deploy/)" >&2
.venv/bin/yamllint -c deploy/.yamllint.yaml deploy/
echo "== hadolint (deploy/Dockerfile)" >&2
.venv/bin/hadolint deploy/Dockerfile
echo "== promtool test rules (every alert in deploy/)" >&2
if command -v promtool >/dev/null 2>&1; then
  (cd deploy/k8s/base/prometheus && promtool test rules forgedit-rules.test.yml)
else
  echo "promtool is not installed (scripts/tools.sh): alert rule tests skipped" >&2
fi
echo "== mypy" >&2
.venv/bin/mypy forgedit registry server clients/python/src
echo "== protobuf: buf lint (STANDARD), generated code is current" >&2
if [ -x .tools/node_modules/.bin/buf ]; then
  (cd proto && ../.tools/node_modules/.bin/buf lint)
else
  echo "buf is not installed (scripts/tools.sh): proto lint skipped" >&2
fi
bash scripts/gen_proto.sh --check
echo "== pytest" >&2
# pytest's own status is ours: 5 (no test collected) fails CI like any other failure.
exec .venv/bin/python -m pytest "$@"
