#!/bin/bash
# Issue 22, part 4 on a GPU. At the small and mid shapes an H200 step is launch-bound (3-4.5 ms,
# <3% MFU; RESULTS.md, "On an accelerator"), so a 1.3x there has to come from fewer launches, not
# from the kernels. One command on one GPU machine (~5 minutes):
#   bash benchmarks/gpu_launches.sh OUT_DIR [more step_and_sample.py flags]
# runs benchmarks/step_and_sample.py (float32, the default attention and sampler, 20 guided DDPM
# steps) at each shape in $SHAPES (default "small mid") under each XLA_FLAGS variant below, one
# process each, alternating the variants twice; OUT_DIR/launches.jsonl gets one JSON line per run
# (the flags in backend.xla_flags), OUT_DIR/log.txt the rest. The same flags parse on CPU, where
# `SHAPES=small bash benchmarks/gpu_launches.sh /tmp/x --repeats 2` is a quick check of the script.
set -u
out=${1:?usage: gpu_launches.sh OUT_DIR [step_and_sample flags]}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
log="$out/log.txt"
{ nvidia-smi -L; $py -c "import jax; print('jax', jax.__version__, jax.devices())"; } >>"$log" 2>&1

. "$(dirname "$0")/shapes.sh"  # $small, $mid, $paper
variants=(
  ""                                                    # XLA's defaults
  "--xla_gpu_enable_command_buffer="                    # no CUDA graphs: what they buy today
  "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
)
for round in 1 2; do
  for shape in ${SHAPES:-small mid}; do
    for flags in "${variants[@]}"; do
      echo "== round $round $shape [$flags]" >>"$log"
      XLA_FLAGS="$flags" timeout 150 $py benchmarks/step_and_sample.py ${!shape} "$@" >>"$out/launches.jsonl" 2>>"$log" ||
        echo "{\"failed\": \"$shape [$flags]\", \"rc\": $?}" >>"$out/launches.jsonl"
    done
  done
done
