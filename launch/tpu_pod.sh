#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: install the package on every worker, then run the same command
# on all of them (jax.distributed discovers the topology on TPU VMs).
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh --config=configs/imagenet256.py \
#       --workdir=gs://bucket/runs/imagenet256
# The repository is copied to every worker with `gcloud ... scp`; jax[tpu] is pinned to the
# project's jax version.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
JAX_VERSION=$(python3 -c "import re;print(re.search(r'jax==([0-9.]+)',open('setup.cfg').read()).group(1))")
tar czf /tmp/monoformer_jax.tgz --exclude=.venv --exclude=.git --exclude=runs .
gcloud compute tpus tpu-vm scp /tmp/monoformer_jax.tgz "$TPU_NAME":~/ --zone="$ZONE" --worker=all $PROJECT_FLAG
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all $PROJECT_FLAG --command="
  set -e
  mkdir -p ~/monoformer_jax && tar xzf ~/monoformer_jax.tgz -C ~/monoformer_jax && cd ~/monoformer_jax
  python3 -m venv ~/venv && . ~/venv/bin/activate
  pip install -q 'jax[tpu]==${JAX_VERSION}' -e .
  MONOFORMER_DISTRIBUTED=1 python -m monoformer_jax.main $*
"
