#!/usr/bin/env bash
# The main job: start forgedit-server on the shipped toy world (base model "shapes": one coloured
# shape on a plain background, trained in forgedit/zoo/shapes; MLflow on a local SQLite file
# under .forgedit-data/), edit a rendered red circle into a blue one through the SDK's
# `forgedit` command, then stop the server with SIGTERM (it drains and exits 0). Writes each
# image as it arrives, a labelled contact sheet and the server's log to out/demo/.
#   bash scripts/demo.sh PHOTO "PROMPT"   any photo and prompt (the toy world knows only its own)
#   FORGEDIT_BASE_MODELS='{}' bash scripts/demo.sh samples/photos/cat.jpg "A photo of a cat wearing a hat."
#                                         the random tiny model (noise-like edits, real pipeline)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FORGEDIT_BASE_MODELS=${FORGEDIT_BASE_MODELS-'{"shapes": "shapes"}'}

rm -rf out/demo  # the demo's own output; --out must be new or empty
mkdir -p out
photo=${1:-out/demo-red-circle.png}
prompt=${2:-A photo of a blue circle on a white background}
if [ $# -eq 0 ]; then  # the default input: a red circle, rendered exactly (forgedit.zoo.shapes.world)
  .venv/bin/python -c 'import sys; from forgedit.zoo.shapes.world import Scene
Scene("red", "circle", "white", cx=0.45, cy=0.55, size=0.5).render().save(sys.argv[1])' "$photo"
fi
free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
FORGEDIT_GRPC_PORT=$port FORGEDIT_HEALTH_PORT=0 FORGEDIT_METRICS_PORT=0 FORGEDIT_LOG_FORMAT=text \
  .venv/bin/forgedit-server > out/demo-server.log 2>&1 &
server=$!
stop_server() {
  if kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server"
    wait "$server" || true
  fi
}
trap stop_server EXIT

echo "demo: waiting for forgedit-server on localhost:$port (base models: $FORGEDIT_BASE_MODELS)" >&2
.venv/bin/python - "$port" "$server" <<'PY'
import os, sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

port, pid = sys.argv[1], int(sys.argv[2])
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"localhost:{port}"))
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("demo: forgedit-server exited; see out/demo-server.log")
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service="forgedit.v1.ForgeditService"),
                           timeout=2)
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            sys.exit(0)
    except grpc.RpcError:
        pass
    time.sleep(0.5)
sys.exit("demo: forgedit-server did not become ready in 300 s; see out/demo-server.log")
PY

.venv/bin/forgedit --server "localhost:$port" edit "$photo" "$prompt" --out out/demo \
  --forget donotforget,encoderkv,decoderattn --gammas 0.7,1.1,1.5 --seeds 1,2
stop_server
mv out/demo-server.log out/demo/server.log
echo "demo: results in out/demo/ (contact_sheet.png shows the input beside every edit)" >&2
