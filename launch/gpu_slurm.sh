#!/usr/bin/env bash
#SBATCH --job-name=drex
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
# Multi-node GPU run: one JAX process per node, each driving that node's GPUs.
#   sbatch launch/gpu_slurm.sh --config=configs/internvl2_8b.py --config.base.checkpoint=/shared/InternVL2-8B \
#       --config.mesh="(-1, 8, 1)" --workdir=/shared/runs/8b
# jax.distributed reads the coordinator, process count and process id from SLURM ('auto' mode sees
# SLURM_JOB_ID). The workdir must be on a filesystem every node shares. Activate an environment with
# drex and jax[cuda] installed before sbatch (it is inherited), or set DREX_VENV.
set -euo pipefail
if [ -n "${DREX_VENV:-}" ]; then . "$DREX_VENV/bin/activate"; fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
srun --kill-on-bad-exit=1 python -m "${MODULE:-drex.train}" "$@" --config.distributed.mode=on
