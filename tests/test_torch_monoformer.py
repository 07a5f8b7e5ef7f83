"""The plain-PyTorch MonoFormer of the CPU benchmark (benchmarks/torch_monoformer.py) computes what
our steps compute: the official image loss and the text loss, and their gradients, on the same
weights, rows, timesteps and noise. Without this the benchmark's ratios would compare different work."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import cpu_vs_torch, step_and_sample, torch_monoformer
from monoformer_jax import batch as batch_lib, diffusion
from monoformer_jax.model.monoformer import MonoFormer, init_params
from monoformer_jax.train import steps

SHAPE = "--layers 2 --hidden 64 --heads 4 --kv_heads 2 --ffn 96 --vocab 64 --latent 4 --in_channels 2 --patch 2"


def _setup(seed):
  args = step_and_sample.parse_args((SHAPE + " --batch 4 --prompt_len 3").split())
  cfg = step_and_sample.model_config(args)
  image_batch, text_batch = step_and_sample.make_batches(args, cfg, np.random.default_rng(seed))
  params = nn.unbox(init_params(cfg, jax.random.key(seed)))
  # Zero-initialised parts (x_embedder, adaLN, final modulation) would hide a wrong port.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  model = torch_monoformer.from_model_config(cfg)
  torch_monoformer.load_flax_params(model, params)
  return args, cfg, image_batch, text_batch, params, model


def _close(ours, theirs, what, rel=2e-5):
  ours, theirs = np.asarray(ours), theirs.detach().numpy()
  scale = np.max(np.abs(ours))
  assert scale > 0, what
  np.testing.assert_allclose(theirs, ours, atol=rel * scale, rtol=0, err_msg=what)


def test_image_loss_and_gradients_equal_ours(seed):
  args, cfg, batch, _, params, model = _setup(seed)
  start = 1 + args.prompt_len + 1
  # The official layout puts every row's image tokens at the same place.
  is_image = batch["kinds"] == batch_lib.KIND_IMAGE
  assert (is_image[:, start : start + cfg.num_patches]).all() and is_image.sum() == args.batch * cfg.num_patches
  np.testing.assert_array_equal(
      batch["positions"], np.broadcast_to(np.arange(batch["tokens"].shape[1]), batch["positions"].shape)
  )
  rng = np.random.default_rng(seed)
  x0 = batch["images"][:, 0]
  t = np.array([0, 1, 500, 999])  # the decoder NLL at t = 0, the KL elsewhere
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  objective = diffusion.make_objective("gaussian", learn_sigma=True)

  def our_loss(p):
    x_t = objective.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    out = MonoFormer(cfg).apply(
        {"params": p}, batch, x_t[:, None], objective.model_timesteps(t)[:, None], return_logits=False
    )
    return jnp.mean(
        objective.loss(out["image"][:, 0], jnp.asarray(x0), x_t, jnp.asarray(noise), jnp.asarray(t))["loss"]
    )

  loss, grads = jax.jit(jax.value_and_grad(our_loss))(params)
  tables = torch_monoformer.gaussian_tables()
  tt = torch.tensor(t)
  x0_t, noise_t = torch.tensor(x0), torch.tensor(noise)
  x_t = tables["sqrt_ac"][tt].view(-1, 1, 1, 1) * x0_t + tables["sqrt_1mac"][tt].view(-1, 1, 1, 1) * noise_t
  out = model.denoise(torch.tensor(batch["tokens"], dtype=torch.long), x_t, tt, start)
  theirs = torch_monoformer.official_image_loss(out, x0_t, x_t, noise_t, tt, tables).mean()
  theirs.backward()
  np.testing.assert_allclose(theirs.item(), float(loss), rtol=1e-5)
  _close(grads["x_embedder"]["kernel"], model.x_embedder.weight.grad.T, "x_embedder")
  # fc1 reads the sinusoidal features of t up to 999, where torch's and XLA's float32 sin / cos
  # differ by ~1e-7; its gradient carries that as an outer product (worst over 29 seeds: 2.2e-5
  # of scale, against at most 1.1e-5 elsewhere; benchmarks/RESULTS.md, "Test suite").
  _close(grads["t_embedder"]["fc1"]["kernel"], model.t_fc1.weight.grad.T, "t_embedder fc1", rel=5e-5)
  _close(grads["adaln_module"]["kernel"], model.adaln.weight.grad.T, "adaln")
  _close(
      grads["layers_0"]["self_attn"]["q_proj"]["kernel"].reshape(args.hidden, -1), model.layers[0].q.weight.grad.T, "q"
  )
  _close(grads["layers_1"]["mlp"]["down_proj"]["kernel"], model.layers[1].down.weight.grad.T, "down")
  _close(grads["final_layer"]["linear"]["kernel"], model.final_linear.weight.grad.T, "final linear")
  _close(grads["embed_tokens"]["embedding"], model.embed.weight.grad, "embedding")


def test_text_loss_and_gradients_equal_ours(seed):
  args, cfg, _, batch, params, model = _setup(seed)
  loss_fn = steps.make_loss_fn("ar", cfg, None, 1.0, 1.0)
  norms = steps.batch_normalisers(batch)

  def our_loss(p):
    return loss_fn(p, batch, jax.random.key(0), norms, jnp.arange(args.batch))[0]

  loss, grads = jax.jit(jax.value_and_grad(our_loss))(params)
  as_long = lambda k: torch.tensor(batch[k], dtype=torch.long)  # noqa: E731
  theirs = torch_monoformer.text_loss(model, as_long("tokens"), as_long("targets"), torch.tensor(batch["loss_mask"]))
  theirs.backward()
  np.testing.assert_allclose(theirs.item(), float(loss), rtol=1e-5)
  _close(grads["lm_head"]["kernel"], model.lm_head.weight.grad.T, "lm_head")
  _close(
      grads["layers_0"]["self_attn"]["k_proj"]["kernel"].reshape(args.hidden, -1), model.layers[0].k.weight.grad.T, "k"
  )
  _close(grads["layers_1"]["mlp"]["gate_proj"]["kernel"], model.layers[1].gate.weight.grad.T, "gate")


def test_the_benchmarks_print_their_json_line(capsys, monkeypatch):
  """benchmarks/cpu_vs_torch.py and step_and_sample.py end to end at a tiny shape."""
  monkeypatch.setattr(cpu_vs_torch, "tune_for_xla_cpu", lambda: None)  # the process's malloc is the suite's
  tiny = (SHAPE + " --batch 2 --prompt_len 3 --steps 2 --repeats 1 --warmup 0").split()
  cpu_vs_torch.main(tiny + ["--rounds", "1", "--steps_per_round", "1"])
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for kind in ("img", "text"):
    assert line[kind]["jax_s"] > 0 and line[kind]["torch_s"] > 0
    assert line[kind]["speed_jax_over_torch"] == pytest.approx(line[kind]["torch_s"] / line[kind]["jax_s"])
  result = step_and_sample.run(step_and_sample.parse_args(tiny))
  assert result["n_params"] == line["n_params"]
  assert all(result[k] > 0 for k in ("train_img_s", "train_text_s", "sample_s"))
