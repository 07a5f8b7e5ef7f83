"""Two local processes under jax.distributed (launch/local_multiprocess.sh) == one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tests.helpers import ROOT, launch_local_processes
from tests.helpers_env import subprocess_env

FLAGS = [
    "--config=configs/mnist_tiny.py:test",
    "--config.num_train_steps=6",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=6",
    "--config.schedule.diffusion=1",
    "--config.schedule.ar=1",
    "--config.data.packing=False",
    "--config.mesh.data=-1",
]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.slow
def test_two_processes_train_the_same_losses_as_one(tmp_path):
  single = tmp_path / "single"
  env1 = subprocess_env(devices=2)
  proc = subprocess.run(
      [sys.executable, "-m", "monoformer_jax.main", f"--workdir={single}", *FLAGS],
      cwd=ROOT,
      env=env1,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  multi = tmp_path / "multi"
  logs = launch_local_processes(2, [f"--workdir={multi}", *FLAGS], tmp_path)
  assert "process 1 of 2" in logs[1]
  a, b = _losses(single), _losses(multi)
  assert sorted(a) == sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
  assert sorted(os.listdir(multi / "checkpoints")) == ["6"]
