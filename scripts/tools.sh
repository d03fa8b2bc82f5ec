#!/usr/bin/env bash
# Non-Python tools the tests use: promtool (validates the Prometheus exposition) from Debian's
# `prometheus` package, and buf (lints the proto) from the npm registry into .tools/.
# Installs what is missing when it can (root + apt, npm). In CI (CI=true) a tool that cannot
# be installed is an error; elsewhere the tests that need it skip and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF_VERSION=1.75.0
failed=0

if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tools: installing Debian prometheus (promtool)" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; } || failed=1
  else
    failed=1
  fi
fi

if [ ! -x .tools/node_modules/.bin/buf ] || [ "$(.tools/node_modules/.bin/buf --version 2>/dev/null)" != "$BUF_VERSION" ]; then
  if command -v npm >/dev/null 2>&1; then
    echo "tools: installing buf $BUF_VERSION from npm into .tools/" >&2
    npm install --silent --no-audit --no-fund --prefix .tools "@bufbuild/buf@$BUF_VERSION" >/dev/null || failed=1
  else
    failed=1
  fi
fi

if [ "$failed" = 1 ]; then
  echo "tools: promtool or buf could not be installed" >&2
  [ "${CI:-}" = "true" ] && exit 1
fi
exit 0
