#!/usr/bin/env bash
# Runs one camels_jax job on every worker of a Cloud TPU VM pod slice: the repo is copied to each worker and
# installed there (into .venv, with jax[tpu]), then every worker runs the same command with --distributed
# (on a pod slice jax.distributed finds its peers through the TPU metadata, so no coordinator is named).
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG [flags of the entry point ...]
#   launch/tpu_pod.sh my-v4-32 us-central2-b configs/camels_squad.py --workdir=gs://BUCKET/run1
#   DRY_RUN=1 launch/tpu_pod.sh my-v4-32 us-central2-b configs/tiny.py   prints the gcloud commands only
#
# Variables:
#   ENTRY    the entry point module (default camels_jax.train; or camels_jax.evaluate, ...)
#   GCLOUD   the gcloud CLI (default: gcloud on PATH)
#   DRY_RUN  1: print the two gcloud commands (copy to, then run on --worker=all) instead of running them
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG [flags of the entry point ...]" >&2; exit 2; }
TPU_NAME=$1; ZONE=$2; CONFIG=$3; shift 3
REPO=$(cd "$(dirname "$0")/.." && pwd)
ENTRY=${ENTRY:-camels_jax.train}
GCLOUD=${GCLOUD:-gcloud}
# The config and flags travel inside one remote shell command: quoted, so a value with spaces stays one flag.
ARGS=$(printf ' %q' "$CONFIG" "$@")
REMOTE="set -e; cd ~/camels_jax
[ -x .venv/bin/python ] || bash launch/install.sh
.venv/bin/pip install -q 'jax[tpu]'
.venv/bin/python -m $ENTRY --distributed --config$ARGS"

run() {
  if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
run "$GCLOUD" compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all "$REPO" "$TPU_NAME:~/camels_jax"
run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$REMOTE"
