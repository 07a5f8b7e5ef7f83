"""Train state (params, optimizer, EMA) created already sharded, and the optimizer itself."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.monoformer import init_params
from monoformer_jax.run import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any


def learning_rate_schedule(opt) -> optax.Schedule:
  """Linear warm-up, then constant or cosine decay to `final_lr_fraction` x lr."""
  warmup = int(opt.warmup_steps)
  if opt.schedule == "constant":
    after = optax.constant_schedule(opt.learning_rate)
  elif opt.schedule == "cosine":
    after = optax.cosine_decay_schedule(
        opt.learning_rate, max(int(opt.decay_steps) - warmup, 1), alpha=opt.final_lr_fraction
    )
  else:
    raise ValueError(f"optimizer.schedule={opt.schedule!r}: use 'constant' or 'cosine'")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, opt.learning_rate, warmup), after], [warmup])


def make_optimizer(opt) -> optax.GradientTransformation:
  """AdamW with global-norm clipping (official: lr 1e-4 constant, wd 0, clip 2.0)."""
  return optax.chain(
      optax.clip_by_global_norm(opt.grad_clip) if opt.grad_clip > 0 else optax.identity(),
      optax.adamw(learning_rate_schedule(opt), b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay),
  )


def ema_decay(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
  """EMA decay at `step` (the step being completed, from 0).

  The official 0.9999 from step 0 keeps the EMA at the initial weights for ~10k steps; with
  `warmup` the decay ramps as min(decay, (1 + n) / (10 + n)), so short runs get a useful EMA.
  """
  step = step.astype(jnp.float32)
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def update_ema(ema, params, decay: jax.Array):
  return jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema, params)


def abstract_boxed_params(model_config: ModelConfig):
  return jax.eval_shape(lambda: init_params(model_config, jax.random.key(0)))


def state_shardings(model_config: ModelConfig, optimizer, mesh, rules):
  """(abstract TrainState, its NamedShardings) without allocating anything."""
  boxed = abstract_boxed_params(model_config)
  param_shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
  abstract_params = nn.unbox(boxed)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  # Optimizer moments mirror the params' shardings; scalars (counts) are replicated.
  opt_shardings = _mirror_shardings(abstract_opt, abstract_params, param_shardings, mesh)
  abstract = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32),
      params=abstract_params,
      opt_state=abstract_opt,
      ema_params=abstract_params,
  )
  shardings = TrainState(
      step=sharding_lib.replicated(mesh), params=param_shardings, opt_state=opt_shardings, ema_params=param_shardings
  )
  return abstract, shardings


def _mirror_shardings(abstract_opt, abstract_params, param_shardings, mesh):
  param_struct = jax.tree.structure(abstract_params)

  def assign(sub):
    if jax.tree.structure(sub) == param_struct:
      return param_shardings
    return None

  # optax states are nested tuples/namedtuples; any subtree shaped like the params mirrors them.
  def walk(node):
    got = assign(node)
    if got is not None:
      return got
    if isinstance(node, jax.ShapeDtypeStruct):
      return sharding_lib.replicated(mesh)
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      return type(node)(*[walk(c) for c in node])
    if isinstance(node, (tuple, list)):
      return type(node)(walk(c) for c in node)
    if isinstance(node, dict):
      return {k: walk(v) for k, v in node.items()}
    if node is None or isinstance(node, optax.EmptyState):
      return node
    raise TypeError(f"unexpected optimizer state node {type(node)}")

  return walk(abstract_opt)


def create_train_state(
    model_config: ModelConfig, optimizer, rng, mesh, rules, init_params_fn: Optional[Callable] = None
):
  """Initialises params, optimizer state and EMA directly into their shardings.

  `init_params_fn(rng) -> params` overrides the fresh initialisation (e.g. a converted
  checkpoint); it runs inside the same jit, so weights land sharded.
  """
  abstract, shardings = state_shardings(model_config, optimizer, mesh, rules)

  def init(rng):
    params = nn.unbox(init_params(model_config, rng)) if init_params_fn is None else init_params_fn(rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), ema_params=params)

  with mesh, nn.logical_axis_rules(rules):
    state = jax.jit(init, out_shardings=shardings)(rng)
  return state, abstract, shardings


def place_params(params_host, shardings):
  """Host params (e.g. converted from a checkpoint) -> device arrays in their shardings."""
  return jax.tree.map(jax.device_put, params_host, shardings)
