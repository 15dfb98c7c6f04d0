#!/usr/bin/env bash
# The main job on the embedded default: generate the synthetic demo dataset and validate it.
# Output goes to outputs/demo (override with OUT=...). Never overwrites an existing dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-outputs/demo}
PY=.venv/bin/python
BIN=.venv/bin
if [ ! -f "$OUT/data/.complete" ]; then
  $BIN/evolsplat-synth --out "$OUT/data" --scenes 3 --frames 24 --cameras 3 --width 192 --height 128 --seed 0
  touch "$OUT/data/.complete"
fi
$BIN/evolsplat-data inspect --data "$OUT/data" --segment-length 12 --segment-stride 6
