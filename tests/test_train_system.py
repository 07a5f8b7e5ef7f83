"""The training system end to end: resume after SIGKILL, corrupt checkpoints, config errors."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from monoformer_jax.train.scheduler import StepScheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, *overrides, env=None, check=True):
  cmd = [sys.executable, "-m", "monoformer_jax.main", "--config=configs/mnist_tiny.py:test",
         f"--workdir={workdir}", *overrides]
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  full_env.update(env or {})
  proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows}


def _final_params(workdir):
  from monoformer_jax.train.checkpointing import load_for_inference
  import jax
  _, _, params, _ = load_for_inference(str(workdir), use_ema=False)
  return jax.tree.leaves(jax.device_get(params))


STEPS = ["--config.num_train_steps=20", "--config.checkpoint_every_steps=10",
         "--config.log_every_steps=2", "--config.schedule.diffusion=1", "--config.schedule.ar=1"]


@pytest.mark.slow
def test_sigkill_and_resume_is_exact(tmp_path):
  straight, broken = tmp_path / "straight", tmp_path / "broken"
  _run(straight, *STEPS)
  killed = _run(broken, *STEPS, env={"MONOFORMER_FAULT_KILL_AT_STEP": "10"}, check=False)
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert sorted(os.listdir(broken / "checkpoints")) == ["10"]
  resumed = _run(broken, *STEPS)
  assert "resumed from checkpoint step 10" in resumed.stdout
  a, b = _losses(straight), _losses(broken)
  assert sorted(a) == sorted(b) == list(range(2, 21, 2))
  for step in a:
    assert a[step] == b[step], (step, a[step], b[step])
  for x, y in zip(_final_params(straight), _final_params(broken)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(tmp_path):
  work = tmp_path / "run"
  _run(work, "--config.num_train_steps=6", "--config.checkpoint_every_steps=3")
  assert sorted(os.listdir(work / "checkpoints")) == ["3", "6"]
  # Corrupt every data file of the latest step's state.
  state_dir = work / "checkpoints" / "6" / "state"
  for root, _, files in os.walk(state_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  proc = _run(work, "--config.num_train_steps=8", "--config.checkpoint_every_steps=4")
  assert "falling back to the previous checkpoint" in proc.stdout + proc.stderr
  assert "resumed from checkpoint step 3" in proc.stdout


@pytest.mark.parametrize("override,message", [
    ("--config.data.image_batch_size=7", "config.data.image_batch_size: 7 is not divisible by "
                                         "the data-parallel size 2"),
    ("--config.model.patch_size=5", "patch_size=5 does not divide image_height=28"),
    ("--config.sampling.guidance_scale=0.5", "config.sampling.guidance_scale: must be >= 1"),
    ("--config.model.hiden_size=3", "hiden_size"),
    ("--config.optimizer.learning_rate=abc", "learning_rate"),
])
def test_bad_configs_fail_naming_the_field(tmp_path, override, message):
  proc = _run(tmp_path / "bad", override, "--config.mesh.data=2", env={
      "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, check=False)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "bad" / "checkpoints").exists()


def test_scheduler_ratio_and_resume():
  s = StepScheduler({"diffusion": 9, "ar": 1, "mixed": 0})
  kinds = [s.next() for _ in range(100)]
  assert kinds.count("ar") == 10 and kinds.count("diffusion") == 90
  # Evenly spread: never two AR steps within 9 steps of each other.
  idx = [i for i, k in enumerate(kinds) if k == "ar"]
  assert min(np.diff(idx)) == 10
  s2 = StepScheduler({"diffusion": 9, "ar": 1})
  for _ in range(37):
    s2.next()
  state = json.loads(json.dumps(s2.get_state()))
  s3 = StepScheduler({"diffusion": 9, "ar": 1})
  s3.set_state(state)
  assert [s2.next() for _ in range(30)] == [s3.next() for _ in range(30)]
  with pytest.raises(ValueError, match="positive weight"):
    StepScheduler({"diffusion": 0, "ar": 0})
