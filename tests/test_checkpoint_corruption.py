"""Every way the latest checkpoint can be damaged on disk or in a bucket: the training job's
Checkpointer warns naming the step, moves it aside to WORKDIR/corrupt_checkpoints/ (kept, never
deleted), restores the step before it exactly, and saves the damaged step's number again.

(The trainer-level version, with a bit-exact resume, is test_train_system.py's
test_corrupt_latest_checkpoint_falls_back.)
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from monoformer_jax.run import checkpoints
from tests.gcs_emulator import BUCKET, gcs  # noqa: F401  pylint: disable=unused-import  # the fixture
from tests.helpers_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAMAGE = ("truncated_arrays", "deleted_metadata", "garbage_bytes", "random_100_bytes_over_1kb")


def _files(path: epath.Path):
  for child in path.iterdir():  # (no rglob: epath refuses recursive patterns on buckets)
    yield from _files(child) if child.is_dir() else [child]


def _damage(step_dir: epath.Path, how: str, rng: np.random.Generator) -> int:
  """Damages the files of a saved step as `how` says; returns how many files it changed."""
  changed = 0
  for path in sorted(_files(step_dir), key=str):
    data = path.read_bytes()
    in_state = "/state/" in str(path)
    if how == "truncated_arrays" and in_state and len(data) > 1:
      path.write_bytes(data[: len(data) // 2])
    elif how == "deleted_metadata" and "metadata" in path.name.lower():
      path.unlink()
    elif how == "garbage_bytes" and in_state:
      path.write_bytes(b"garbage")
    elif how == "random_100_bytes_over_1kb" and len(data) > 1024:
      path.write_bytes(rng.bytes(100))
    else:
      continue
    changed += 1
  return changed


def damage_and_recover(root: str, how: str, seed: int) -> None:
  """Saves steps 1 and 2 under `root`, damages step 2 as `how`, and checks the recovery."""
  rng = np.random.default_rng(seed)
  value = rng.standard_normal((64, 64)).astype(np.float32)  # 16 KB: files over 1 KB
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {"w": jax.ShapeDtypeStruct(value.shape, jnp.float32, sharding=sharding)}
  ck = checkpoints.Checkpointer(root, async_save=False, clean_unfinished=True)
  for step in (1, 2):
    ck.save(step, {"w": jnp.asarray(value * step)}, {"step": step})
  ck.close()
  step_dir = checkpoints.checkpoint_dir(root) / "2"
  assert _damage(step_dir, how, rng) > 0, how

  ck = checkpoints.Checkpointer(root, async_save=False, clean_unfinished=True)
  step, state, extra = ck.restore_latest(abstract)
  assert (step, extra) == (1, {"step": 1}), how
  np.testing.assert_array_equal(np.asarray(state["w"]), value)
  kept = epath.Path(root) / "corrupt_checkpoints" / "2"
  assert kept.is_dir() and not step_dir.exists(), how
  ck.save(2, {"w": jnp.asarray(value * 2)}, {"step": 2})  # the same step number again
  step, state, _ = ck.restore_latest(abstract)
  ck.close()
  assert step == 2 and kept.is_dir(), how
  np.testing.assert_array_equal(np.asarray(state["w"]), value * 2)


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_latest_checkpoint_is_moved_aside_and_the_previous_restored(tmp_path, capsys, how, seed):
  damage_and_recover(str(tmp_path), how, seed)
  out = capsys.readouterr().out
  assert f"checkpoint {tmp_path}/checkpoints/2 is unreadable" in out
  assert f"moved checkpoint step 2 aside to {tmp_path}/corrupt_checkpoints/2" in out


@pytest.mark.slow
def test_damaged_checkpoints_in_a_bucket(gcs, tmp_path, seed):  # noqa: F811
  """The same four kinds of damage in a bucket (orbax commits there by a marker file, not a
  rename; the step is moved aside object by object)."""
  program = (
      "import sys; from tests.test_checkpoint_corruption import DAMAGE, damage_and_recover\n"
      "for i, how in enumerate(DAMAGE):\n"
      f"  damage_and_recover(f'gs://{BUCKET}/ck{{i}}', how, {seed})\n"
      "  print('recovered from', how, flush=True)\n"
  )
  env = subprocess_env(**gcs.env, PYTHONPATH=ROOT)
  proc = subprocess.run(
      [sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for i, how in enumerate(DAMAGE):
    assert f"recovered from {how}" in proc.stdout
    assert f"moved checkpoint step 2 aside to gs://{BUCKET}/ck{i}/corrupt_checkpoints/2" in proc.stdout
  assert not os.listdir(tmp_path)  # nothing landed on the local disk
