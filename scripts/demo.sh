#!/usr/bin/env bash
# The main job on the embedded default: generate the synthetic demo dataset, validate it, train
# EVolSplat on it, then evaluate zero-shot on the held-out scene, trained vs untrained weights
# (metrics.json, grid.png = prediction | ground truth | error, camera-path video).
# CPU: evolsplat-lite at 192x128. CUDA: the full method at 960x640.
# Everything goes under outputs/demo (OUT=... to change); every run gets its own timestamped
# folder and an existing dataset is reused, never overwritten.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${OUT:-outputs/demo}
BIN=${EVOLSPLAT_VENV:-.venv}/bin
PY=$BIN/python
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  METHOD=evolsplat DEVICE=cuda W=960 H=640 SCENES=6 FRAMES=40 ITERS=${ITERS:-5000}
else
  METHOD=evolsplat-lite DEVICE=cpu W=192 H=128 SCENES=4 FRAMES=24 ITERS=${ITERS:-500}
fi
DATA="$OUT/data-${W}x${H}"
if [ ! -f "$DATA/.complete" ]; then
  $BIN/evolsplat-synth --out "$DATA" --scenes $SCENES --frames $FRAMES --cameras 3 --width $W --height $H --seed 0
  touch "$DATA/.complete"
fi
$BIN/evolsplat-data inspect --data "$DATA" --quick --segment-length 12 --segment-stride 6

STAMP=$(date +%Y-%m-%d_%H%M%S)
time $BIN/ns-train $METHOD --data "$DATA" --output-dir "$OUT/runs" --timestamp "$STAMP" \
  --vis tensorboard --machine.device-type $DEVICE --max-num-iterations $ITERS
CONFIG="$OUT/runs/$(basename "$DATA")/$METHOD/$STAMP/config.yml"

# The last scene is the run's held-out scene (num_eval_scenes = 1): never trained on.
HELD="$DATA/$(ls "$DATA" | grep -E '^[0-9]+$' | tail -n 1)"
REPORT="$OUT/report/$STAMP"
$BIN/evolsplat-infer --load-config "$CONFIG" --data "$HELD" --output-dir "$REPORT/trained" --no-progress
$BIN/evolsplat-infer --load-config "$CONFIG" --data "$HELD" --output-dir "$REPORT/untrained" --untrained \
  --no-progress --video-frames 2
$PY - "$REPORT" <<'PYEOF'
import json, sys
from pathlib import Path
report = Path(sys.argv[1])
rows = {name: json.loads((report / name / "metrics.json").read_text()) for name in ("trained", "untrained")}
summary = {name: {k: r[k] for k in ("psnr", "ssim", "depth_abs_rel", "depth_rmse") if k in r} for name, r in rows.items()}
summary["psnr_gain_db"] = summary["trained"]["psnr"] - summary["untrained"]["psnr"]
(report / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
print(f"held-out PSNR: trained {summary['trained']['psnr']:.2f} dB vs untrained {summary['untrained']['psnr']:.2f} dB")
print(f"report: {report} (grid.png, metrics.json, camera_path video per folder)")
PYEOF
