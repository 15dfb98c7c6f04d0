#!/usr/bin/env bash
# Issue 11's table on one GPU, in one call: training throughput at ~100k and ~1M Gaussians per
# segment (fp32 and bf16), the held-out PSNR after equal steps, and the viewer with and without its
# CUDA graphs. Each run's JSON and log land in $OUT; a summary line per run is printed.
#
#   OUT=/tmp/perf DATA=/tmp/synth bash benchmarks/perf_table.sh [RUN ...]
#
# RUN names (default: all but host and ab): tests 100k 100k-bf16 1m 1m-bf16 psnr psnr-bf16 viewer transport host ab data
# (data: only generate $DATA, which every run does first when it is missing; transport: a training
# sample's host work and copy, float32 vs uint8 images, benchmarks/sample_transport.py;
# host: 100k under cProfile, where the host's time goes; ab: 100k per-target and with
# batch_targets alternately, twice, then both in bf16 and their held-out PSNR after 308 steps). Extra train_throughput
# flags for every training run go in $EXTRA (e.g. EXTRA="--set pipeline.model.volume_from=anchors").
# Older code in the same call (GPU hosts differ, so only one call's rows compare): archive it here,
#   mkdir -p .bench_before && git archive <commit> evolsplat_ns | tar -x -C .bench_before
# carry .bench_before (git-ignored through .git/info/exclude) and run
#   PYTHONPATH=$PWD/.bench_before:$PYTHONPATH TAG=before- bash benchmarks/perf_table.sh 100k
# (the first line printed names the evolsplat_ns that was imported).
set -u
OUT=${OUT:-/tmp/perf}
DATA=${DATA:-/tmp/synth}
EXTRA=${EXTRA:-}
TAG=${TAG:-}  # prefix of this call's file names (e.g. before-)
mkdir -p "$OUT"
(cd /tmp && python -c "import evolsplat_ns; print('${TAG:-this }code:', evolsplat_ns.__file__)")
RUNS=${*:-tests 100k 100k-bf16 1m 1m-bf16 psnr psnr-bf16 viewer transport}
P100K="--generator depth --pixel-stride 4 --max-gaussians 100000 --pc-device cuda"
P1M="--generator depth --pixel-stride 1 --pc-voxel-size 0.02 --max-gaussians 1000000 --pc-device cuda"
SHAPE="--warmup 8 --iters 30 --phase-iters 5 --profile-iters 3"

if [ ! -d "$DATA/scenes" ] && [ ! -d "$DATA/000" ]; then
    evolsplat-synth --out "$DATA" --scenes 2 --frames 12 --cameras 1 --width 960 --height 640 \
        --raycaster torch > "$OUT/synth.log" 2>&1 || { tail -20 "$OUT/synth.log"; exit 1; }
fi

train() {  # name, flags...
    local name=$1; shift
    timeout 300 python benchmarks/train_throughput.py --data "$DATA" "$@" $EXTRA --json "$OUT/$TAG$name.json" \
        > "$OUT/$TAG$name.log" 2>&1
    echo "== $TAG$name rc=$?"
    python - "$OUT/$TAG$name.json" <<'PY' 2>/dev/null || tail -5 "$OUT/$TAG$name.log"
import json, sys
r = json.load(open(sys.argv[1]))
p, v, h = r.get("profile") or {}, r.get("viewer") or {}, r.get("held_out") or {}
print({"it/s": round(r["iterations_per_s"], 2), "ms": round(r["ms_per_iteration"], 1),
       "launches": p.get("kernel_launches_per_step"), "busy_ms": p.get("gpu_busy_ms_per_step"),
       "busy": r.get("gpu_busy_fraction"), "idle_by_phase": p.get("gpu_idle_ms_per_step_by_phase"), "peak_gb": r["peak_gpu_memory_gb"],
       "gaussians": r["gaussians_per_segment"], "phases": r["ms_per_phase"],
       "psnr": h.get("psnr"), "steps": r["steps_trained"], "viewer": v})
PY
}

for run in $RUNS; do
    case $run in
        tests) timeout 300 python -m pytest -q tests/gpu 2>&1 | tail -15 ;;
        100k) train 100k $P100K $SHAPE --viewer-frames 30 --viewer-profile-frames 10 --sync-iters 2 --profile-table "$OUT/${TAG}100k-ops.txt" ;;
        100k-bf16) train 100k-bf16 $P100K $SHAPE --amp bf16 ;;
        1m) train 1m $P1M --warmup 4 --iters 15 --phase-iters 3 --profile-iters 2 --viewer-frames 20 --viewer-profile-frames 5 ;;
        1m-bf16) train 1m-bf16 $P1M --warmup 4 --iters 15 --phase-iters 3 --profile-iters 2 --amp bf16 ;;
        psnr) train psnr $P100K --warmup 8 --iters 300 --phase-iters 0 --profile-iters 0 --eval ;;
        psnr-bf16) train psnr-bf16 $P100K --warmup 8 --iters 300 --phase-iters 0 --profile-iters 0 --eval --amp bf16 ;;
        host) train host $P100K --warmup 8 --iters 20 --phase-iters 5 --profile-iters 0 --host-iters 5 \
                  --host-stats "$OUT/${TAG}host.pstats" ;;
        ab)
            B="--set pipeline.model.batch_targets=True"
            AB="$P100K --warmup 8 --iters 30 --phase-iters 0 --profile-iters 3"
            train ab-a1 $AB; train ab-b1 $AB $B; train ab-a2 $AB; train ab-b2 $AB $B
            train ab-a-bf16 $AB --amp bf16; train ab-b-bf16 $AB $B --amp bf16
            train ab-a-psnr $P100K --warmup 8 --iters 300 --phase-iters 0 --profile-iters 0 --eval
            train ab-b-psnr $P100K --warmup 8 --iters 300 --phase-iters 0 --profile-iters 0 --eval $B ;;
        viewer)
            for g in True False; do
                timeout 200 python benchmarks/viewer_fps.py --data "$DATA" $P100K --frames 60 \
                    --set model.config.cuda_graph_render=$g --json "$OUT/viewer-graphs-$g.json" \
                    > "$OUT/viewer-graphs-$g.log" 2>&1
                echo "== viewer graphs=$g rc=$?"; tail -12 "$OUT/viewer-graphs-$g.log"
            done ;;
        transport)
            timeout 120 python benchmarks/sample_transport.py --out "$OUT" --data "$DATA" --samples 30 \
                --json "$OUT/${TAG}transport.json" > "$OUT/${TAG}transport.log" 2>&1
            echo "== ${TAG}transport rc=$?"; tail -3 "$OUT/${TAG}transport.log" ;;
        data) ;;  # generated above
        *) echo "unknown run $run" ;;
    esac
done
