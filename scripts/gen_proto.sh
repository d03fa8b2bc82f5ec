#!/usr/bin/env bash
# Generate the Python stubs of proto/forgedit/v1/*.proto into the two packages that use them:
#   server/_proto/                              (the server, package `server._proto`)
#   clients/python/src/forgedit_client/_proto/  (the SDK, package `forgedit_client._proto`)
#
# Usage:
#   scripts/gen_proto.sh            regenerate both stub folders in place
#   scripts/gen_proto.sh --check    regenerate into a temp dir; exit 1 if the committed stubs
#                                   differ (CI runs this so stale stubs fail the build)
#
# Needs grpcio-tools pinned to the grpcio version (pyproject.toml, extra "dev"); PYTHON picks the
# interpreter (default: .venv/bin/python if present, else python3). The stubs are generated with
# the proto files' directory layout and then flattened, with the one cross-import rewritten to be
# package-relative: an absolute `from forgedit.v1 import ...` would collide with the engine
# package `forgedit`. Never edit the generated files by hand.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

TARGETS=("server/_proto" "clients/python/src/forgedit_client/_proto")
PROTOS=(forgedit/v1/forgedit.proto)

mode="write"
case "${1:-}" in
  "") ;;
  --check) mode="check" ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# generate OUT_DIR: write the flattened, import-fixed stubs of every proto into OUT_DIR.
generate() {
  local out="$1" raw="$work/raw"
  rm -rf "$raw" && mkdir -p "$raw" "$out"
  "$PYTHON" -m grpc_tools.protoc -I proto \
    --python_out="$raw" --pyi_out="$raw" --grpc_python_out="$raw" "${PROTOS[@]}"
  local proto base
  for proto in "${PROTOS[@]}"; do
    base="${proto%.proto}"
    cp "$raw/${base}_pb2.py" "$raw/${base}_pb2.pyi" "$out/"
    # `from forgedit.v1 import forgedit_pb2 as ...` -> `from . import forgedit_pb2 as ...`
    sed -E 's/^from forgedit\.v1 import /from . import /' "$raw/${base}_pb2_grpc.py" \
      > "$out/$(basename "$base")_pb2_grpc.py"
  done
  if grep -rqE '^(from|import) forgedit\b' "$out"; then
    echo "gen_proto.sh: an absolute forgedit import survived in $out" >&2
    exit 1
  fi
  cat > "$out/__init__.py" <<'PY'
"""Generated from proto/forgedit/v1/*.proto by scripts/gen_proto.sh. Do not edit."""
PY
}

if [[ "$mode" == "write" ]]; then
  for target in "${TARGETS[@]}"; do
    rm -f "$target"/*_pb2.py "$target"/*_pb2.pyi "$target"/*_pb2_grpc.py
    generate "$target"
    echo "generated $target"
  done
  exit 0
fi

stale=0
for target in "${TARGETS[@]}"; do
  fresh="$work/fresh/$target"
  generate "$fresh"
  if ! diff -r -q -x '__pycache__' "$fresh" "$target" >/dev/null 2>&1; then
    echo "stale generated stubs in $target; run scripts/gen_proto.sh" >&2
    diff -r -x '__pycache__' "$fresh" "$target" >&2 || true
    stale=1
  fi
done
if [[ "$stale" == 0 ]]; then echo "generated stubs are up to date"; fi
exit "$stale"
