#!/usr/bin/env bash
# Runs one camels_jax job on every worker of a Cloud TPU VM pod slice (each worker runs the same command;
# jax.distributed connects them, and the data-parallel mesh spans all chips).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/camels_squad.py --workdir=gs://BUCKET/run1 [--config.x=y ...]
#
# The repo is copied to every worker and installed there (into .venv, with jax[tpu]).
set -euo pipefail
TPU_NAME=$1; ZONE=$2; CONFIG=$3; shift 3
REPO=$(cd "$(dirname "$0")/.." && pwd)
gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all "$REPO" "$TPU_NAME":~/camels_jax
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e; cd ~/camels_jax
  [ -x .venv/bin/python ] || bash launch/install.sh
  .venv/bin/pip install -q 'jax[tpu]'
  .venv/bin/python -m camels_jax.train --config $CONFIG --distributed $*
"
