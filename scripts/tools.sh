#!/usr/bin/env bash
# Non-Python tools the tests use: Debian's `prometheus` (promtool validates the exposition and
# the alert rules; the fleet runs prometheus itself), Debian's `postgresql` (the fleet's MLflow
# backend, scripts/fleet.sh), and buf (lints the proto) from the npm registry into .tools/.
# Installs what is missing when it can (root + apt, npm). In CI (CI=true) a tool that cannot
# be installed is an error; elsewhere the tests that need it skip and say why.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF_VERSION=1.75.0
failed=0

# Debian packages that are missing, installed in one apt run when we are root.
packages=()
command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
# Debian keeps PostgreSQL's server programs off PATH, under /usr/lib/postgresql/VERSION/bin.
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || packages+=(postgresql)
if [ "${#packages[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "tools: installing Debian ${packages[*]}" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; } || failed=1
  else
    echo "tools: missing Debian packages: ${packages[*]}" >&2
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
  echo "tools: prometheus, postgresql or buf could not be installed" >&2
  [ "${CI:-}" = "true" ] && exit 1
fi
exit 0
