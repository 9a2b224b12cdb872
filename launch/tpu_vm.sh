#!/usr/bin/env bash
# Run the same training command on every worker of a Cloud TPU VM slice (multi-host). Each host
# runs one process; jax.distributed.initialize() finds the others. The run dir must be shared
# storage (e.g. a gs:// bucket) so every host writes the same Orbax checkpoints.
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a bash launch/tpu_vm.sh experiments/x.py --run_dir gs://b/r
# Not exercised by CI (no TPU here).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
config=${1:?usage: launch/tpu_vm.sh EXPERIMENT.py [args ...]}
shift
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/pretzel_jax && python -m pretzel_jax.train --distributed --config $config$args"
