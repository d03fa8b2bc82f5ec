#!/usr/bin/env bash
# The test command: set up, lint, type-check, check generated code, run every test.
# Extra arguments go to pytest (e.g. scripts/test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One torch thread: two threads on two shared cores run 5-25x slower under load.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

echo "== ruff" >&2
.venv/bin/ruff check .
echo "== mypy" >&2
.venv/bin/mypy forgedit registry server clients/python/src
if [ -x scripts/gen_proto.sh ] || [ -f scripts/gen_proto.sh ]; then
  echo "== generated protobuf code is current" >&2
  bash scripts/gen_proto.sh --check
fi
echo "== pytest" >&2
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
# pytest exits 5 when it collected no test: that is a failure here, not a pass.
exit $status
