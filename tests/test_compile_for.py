"""tools/compile_for: a config compiled ahead of time for a TPU slice on this CPU host (libtpu)."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import mnist_tiny
from monoformer_jax.model.monoformer import init_params
from monoformer_jax.run import config as config_lib
from monoformer_jax.run.sharding import DEFAULT_RULES
from tests.helpers import ROOT
from tests.helpers_env import subprocess_env

pytest.importorskip("libtpu", reason="the TPU compiler: pip install -e '.[tpu]' (part of '.[test]')")
pytestmark = pytest.mark.slow
TOPOLOGY, CHIPS = "v5e:2x2", 4
FSDP = ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]
REPLICATED = ["--config.mesh.data=-1", "--config.mesh.fsdp=1"]
# mnist_tiny.py:test's model, counted by hand: hidden 32, 2 layers, vocabulary 516, 28x28x1
# images in 7x7 patches (learn_sigma: 2 x 49 outputs a patch), a 256-frequency timestep embedder.
N_PARAMS = (
    2 * 516 * 32  # embedding and LM head
    + 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32)  # q, o; k, v (2 KV heads of 8); MLP; 2 norms
    + 32  # final norm
    + (32 * 64 + 64)  # adaLN before the decoder (shift, scale)
    + (32 * 64 + 64)
    + (32 * 98 + 98)  # final layer: its adaLN and the linear to patches
    + (256 * 32 + 32)
    + (32 * 32 + 32)  # timestep embedder
    + (49 * 32 + 32)  # x_embedder
)


def _compile_for(tmp_path, *flags):
  out = tmp_path / "report.json"
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "monoformer_jax.tools.compile_for",
          "--config=configs/mnist_tiny.py:test",
          f"--topology={TOPOLOGY}",
          f"--out={out}",
          *flags,
      ],
      cwd=ROOT,
      env=subprocess_env(),
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  return proc, (json.loads(out.read_text()) if out.exists() else None)


def _own_state_count(fsdp: int) -> tuple[int, int]:
  """(parameters, bytes per chip of params + EMA + Adam's two moments + the counters), counted
  from the model's logical axis names: a dimension named `embed` is split over the fsdp chips
  when they divide it; every other name maps to a mesh axis of size 1 here."""
  config = config_lib.model_config_from(mnist_tiny.get_config("test"))
  boxed = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  rules = dict(DEFAULT_RULES)
  n, per_chip = 0, 0
  for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
    shape, names = leaf.value.shape, leaf.names
    n += int(np.prod(shape))
    split = any(rules.get(name) == "fsdp" and dim % fsdp == 0 for dim, name in zip(shape, names))
    per_chip += int(np.prod(shape)) * 4 // (fsdp if split else 1)
  # params, EMA, mu, nu (float32); the step, Adam's and the learning-rate schedule's counts (int32).
  return n, 4 * per_chip + 3 * 4


def test_tiny_config_on_a_small_slice(tmp_path):
  proc, report = _compile_for(tmp_path, *FSDP)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert report["topology"] == TOPOLOGY and report["num_chips"] == CHIPS and report["devices_per_chip"] == 1
  assert report["mesh"] == {"data": 1, "fsdp": CHIPS, "tensor": 1}
  n_params, state_bytes = _own_state_count(CHIPS)
  assert report["n_params"] == n_params == N_PARAMS == 69_954
  assert report["state_bytes_per_chip"] == state_bytes
  assert set(report["steps"]) == {"diffusion", "ar", "sample"}  # the test config's schedule + sampler
  for kind, step in report["steps"].items():
    assert step["kind"] == kind and step["fits"] is True
    assert {"bytes_per_chip", "hbm_bytes_per_chip", "flops_per_step", "optimal_seconds", "predicted_mfu"} <= set(step)
    assert step["hbm_bytes_per_chip"] == 16 * 1024**3  # a v5e chip
    if kind != "sample":  # the train steps: the compiler's FLOPs and ours agree to what each counts
      assert 0 < step["predicted_mfu"] <= 1
      assert 0.8 < step["compiler_flops_per_chip"] / step["flops_per_chip"] < 1.6, (kind, step)
  # The sampler's MFU cannot be predicted (its loop is counted once): null, with the reason.
  assert report["steps"]["sample"]["predicted_mfu"] is None
  assert "counts the denoising loop's body once" in report["steps"]["sample"]["predicted_mfu_note"]
  # On one chip, as `sample --dtype bfloat16` opens it: the weights alone, two bytes a parameter.
  one = report["sample_one_chip"]
  assert one["fits"] is True and one["weights_dtype"] == "bfloat16" and one["predicted_mfu"] is None
  # (TPU layouts pad this model's small arrays to tiles: the compiler holds more than our count.)
  assert one["weight_bytes"] == 2 * n_params and one["argument_bytes"] >= one["weight_bytes"]
  assert one["bytes_per_chip"] == one["argument_bytes"] + one["output_bytes"] + one["temp_bytes"] - one["alias_bytes"]
  for kind in ("diffusion", "ar"):
    step = report["steps"][kind]
    # The compiler holds at least our count of the sharded state as arguments (TPU layouts pad
    # small arrays to tiles, so not exactly), and the donated state is not counted twice.
    assert step["argument_bytes"] >= state_bytes and step["alias_bytes"] >= state_bytes
    assert (
        step["bytes_per_chip"]
        == step["argument_bytes"] + step["output_bytes"] + step["temp_bytes"] - step["alias_bytes"]
    )
  assert "step s:" in proc.stdout and "fits" in proc.stdout  # the table
  # Sharded over 4 chips: well under the whole state (the tool's own replicated figure: below).
  assert state_bytes < 4 * N_PARAMS * 4 / 3


def test_a_config_too_large_for_the_slice_is_refused(tmp_path):
  """Without FSDP (data parallel only: every chip holds the whole state), too large a batch."""
  proc, report = _compile_for(tmp_path, *REPLICATED, "--config.data.image_batch_size=262144", "--config.schedule.ar=0")
  assert proc.returncode == 2, proc.stderr[-3000:]
  error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(error) == 1 and "does not fit v5e:2x2" in error[0], proc.stderr[-3000:]
  assert "diffusion needs" in error[0] and "Largest state arrays per chip" in error[0] and "mesh.fsdp" in error[0]
  assert "Traceback" not in proc.stderr
  assert report["steps"]["diffusion"]["fits"] is False  # the report is written all the same
  assert report["mesh"] == {"data": CHIPS, "fsdp": 1, "tensor": 1}
  # Params, EMA and Adam's two moments (float32), whole on every chip, and three int32 counters.
  assert report["n_params"] == N_PARAMS
  assert report["state_bytes_per_chip"] == 4 * N_PARAMS * 4 + 3 * 4 == _own_state_count(1)[1]


def test_an_unknown_topology_is_one_message(tmp_path):
  proc, _ = _compile_for(tmp_path, "--topology=v9z:2x2")
  assert proc.returncode == 2 and "unknown TPU generation 'v9z'" in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "report.json")
