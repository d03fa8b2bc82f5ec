#!/usr/bin/env bash
# A local fleet on loopback, every part a real process: PostgreSQL (Debian's), `mlflow server
# --app-name basic-auth` on it with proxied artifacts, N forgedit-server replicas, Prometheus
# scraping each with the project's rules.
#
#   bash scripts/fleet.sh up [--replicas N]   # returns once every replica is ready
#   source .forgedit-data/fleet/env           # FORGEDIT_SERVER, FORGEDIT_TOKEN, MLFLOW_TRACKING_URI, ...
#   .venv/bin/forgedit edit samples/photos/cat.jpg "A photo of a cat wearing a hat." --out out/fleet
#   bash scripts/fleet.sh down                # stops every process by its id
#
# Also: status, and stop|start|restart|kill REPLICA for one replica; --dir DIR before the
# command for another fleet directory. Details: scripts/fleet.py.
set -euo pipefail
cd "$(dirname "$0")/.."
starts=1
for arg in "$@"; do
  case "$arg" in down | status | stop | kill) starts=0 ;; esac
done
if [ "$starts" = 1 ]; then
  bash scripts/setup.sh
  # PostgreSQL and Prometheus from Debian (installed as root where missing; CI fails without).
  bash scripts/tools.sh
fi
exec .venv/bin/python scripts/fleet.py "$@"
