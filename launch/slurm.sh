#!/usr/bin/env bash
# Runs one camels_jax job on a SLURM GPU cluster: one process per GPU, all started by one `srun`, joined by
# jax.distributed with the coordinator on the allocation's first node. Submit it from the repo root (the
# venv must exist there: launch/install.sh, then `pip install 'jax[cuda12]'`):
#
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm.sh configs/camels_squad.py \
#       --workdir=/shared/runs/squad1 [--config.x=y ...]
#   DRY_RUN=1 SLURM_JOB_NODELIST=node[1-2] SLURM_NTASKS=16 SLURM_JOB_ID=7 launch/slurm.sh configs/...
#       prints what it would run (the srun line and every task's JAX variables) and runs nothing.
#
# Variables it reads (SLURM sets the first four in a job):
#   SLURM_JOB_NODELIST  the allocation's nodes (expanded by `scontrol show hostnames`); the first hosts the
#                       coordinator
#   SLURM_NTASKS        processes in all: one per GPU (JAX_NUM_PROCESSES)
#   SLURM_JOB_ID        picks the coordinator port, so two jobs on one node do not collide
#   SLURM_SUBMIT_DIR    the repo root (sbatch runs a copy of this script, so its own path says nothing)
#   SLURM_PROCID        each task's rank (JAX_PROCESS_ID), set by srun per task
#   PORT                coordinator port (default 12000 + SLURM_JOB_ID % 20000)
#   PYTHON              interpreter (default: the repo's .venv/bin/python)
#   ENTRY               the entry point module (default camels_jax.train; or camels_jax.evaluate, ...)
#   DRY_RUN             1: print the commands and each task's variables instead of running them
#SBATCH --job-name=camels_jax
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: sbatch [options] launch/slurm.sh CONFIG [flags]   (see the top of this file)" >&2
  exit 2
fi
CONFIG=$1; shift
: "${SLURM_JOB_NODELIST:?not inside a SLURM allocation (set it, with SLURM_NTASKS and SLURM_JOB_ID, for DRY_RUN)}"
: "${SLURM_NTASKS:?SLURM_NTASKS is not set}"
: "${SLURM_JOB_ID:?SLURM_JOB_ID is not set}"
REPO=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
ENTRY=${ENTRY:-camels_jax.train}
# The first host, without `| head -n 1`: head closing the pipe early can kill scontrol with SIGPIPE, which
# pipefail turns into this script's exit status (141).
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD=${HOSTS%%$'\n'*}
PORT=${PORT:-$((12000 + SLURM_JOB_ID % 20000))}
export JAX_COORDINATOR_ADDRESS="$HEAD:$PORT" JAX_NUM_PROCESSES="$SLURM_NTASKS"
# Each task's rank is known only inside srun, hence the small bash -c.
TASK='export JAX_PROCESS_ID=$SLURM_PROCID; exec "$@"'
CMD=(srun --kill-on-bad-exit=1 --chdir="$REPO" bash -c "$TASK" task
     "$PYTHON" -m "$ENTRY" --config "$CONFIG" --distributed "$@")
if [ "${DRY_RUN:-0}" = 1 ]; then
  echo "coordinator: $JAX_COORDINATOR_ADDRESS; processes: $JAX_NUM_PROCESSES; repo: $REPO"
  printf '%q ' "${CMD[@]}"; echo
  for ((i = 0; i < SLURM_NTASKS; i++)); do
    echo "task $i: JAX_COORDINATOR_ADDRESS=$JAX_COORDINATOR_ADDRESS JAX_NUM_PROCESSES=$JAX_NUM_PROCESSES JAX_PROCESS_ID=$i"
  done
  exit 0
fi
exec "${CMD[@]}"
