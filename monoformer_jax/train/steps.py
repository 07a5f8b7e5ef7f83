"""Pure train steps: autoregressive, diffusion, and the official mixed batch.

All three share one TrainState and one signature, `step(state, batch, rng) -> (state, metrics)`,
and are jitted with the same in/out shardings and buffer donation (see `compile_step`). A step
splits its batch into `grad_accum_steps` micro-batches and sums their gradients in a scan, so large
global batches fit in memory.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.monoformer import MonoFormer
from monoformer_jax.train import sharding as sharding_lib
from monoformer_jax.train.losses import lm_loss, masked_mean
from monoformer_jax.train.state import TrainState, ema_decay, update_ema

STEP_KINDS = ("ar", "diffusion", "mixed")


def _noisy_images(objective, images, image_mask, rng):
  """Draws t and noise per image slot; returns (x_t, t, model timesteps, noise), all (B, M, ...)."""
  b, m = image_mask.shape
  flat = images.reshape((b * m,) + images.shape[2:]).astype(jnp.float32)
  t_rng, n_rng = jax.random.split(rng)
  t = objective.sample_timesteps(t_rng, (b * m,))
  noise = jax.random.normal(n_rng, flat.shape, jnp.float32)
  x_t = objective.add_noise(flat, noise, t)
  model_t = objective.model_timesteps(t)
  return flat, x_t, t, model_t, noise


def diffusion_loss(objective, model_out, x0, x_t, noise, t, image_mask):
  """Official: mean over the image rows of (per-sample mse + vb)."""
  b, m = image_mask.shape
  out = model_out.reshape((b * m,) + model_out.shape[2:]).astype(jnp.float32)
  terms = objective.loss(out, x0, x_t, noise, t)
  mask = image_mask.reshape(-1)
  return {k: masked_mean(v, mask) for k, v in terms.items()}


def make_loss_fn(kind: str, model_config: ModelConfig, objective, diffusion_weight: float,
                 lm_weight: float) -> Callable:
  """loss_fn(params, batch, rng) -> (loss, aux metrics)."""
  model = MonoFormer(model_config)

  def loss_fn(params, batch, rng):
    metrics = {}
    if kind == "ar":
      # Weighted as in the mixed objective (w_lm * L_lm): with alternating steps the shared
      # parameters' Adam statistics see both objectives' gradients, and an unweighted LM
      # gradient (far larger than the diffusion one) would shrink every diffusion update.
      out = model.apply({"params": params}, batch, return_image=False)
      loss, count = lm_loss(out["logits"], batch["targets"], batch["loss_mask"])
      return lm_weight * loss, {"loss_lm": loss, "lm_tokens": count}
    x0, x_t, t, model_t, noise = _noisy_images(objective, batch["images"], batch["image_mask"], rng)
    b, m = batch["image_mask"].shape
    out = model.apply({"params": params}, batch, x_t.reshape(batch["images"].shape),
                      model_t.reshape(b, m), return_logits=(kind == "mixed"))
    terms = diffusion_loss(objective, out["image"], x0, x_t, noise, t, batch["image_mask"])
    metrics.update({f"loss_diffusion_{k}" if k != "loss" else "loss_diffusion": v
                    for k, v in terms.items()})
    loss = diffusion_weight * terms["loss"]
    if kind == "mixed":
      l_lm, count = lm_loss(out["logits"], batch["targets"], batch["loss_mask"])
      metrics.update({"loss_lm": l_lm, "lm_tokens": count})
      loss = loss + lm_weight * l_lm
    metrics["images"] = jnp.sum(batch["image_mask"].astype(jnp.float32))
    return loss, metrics

  return loss_fn


def make_train_step(kind: str, model_config: ModelConfig, objective, optimizer, *,
                    grad_accum_steps: int = 1, diffusion_weight: float = 1.0,
                    lm_weight: float = 0.01, ema_decay_value: float = 0.9999,
                    ema_warmup: bool = True, learning_rate_fn=None) -> Callable:
  if kind not in STEP_KINDS:
    raise ValueError(f"unknown step kind {kind!r}; one of {STEP_KINDS}")
  loss_fn = make_loss_fn(kind, model_config, objective, diffusion_weight, lm_weight)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    if grad_accum_steps == 1:
      (loss, aux), grads = grad_fn(state.params, batch, rng)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape((grad_accum_steps, x.shape[0] // grad_accum_steps) + x.shape[1:]),
          batch)

      def body(carry, xs):
        mb, i = xs
        (l, a), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        acc_g, acc_l, acc_a = carry
        return (jax.tree.map(jnp.add, acc_g, g), acc_l + l,
                jax.tree.map(jnp.add, acc_a, a)), None

      zeros_g = jax.tree.map(jnp.zeros_like, state.params)
      aux_shape = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro),
                                                 rng)[0][1])
      zeros_a = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
      (grads, loss, aux), _ = jax.lax.scan(
          body, (zeros_g, jnp.zeros((), jnp.float32), zeros_a),
          (micro, jnp.arange(grad_accum_steps)))
      scale = 1.0 / grad_accum_steps
      grads = jax.tree.map(lambda g: g * scale, grads)
      loss = loss * scale
      aux = {k: (v if k in ("lm_tokens", "images") else v * scale) for k, v in aux.items()}
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, ema_decay_value, ema_warmup)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=update_ema(state.ema_params, params, decay))
    metrics = dict(aux, loss=loss, grad_norm=optax.global_norm(grads))
    if learning_rate_fn is not None:
      metrics["learning_rate"] = learning_rate_fn(state.step)
    return new_state, metrics

  return step


def compile_step(step_fn, state_shardings, mesh, rules, example_batch: dict):
  """jit with explicit shardings and donation; AOT-compiles for the example batch's shapes."""
  batch_shardings = {k: sharding_lib.batch_sharding(mesh, v.ndim) for k, v in example_batch.items()}
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings,
                                          sharding_lib.replicated(mesh)),
                   out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
                   donate_argnums=(0,))

  @functools.wraps(step_fn)
  def run(state, batch, rng):
    with mesh, nn.logical_axis_rules(rules):
      return jitted(state, batch, rng)

  run.jitted = jitted
  return run
