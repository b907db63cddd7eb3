#!/usr/bin/env bash
# Runs a job as N local processes (one CPU device each) joined by jax.distributed over loopback: a rehearsal
# of a multi-host run on one machine (CPU collectives go over gloo).
#
#   launch/local_multiprocess.sh N CONFIG [flags of the entry point ...]
#   launch/local_multiprocess.sh 2 configs/tiny.py --workdir=runs/mp --config.camels.streams=2
#
# Variables:
#   PORT    the coordinator's port on 127.0.0.1 (default 12355; give each concurrent run its own)
#   PYTHON  the interpreter (default: the repo's .venv/bin/python)
#   ENTRY   the entry point module (default camels_jax.train; or camels_jax.evaluate, camels_jax.perplexity)
# Exits with the first non-zero status of the processes (JAX's coordination service stops the others when
# one dies).
set -euo pipefail
N=$1; CONFIG=$2; shift 2
cd "$(dirname "$0")/.."
PORT=${PORT:-12355}
PYTHON=${PYTHON:-.venv/bin/python}
ENTRY=${ENTRY:-camels_jax.train}
pids=()
for i in $(seq 0 $((N - 1))); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i JAX_PLATFORMS=cpu \
    "$PYTHON" -m "$ENTRY" --config "$CONFIG" --distributed "$@" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || { s=$?; [ "$status" -ne 0 ] || status=$s; }; done
exit "$status"
