#!/usr/bin/env bash
# The main job on the embedded default: edit a TEdBench photo with the tiny model.
# Writes PNGs, a contact sheet and summary.json to ./out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
photo=${1:-../shared/tedbench/originals/dog2_standing.png}
prompt=${2:-A photo of a sitting dog.}
rm -rf out/demo  # the demo's own output; --out must be new or empty
.venv/bin/python -m forgedit edit "$photo" --prompt "$prompt" --out out/demo \
  --forget donotforget,encoderkv,decoderattn --gammas 0.6,0.8,1.0 --seeds 1,2
