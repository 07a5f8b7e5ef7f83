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

small="--layers 6 --hidden 256 --heads 8 --kv_heads 4 --ffn 704 --vocab 1024 --latent 8 --in_channels 4 --patch 2 --batch 16 --prompt_len 12 --steps 20 --cfg_scale 4"
mid="--layers 8 --hidden 512 --heads 8 --kv_heads 4 --ffn 1408 --vocab 4096 --latent 16 --in_channels 4 --patch 2 --batch 8 --prompt_len 16 --steps 20 --cfg_scale 4"
paper="--layers 22 --hidden 2048 --heads 32 --kv_heads 4 --ffn 5632 --vocab 32004 --latent 32 --in_channels 4 --patch 2 --batch 32 --prompt_len 16 --steps 20 --cfg_scale 4"
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
