#!/usr/bin/env bash
# Submit launch/slurm.sbatch: NODES nodes, one training process per node (all its GPUs).
#   NODES=4 bash launch/slurm.sh experiments/x.py --run_dir /shared/runs/x
# Optional: GPUS_PER_NODE (default 8); sbatch's own variables (SBATCH_PARTITION,
# SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...) pass through. DRY_RUN=1 prints the sbatch command.
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
source "$here/common.sh"
need NODES "how many nodes, e.g. NODES=4"
[[ $# -ge 1 ]] || { echo "usage: launch/slurm.sh EXPERIMENT.py[:arg] [args ...]" >&2; exit 2; }
[[ $NODES =~ ^[1-9][0-9]*$ ]] || { echo "error: NODES=$NODES is not a node count" >&2; exit 2; }

run sbatch --nodes="$NODES" --gpus-per-node="${GPUS_PER_NODE:-8}" \
  --job-name="pretzel-$(basename "${1%%:*}" .py)" "$here/slurm.sbatch" "$@"
