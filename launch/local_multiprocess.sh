#!/usr/bin/env bash
# Runs a job as N local processes (one CPU device each) joined by jax.distributed: a rehearsal of a
# multi-host run on one machine.
#
#   launch/local_multiprocess.sh 2 configs/default.py --workdir=runs/mp [--config.x=y ...]
set -euo pipefail
N=$1; CONFIG=$2; shift 2
cd "$(dirname "$0")/.."
pids=()
for i in $(seq 0 $((N - 1))); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:12355 JAX_NUM_PROCESSES=$N JAX_PROCESS_ID=$i JAX_PLATFORMS=cpu \
    .venv/bin/python -m camels_jax.train --config "$CONFIG" --distributed "$@" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
