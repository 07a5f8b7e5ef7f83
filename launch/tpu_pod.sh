#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: copy this repository to every worker, install it there, then run
# the same command on all of them (jax.distributed discovers the topology on TPU VMs).
#   TPU_NAME=my-v5e-256 ZONE=us-west4-a launch/tpu_pod.sh --config=configs/imagenet256.py \
#       --workdir=gs://bucket/runs/imagenet256 --config.data.image_path=gs://bucket/latents
#   launch/tpu_pod.sh --dry_run ...   # print the commands (one per line, shell-quoted), run nothing
# jax[tpu] is pinned to the project's jax version. Every argument reaches the workers' python
# exactly as given here (quoted once for the local shell, once for the remote one).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
if [[ "${1:-}" == "--dry_run" ]]; then
  DRY_RUN=1
  shift
fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
GCLOUD_FLAGS=(--zone="$ZONE" --worker=all)
if [[ -n "${PROJECT:-}" ]]; then
  GCLOUD_FLAGS+=(--project="$PROJECT")
fi
JAX_VERSION=$(python3 -c "import re;print(re.search(r'jax==([0-9.]+)',open('setup.cfg').read()).group(1))")
ARCHIVE=${ARCHIVE:-/tmp/monoformer_jax.tgz}

run() {
  if ((DRY_RUN)); then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

# The compilation cache (monoformer_jax/compilation_cache.py) reaches the workers when it is set
# here: on a pod give it a bucket, which every worker reads (only process 0 writes entries, so a
# cache on each worker's own disk would serve worker 0 alone); a resume then loads its steps.
CACHE_ENV=""
if [[ -n "${MONOFORMER_COMPILATION_CACHE:-}" ]]; then
  CACHE_ENV="MONOFORMER_COMPILATION_CACHE=$(printf '%q' "$MONOFORMER_COMPILATION_CACHE") "
fi

REMOTE="set -e
mkdir -p ~/monoformer_jax && tar xzf ~/$(basename "$ARCHIVE") -C ~/monoformer_jax && cd ~/monoformer_jax
python3 -m venv ~/venv && . ~/venv/bin/activate
pip install -q 'jax[tpu]==${JAX_VERSION}' -e .
${CACHE_ENV}MONOFORMER_DISTRIBUTED=1 python -m monoformer_jax.main $(printf '%q ' "$@")"

run tar czf "$ARCHIVE" --exclude=.venv --exclude=.git --exclude=runs .
run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME":~/ "${GCLOUD_FLAGS[@]}"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_FLAGS[@]}" --command="$REMOTE"
