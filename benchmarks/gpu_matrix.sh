#!/bin/bash
# The GPU measurements of RESULTS.md ("On an accelerator"), one command on one GPU machine:
#   bash benchmarks/gpu_matrix.sh OUT_DIR
# writes OUT_DIR/attention_check.jsonl and OUT_DIR/step_and_sample.jsonl (one JSON line per run)
# and OUT_DIR/log.txt. Each run is its own process with its own time limit, so one failure costs
# only its line.
set -u
out=${1:?usage: gpu_matrix.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
log="$out/log.txt"
{ nvidia-smi -L; $py -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"; } >>"$log" 2>&1

for bidi in 1 0; do
  timeout 120 $py benchmarks/attention_check.py --bidirectional_image $bidi >>"$out/attention_check.jsonl" 2>>"$log"
done

. "$(dirname "$0")/shapes.sh"  # $small, $mid, $paper
bench() {  # limit, then step_and_sample flags
  local limit=$1
  shift
  echo "== $*" >>"$log"
  timeout "$limit" $py benchmarks/step_and_sample.py --peak_tflops 989 "$@" >>"$out/step_and_sample.jsonl" 2>>"$log" ||
    echo "{\"failed\": \"$*\", \"rc\": $?}" >>"$out/step_and_sample.jsonl"
}
variants() {  # limit, shape flags
  bench "$1" $2 --dtype float32 --attention einsum
  bench "$1" $2 --dtype bfloat16 --attention einsum --pad_to 8
  bench "$1" $2 --dtype bfloat16 --attention cudnn --pad_to 8
}
variants 90 "$small"
bench 200 $paper --dtype bfloat16 --attention einsum --pad_to 8 --repeats 5
bench 200 $paper --dtype bfloat16 --attention cudnn --pad_to 8 --repeats 5
variants 90 "$mid"
