"""Pure train steps: autoregressive, diffusion, and the official mixed batch.

All three share one TrainState and one signature, `step(state, batch, rng) -> (state, metrics)`,
and are jitted with the same in/out shardings and buffer donation (see `compile_step`). A step
can split its batch into `grad_accum_steps` micro-batches and sum their gradients in a scan, so
large global batches fit in memory; the result is the full batch's step, not an approximation:

- each loss is a mean over the whole batch (the LM loss over its trained tokens, the diffusion
  loss over its image rows), so a micro-batch contributes its *sum* divided by the whole batch's
  count, computed once before the split. Averaging per-micro-batch means instead would weight a
  micro-batch's tokens by how few of them it has.
- the diffusion noise and timesteps of a row come from fold_in(rng, that row's index in the global
  batch), so a row draws the same noise whichever micro-batch (or device) it lands in.
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
from monoformer_jax.run import sharding as sharding_lib
from monoformer_jax.model.losses import lm_loss_sum
from monoformer_jax.run import state as state_lib
from monoformer_jax.run.state import TrainState, ema_decay, update_ema

STEP_KINDS = ("ar", "diffusion", "mixed", "understand")


def _noisy_images(objective, images, rng, row_ids):
  """Draws t and noise per image slot; returns (x0, x_t, t, model timesteps, noise), flat (B*M, ...).

  Row r's draws come from fold_in(rng, row_ids[r]) (its index in the global batch), so they do
  not depend on how the batch is split into micro-batches.
  """
  b, m = images.shape[:2]

  def draw(row_id):
    t_rng, n_rng = jax.random.split(jax.random.fold_in(rng, row_id))
    return (objective.sample_timesteps(t_rng, (m,)), jax.random.normal(n_rng, (m,) + images.shape[2:], jnp.float32))

  t, noise = jax.vmap(draw)(row_ids)
  flat = images.reshape((b * m,) + images.shape[2:]).astype(jnp.float32)
  t, noise = t.reshape(b * m), noise.reshape(flat.shape)
  x_t = objective.add_noise(flat, noise, t)
  return flat, x_t, t, objective.model_timesteps(t), noise


def diffusion_loss_sums(objective, model_out, x0, x_t, noise, t, image_mask):
  """Official per-image loss terms (mse + vb), summed over the image rows that are set.

  Divided by the number of image rows this is the official mean over image rows.
  """
  b, m = image_mask.shape
  out = model_out.reshape((b * m,) + model_out.shape[2:]).astype(jnp.float32)
  terms = objective.loss(out, x0, x_t, noise, t)
  mask = image_mask.reshape(-1).astype(jnp.float32)
  return {k: jnp.sum(v * mask) for k, v in terms.items()}


def batch_normalisers(batch: dict) -> dict:
  """The whole batch's counts the losses are means over (at least 1, so empty batches give 0)."""
  return {
      "lm_tokens": jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0),
      "images": jnp.maximum(jnp.sum(batch["image_mask"].astype(jnp.float32)), 1.0),
  }


def make_loss_fn(
    kind: str, model_config: ModelConfig, objective, diffusion_weight: float, lm_weight: float
) -> Callable:
  """loss_fn(params, batch, rng, norms, row_ids) -> (loss, aux metrics).

  `norms` are `batch_normalisers` of the whole (global) batch, `row_ids` the rows' indices in it.
  The loss and every aux value are additive over micro-batches: summed over a split of the batch
  they give the whole batch's values.
  """
  model = MonoFormer(model_config)

  def lm_terms(logits, batch, norms):
    total, count = lm_loss_sum(logits, batch["targets"], batch["loss_mask"])
    return total / norms["lm_tokens"], count

  def loss_fn(params, batch, rng, norms, row_ids):
    if kind in ("ar", "understand"):  # understanding rows: the LM loss on their answers
      # Weighted as in the mixed objective (w_lm * L_lm): with alternating steps the shared
      # parameters' Adam statistics see both objectives' gradients, and an unweighted LM
      # gradient (far larger than the diffusion one) would shrink every diffusion update.
      out = model.apply({"params": params}, batch, return_image=False)
      l_lm, count = lm_terms(out["logits"], batch, norms)
      if kind == "understand":
        return lm_weight * l_lm, {"loss_understand": l_lm, "answer_tokens": count}
      return lm_weight * l_lm, {"loss_lm": l_lm, "lm_tokens": count}
    x0, x_t, t, model_t, noise = _noisy_images(objective, batch["images"], rng, row_ids)
    b, m = batch["image_mask"].shape
    out = model.apply(
        {"params": params},
        batch,
        x_t.reshape(batch["images"].shape),
        model_t.reshape(b, m),
        return_logits=(kind == "mixed"),
    )
    sums = diffusion_loss_sums(objective, out["image"], x0, x_t, noise, t, batch["image_mask"])
    metrics = {
        (f"loss_diffusion_{k}" if k != "loss" else "loss_diffusion"): v / norms["images"] for k, v in sums.items()
    }
    loss = diffusion_weight * metrics["loss_diffusion"]
    if kind == "mixed":
      l_lm, count = lm_terms(out["logits"], batch, norms)
      metrics.update({"loss_lm": l_lm, "lm_tokens": count})
      loss = loss + lm_weight * l_lm
    metrics["images"] = jnp.sum(batch["image_mask"].astype(jnp.float32))
    return loss, metrics

  return loss_fn


def split_micro_batches(tree, n: int):
  """(B, ...) leaves -> (n, B // n, ...): micro-batch i holds rows i, i + n, i + 2n, ...

  Strided rather than contiguous: with the batch sharded over devices in contiguous blocks of
  B / (data x fsdp) rows (a multiple of n, as validate_config checks), every micro-batch keeps
  an equal share of rows on every device, so splitting moves no data between them.
  """
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1), tree)


def make_train_step(
    kind: str,
    model_config: ModelConfig,
    objective,
    optimizer,
    *,
    grad_accum_steps: int = 1,
    diffusion_weight: float = 1.0,
    lm_weight: float = 0.01,
    ema_decay_value: float = 0.9999,
    ema_warmup: bool = True,
    learning_rate_fn=None,
) -> Callable:
  if kind not in STEP_KINDS:
    raise ValueError(f"unknown step kind {kind!r}; one of {STEP_KINDS}")
  loss_fn = make_loss_fn(kind, model_config, objective, diffusion_weight, lm_weight)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    norms = batch_normalisers(batch)
    row_ids = jnp.arange(batch["tokens"].shape[0], dtype=jnp.int32)
    if grad_accum_steps == 1:
      (loss, aux), grads = grad_fn(state.params, batch, rng, norms, row_ids)
    else:
      micro = split_micro_batches((batch, row_ids), grad_accum_steps)

      def body(carry, xs):
        mb, ids = xs
        (l, a), g = grad_fn(state.params, mb, rng, norms, ids)
        return jax.tree.map(jnp.add, carry, (g, l, a)), None

      first = jax.tree.map(lambda x: x[0], micro)
      (loss_shape, aux_shape), grads_shape = jax.eval_shape(
          lambda: grad_fn(state.params, first[0], rng, norms, first[1])
      )
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads_shape, loss_shape, aux_shape))
      (grads, loss, aux), _ = jax.lax.scan(body, zeros, micro)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, ema_decay_value, ema_warmup)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=update_ema(state.ema_params, params, decay)
    )
    metrics = dict(aux, loss=loss, grad_norm=optax.global_norm(grads))
    if learning_rate_fn is not None:
      metrics["learning_rate"] = learning_rate_fn(state.step)
    return new_state, metrics

  return step


def train_step_from_config(kind: str, config, model_config: ModelConfig, objective, optimizer) -> Callable:
  """The step of `kind` with the loss weights, EMA and schedule of a run's config (what the
  trainer runs and tools.compile_for compiles)."""
  return make_train_step(
      kind,
      model_config,
      objective,
      optimizer,
      grad_accum_steps=config.optimizer.grad_accum_steps,
      diffusion_weight=config.loss.diffusion_weight,
      lm_weight=config.loss.understand_weight if kind == "understand" else config.loss.lm_weight,
      ema_decay_value=config.ema.decay,
      ema_warmup=config.ema.warmup,
      learning_rate_fn=state_lib.learning_rate_schedule(config.optimizer),
  )


def compile_step(step_fn, state_shardings, mesh, rules, example_batch: dict):
  """jit with explicit shardings and donation; AOT-compiles for the example batch's shapes."""
  batch_shardings = {k: sharding_lib.batch_sharding(mesh, v.ndim) for k, v in example_batch.items()}
  jitted = jax.jit(
      step_fn,
      in_shardings=(state_shardings, batch_shardings, sharding_lib.replicated(mesh)),
      out_shardings=(state_shardings, sharding_lib.replicated(mesh)),
      donate_argnums=(0,),
  )

  @functools.wraps(step_fn)
  def run(state, batch, rng):
    with mesh, nn.logical_axis_rules(rules):
      return jitted(state, batch, rng)

  run.jitted = jitted
  return run
