"""Trainer features: init from a Hugging Face LLaMA, SIGTERM saves, NaN stops, the FLOP count."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax.model.monoformer import MonoFormer
from monoformer_jax.run.open import open_run
from monoformer_jax.train import metrics as metrics_lib
from tests.helpers import build, image_sample, random_params, tiny_config
from tests.helpers_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(workdir, *flags):
  return [
      sys.executable,
      "-m",
      "monoformer_jax.main",
      "--config=configs/mnist_tiny.py:test",
      f"--workdir={workdir}",
      *flags,
  ]


@pytest.fixture(scope="module")
def env():
  """The training subprocesses' environment: CPU, and the session's shared compilation cache
  (the runs here compile the same programs as those of test_train_system.py)."""
  return subprocess_env()


@pytest.mark.slow
def test_sigterm_saves_before_exit(tmp_path, env):
  work = tmp_path / "run"
  proc = subprocess.Popen(
      _cmd(work, "--config.num_train_steps=100000", "--config.checkpoint_every_steps=0", "--config.log_every_steps=5"),
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  deadline = time.time() + 300
  while time.time() < deadline:
    if (work / "metrics.jsonl").exists() and os.path.getsize(work / "metrics.jsonl") > 0:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGTERM: saving step" in out
  steps = os.listdir(work / "checkpoints")
  assert len(steps) == 1 and int(steps[0]) >= 5
  summary = json.load(open(work / "train_summary.json"))
  assert summary["final_step"] == int(steps[0])


def _run(cmd, env):
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _checkpoint_extra(work, step) -> dict:
  return json.load(open(work / "checkpoints" / str(step) / "extra" / "metadata"))


# A learning rate of 1e30 makes the loss non-finite within three steps.
_DIVERGING = ("--config.optimizer.learning_rate=1e30", "--config.optimizer.grad_clip=0.0")


@pytest.mark.parametrize("policy", ["stop", "rollback"])
def test_nan_stops_with_a_clear_error(tmp_path, env, policy):
  """`stop` exits at once; `rollback` exits the same way once its tries are spent (here the
  scaled learning rate, 0.5e30 then 0.25e30, diverges again each time)."""
  work = tmp_path / "nan"
  proc = _run(
      _cmd(
          work,
          *_DIVERGING,
          "--config.num_train_steps=30",
          f"--config.nonfinite.policy={policy}",
          "--config.nonfinite.max_tries=2",
      ),
      env,
  )
  assert proc.returncode == 3, proc.stderr[-2000:]  # cli.EXIT_STOPPED
  assert "stopped: non-finite" in proc.stderr and "at step" in proc.stderr
  assert "Traceback" not in proc.stdout + proc.stderr
  if policy == "rollback":
    assert "after 2 rollbacks" in proc.stderr
    assert proc.stdout.count("rolled back to checkpoint step 0") == 2
    assert "learning rate x0.25" in proc.stdout
    assert _checkpoint_extra(work, 0)["nonfinite"]["lr_scale"] == 1.0  # the checkpoint is intact
  else:
    assert "rolled back" not in proc.stdout


@pytest.mark.slow
def test_nan_rollback_recovers_and_keeps_the_scaled_learning_rate(tmp_path, env):
  """A real divergence (learning rate 1e30): the run rolls back to the step-0 checkpoint it saved
  for that, skips the batches read since, goes on at 1e30 x 1e-34 = 1e-4 and finishes; the
  metrics hold each step once; a restart keeps the scaled learning rate."""
  work = tmp_path / "run"
  flags = (*_DIVERGING, "--config.nonfinite.policy=rollback", "--config.nonfinite.lr_factor=1e-34")
  proc = _run(_cmd(work, *flags, "--config.num_train_steps=6"), env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stdout + proc.stderr
  assert proc.stdout.count("rolled back to checkpoint step 0 (try 1 of 3)") == 1
  skipped = int(proc.stdout.split("skipping the batches read since (")[1].split(" diffusion")[0])
  assert skipped >= 1
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [2, 4, 6]
  assert all(np.isfinite(r["loss"]) and 0 < r["learning_rate"] <= 1e-4 * 1.0001 for r in rows)
  extra = _checkpoint_extra(work, 6)
  assert extra["nonfinite"] == {"lr_scale": 1e-34, "tries": 0, "bad_step": extra["nonfinite"]["bad_step"]}
  # 5 of the 6 steps are diffusion steps (schedule 5:1) of 8 images; the skipped batches were read too.
  assert extra["data"]["diffusion"]["next_index"] == [8 * (5 + skipped)]

  proc = _run(_cmd(work, *flags, "--config.num_train_steps=8"), env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "learning rate x1e-34" in proc.stdout and "rolled back" not in proc.stdout
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [2, 4, 6, 8] and rows[-1]["learning_rate"] <= 1e-4 * 1.0001


@pytest.mark.slow
def test_init_from_a_hugging_face_llama(tmp_path, env, seed):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=500,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      tie_word_embeddings=False,
  )
  model = transformers.LlamaForCausalLM(cfg)
  model.save_pretrained(tmp_path / "hf")
  work = tmp_path / "run"
  proc = subprocess.run(
      _cmd(
          work,
          f"--config.init_from=hf:{tmp_path / 'hf'}",
          "--config.num_train_steps=0",  # initialise, save step 0, stop
          "--config.model.intermediate_size=64",
      ),
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "initialised from hf:" in proc.stdout
  params, ema = open_run(str(work), use_ema=False).params, open_run(str(work)).params
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(ema), jax.device_get(params))
  emb = np.asarray(params["embed_tokens"]["embedding"])
  ref = model.model.embed_tokens.weight.detach().numpy()
  assert emb.shape == (516, 32)  # 500 grown to the config's 516, new rows ~ N(0, 0.02)
  np.testing.assert_array_equal(emb[:500], ref)
  assert 0.005 < emb[500:].std() < 0.05
  # A mismatched architecture is refused, naming the fields.
  proc = subprocess.run(
      _cmd(tmp_path / "bad", f"--config.init_from=hf:{tmp_path / 'hf'}", "--config.model.num_layers=3"),
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode != 0 and "num_layers: checkpoint 2 vs config 3" in proc.stderr


def test_flop_count_matches_xla_cost_analysis(rng):
  config = tiny_config(
      hidden_size=128,
      intermediate_size=512,
      num_heads=4,
      num_kv_heads=2,
      vocab_size=512,
      image_height=8,
      image_width=8,
      patch_size=2,
  )
  params = random_params(config)
  batch = build(config, [[image_sample(config, rng, 40, tail_len=8)] for _ in range(2)], 64)
  model = MonoFormer(config)

  def fwd(p, b):
    return model.apply({"params": p}, b, b["images"], jnp.ones(b["image_mask"].shape))

  b = jax.tree.map(jnp.asarray, batch)
  xla = jax.jit(fwd).lower(params, b).compile().cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  ours = 2 * metrics_lib.forward_flops_per_sequence(config, 64, config.num_patches, lm_head=True)
  # XLA also counts element-wise work and the full (unmasked) attention map: within 15%.
  assert abs(xla["flops"] - ours) / ours < 0.15, (xla["flops"], ours)
  text_only = metrics_lib.forward_flops_per_sequence(config, 64, 0, lm_head=True)
  full = metrics_lib.forward_flops_per_sequence(config, 64, 16, lm_head=True)
  assert text_only < full  # causal text attention counted at half cost
  # jax's device kinds: v5p is "TPU v5", v5e "TPU v5 lite" (as libtpu's topologies name them).
  assert metrics_lib.peak_flops("TPU v5") == 459e12 and metrics_lib.peak_flops("TPU v5 lite") == 197e12
  assert metrics_lib.peak_flops("TPU v6 lite") == 918e12 and metrics_lib.peak_flops("cpu") is None
