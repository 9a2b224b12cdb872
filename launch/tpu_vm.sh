#!/usr/bin/env bash
# Run the same training command on every worker of a Cloud TPU VM slice (multi-host). Each host
# runs one process; jax.distributed.initialize() finds the others from the TPU metadata. The
# run dir (and data dir) must be storage every worker shares (e.g. a Filestore or Cloud Storage
# FUSE mount), so that every host writes into the same Orbax checkpoints. The code must be at
# ~/pretzel_jax on every worker.
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a bash launch/tpu_vm.sh experiments/x.py --run_dir /mnt/r
# Optional: PROJECT (else gcloud's default). DRY_RUN=1 prints the gcloud command instead.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need TPU_NAME "the TPU VM's name, e.g. TPU_NAME=my-v5e-32"
need ZONE "its zone, e.g. ZONE=us-west4-a"
[[ $# -ge 1 ]] || { echo "usage: launch/tpu_vm.sh EXPERIMENT.py[:arg] [args ...]" >&2; exit 2; }

train="cd ~/pretzel_jax && python -m pretzel_jax.train --distributed --config $(quote "$@")"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} \
  --worker=all --command "$train"
