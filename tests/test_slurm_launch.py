"""launch/gpu_slurm.sbatch, run under a simulated SLURM allocation of two nodes on this machine.

The test sets what `sbatch` would set for the batch script (job id, node list, task count) and
puts a fake `srun` first on PATH that starts one task per node with what `srun` sets per task
(SLURM_PROCID, SLURM_LOCALID, the step's node list): `jax.distributed.initialize()`'s own SLURM
detection (jax/_src/clusters/slurm_cluster.py) is what connects the two processes, to a
coordinator on the first node at a port it derives from the job id.
"""

import itertools
import json
import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tests.helpers_env import subprocess_env

FAKE_SRUN = r"""#!/usr/bin/env bash
# One task per node of the simulated allocation, with the variables srun sets per task.
set -uo pipefail
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  echo "srun: task $i JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-}"
  SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i SLURM_STEP_ID=0 \
  SLURM_STEP_NODELIST="$SLURM_JOB_NODELIST" SLURM_STEP_NUM_NODES="$SLURM_NNODES" \
  SLURM_STEP_NUM_TASKS="$SLURM_NTASKS" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
"""


def _job_id() -> int:
  """A job id whose coordinator port (JAX: 61440 + id % 4096) is free here (not a test input:
  any free port will do; starting from the pid keeps concurrent sessions apart)."""
  for job_id in itertools.count(10_000 + os.getpid() % 4096):
    with socket.socket() as s:
      try:
        s.bind(("", 61440 + job_id % 4096))
        return job_id
      except OSError:
        continue


@pytest.mark.slow
def test_gpu_slurm_sbatch_trains_on_a_simulated_two_node_allocation(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(FAKE_SRUN)
  (bin_dir / "srun").chmod(0o755)
  env = subprocess_env(
      PATH=f"{bin_dir}:{os.environ['PATH']}",
      MONOFORMER_PYTHON=sys.executable,
      SLURM_JOB_ID=_job_id(),
      SLURM_JOB_NODELIST="localhost,127.0.0.1",  # two "nodes", both this machine
      SLURM_NODELIST="localhost,127.0.0.1",
      SLURM_NNODES=2,
      SLURM_NTASKS=2,
      SLURM_NTASKS_PER_NODE=1,
      SLURM_GPUS_ON_NODE=2,
      SLURM_SUBMIT_DIR=ROOT,
  )
  for name in ("MONOFORMER_COORDINATOR", "MONOFORMER_PROCESS_ID", "JAX_COORDINATOR_ADDRESS"):
    env.pop(name, None)
  work = tmp_path / "run"
  proc = subprocess.run(
      [
          "bash",
          os.path.join(ROOT, "launch", "gpu_slurm.sbatch"),
          "--config=configs/mnist_tiny.py:test",
          f"--workdir={work}",
          "--config.num_train_steps=2",
          "--config.log_every_steps=1",
          "--config.schedule.ar=0",  # one step kind, no sample grid: the launch is what is tested
          "--config.sampling.grid_classes=0",
      ],
      cwd=tmp_path,  # the script goes to SLURM_SUBMIT_DIR, as under sbatch
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  out = proc.stdout
  assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
  # The GPU ids every process takes (one task per node: all of its node's GPUs).
  assert out.count("JAX_LOCAL_DEVICE_IDS=0,1") == 2
  assert "process 0 of 2, 1 local / 2 global devices" in out
  assert "process 1 of 2, 1 local / 2 global devices" in out
  assert sorted(os.listdir(work / "checkpoints")) == ["2"]
  with open(work / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]
