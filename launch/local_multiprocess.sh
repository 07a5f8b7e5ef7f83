#!/usr/bin/env bash
# N training processes on this machine under jax.distributed (how a multi-host run is tested here).
#   launch/local_multiprocess.sh NUM_PROCESSES --config=configs/mnist_tiny.py --workdir=runs/x [...]
# Each process gets DEVICES_PER_PROCESS fake CPU devices (default 1) unless JAX_PLATFORMS says
# otherwise; process 0 coordinates on 127.0.0.1:$PORT. Logs: WORKDIR-less stdout per process in
# ${LOG_DIR:-/tmp}/monoformer_proc_<i>.log. Exits non-zero if any process fails. MAIN_MODULE
# replaces the entry point (the tests run tests.fault_main, which injects faults).
set -euo pipefail
n=${1:?usage: $0 NUM_PROCESSES [main.py flags...]}
shift
port=${PORT:-$((20000 + RANDOM % 20000))}
per=${DEVICES_PER_PROCESS:-1}
log_dir=${LOG_DIR:-/tmp}
pids=()
for ((i = 0; i < n; i++)); do
  MONOFORMER_DISTRIBUTED=1 MONOFORMER_COORDINATOR="127.0.0.1:${port}" \
  MONOFORMER_NUM_PROCESSES="$n" MONOFORMER_PROCESS_ID="$i" \
  JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${per}" \
    python -m "${MAIN_MODULE:-monoformer_jax.main}" "$@" > "${log_dir}/monoformer_proc_${i}.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
[ "$status" -eq 0 ] || { echo "a process failed; see ${log_dir}/monoformer_proc_*.log" >&2; }
exit "$status"
