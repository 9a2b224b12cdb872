#!/usr/bin/env bash
# Train on this machine (all local devices).
#   bash launch/local.sh experiments/digits_flow.py [--config.train.steps=100 ...]
set -euo pipefail
config=${1:?usage: launch/local.sh EXPERIMENT.py [--config.key=value ...]}
shift
exec python -m pretzel_jax.train --config "$config" "$@"
