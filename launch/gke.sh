#!/usr/bin/env bash
# Train on GKE TPU slices: fill in launch/gke_jobset.yaml and `kubectl apply` it.
#   IMAGE=us-docker.pkg.dev/p/r/pretzel:1 TPU_ACCELERATOR=tpu-v5p-slice TPU_TOPOLOGY=2x2x2 \
#   SHARED_PVC=runs-pvc bash launch/gke.sh experiments/x.py --run_dir /shared/runs/x
# IMAGE holds the code (its working directory the repository root) and its dependencies;
# SHARED_PVC is a ReadWriteMany volume claim (Filestore, Cloud Storage FUSE) mounted at /shared.
# Optional: NUM_SLICES (1), CHIPS_PER_HOST (4), MAX_RESTARTS (3), JOB_NAME (pretzel-<experiment>).
# DRY_RUN=1 prints the manifest (and the kubectl command, as its first line) instead.
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
source "$here/common.sh"
need IMAGE "the container image, e.g. IMAGE=us-docker.pkg.dev/my-project/repo/pretzel:1"
need TPU_ACCELERATOR "the GKE TPU type, e.g. TPU_ACCELERATOR=tpu-v5p-slice"
need TPU_TOPOLOGY "the slice topology, e.g. TPU_TOPOLOGY=2x2x2"
need SHARED_PVC "a ReadWriteMany PersistentVolumeClaim for the run dir, e.g. SHARED_PVC=runs"
[[ $# -ge 1 ]] || { echo "usage: launch/gke.sh EXPERIMENT.py[:arg] [args ...]" >&2; exit 2; }
fail() { echo "error: $*" >&2; exit 2; }

NUM_SLICES=${NUM_SLICES:-1} CHIPS_PER_HOST=${CHIPS_PER_HOST:-4} MAX_RESTARTS=${MAX_RESTARTS:-3}
for name in NUM_SLICES CHIPS_PER_HOST; do
  [[ ${!name} =~ ^[1-9][0-9]*$ ]] || fail "$name=${!name}: use a whole number >= 1"
done
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || fail "MAX_RESTARTS=$MAX_RESTARTS: use a whole number >= 0"
[[ $TPU_TOPOLOGY =~ ^[1-9][0-9]*(x[1-9][0-9]*)+$ ]] || fail "TPU_TOPOLOGY=$TPU_TOPOLOGY: use e.g. 2x2x2"
chips=$((${TPU_TOPOLOGY//x/*}))
((chips % CHIPS_PER_HOST == 0)) \
  || fail "TPU_TOPOLOGY=$TPU_TOPOLOGY has $chips chips, not a multiple of CHIPS_PER_HOST=$CHIPS_PER_HOST"
HOSTS=$((chips / CHIPS_PER_HOST))
stem=$(basename "${1%%:*}" .py)
JOB_NAME=${JOB_NAME:-pretzel-$(tr '_A-Z' '-a-z' <<<"$stem" | cut -c1-30)}
[[ $JOB_NAME =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]] || fail "JOB_NAME=$JOB_NAME: use a-z, 0-9 and -"

COMMAND=$(
  words=(python -m pretzel_jax.train --distributed --config "$@")
  items=()
  for w in "${words[@]}"; do
    [[ $w != *$'\n'* ]] || fail "an argument holds a newline: $(quote "$w")"
    items+=("'${w//\'/\'\'}'")  # a YAML single-quoted string: ' doubles
  done
  joined=$(printf ', %s' "${items[@]}")
  echo "[${joined:2}]"
)

shopt -u patsub_replacement 2>/dev/null || true  # bash 5.2: '&' in a value stays literal
manifest=$(<"$here/gke_jobset.yaml")
for name in JOB_NAME IMAGE TPU_ACCELERATOR TPU_TOPOLOGY NUM_SLICES HOSTS CHIPS_PER_HOST \
  MAX_RESTARTS SHARED_PVC COMMAND; do
  manifest=${manifest//"\${$name}"/${!name}}
done
summary="$NUM_SLICES slice(s) x $HOSTS host(s) = $((NUM_SLICES * HOSTS)) processes"
if [[ -n ${DRY_RUN:-} ]]; then
  printf '# kubectl apply -f -  (%s)\n%s\n' "$summary" "$manifest"
  exit 0
fi
echo "JobSet $JOB_NAME: $summary" >&2
kubectl apply -f - <<<"$manifest"
