#!/usr/bin/env bash
# Multi-node data-parallel EVolSplat training under SLURM (docs/distributed.md).
#
#   sbatch scripts/slurm_train.sh /path/to/processed/training            # 2 nodes x 8 GPUs
#   NODES=4 GPUS=8 sbatch --nodes 4 --gpus-per-node 8 scripts/slurm_train.sh DATA --max-num-iterations 60000
#
# One torchrun per node (srun --ntasks-per-node 1); torchrun starts one process per GPU and joins
# the nodes through a c10d rendezvous on the first node. Every rank must read DATA and the run
# folder (--output-dir) at the same path: a shared file system. Extra arguments go to ns-train.
#SBATCH --job-name=evolsplat
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

DATA=${1:?usage: sbatch scripts/slurm_train.sh DATA [ns-train flags ...]}
shift
GPUS=${GPUS:-${SLURM_GPUS_PER_NODE:-8}}
NODES=${NODES:-${SLURM_NNODES:-2}}
METHOD=${METHOD:-evolsplat}
VENV=${EVOLSPLAT_VENV:-.venv}
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}

srun --ntasks-per-node 1 "$VENV/bin/torchrun" \
  --nnodes "$NODES" --nproc_per_node "$GPUS" \
  --rdzv_backend c10d --rdzv_endpoint "$HEAD:$PORT" --rdzv_id "$SLURM_JOB_ID" \
  "$VENV/bin/evolsplat-train" "$METHOD" --data "$DATA" \
  --output-dir "${OUTPUT_DIR:-outputs/slurm}" --timestamp "job$SLURM_JOB_ID" \
  --distributed-timeout "${TIMEOUT_S:-1200}" "$@"
