"""Per-sample random streams: a sample's noise depends only on (rng, its global index[, step]).

Deriving keys by `fold_in` of the sample index (instead of splitting one key over the batch)
makes every sample independent of batch size, host count and of where it sits in the batch.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def sample_keys(rng: jax.Array, sample_ids: jax.Array) -> jax.Array:
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.asarray(sample_ids, jnp.int32))


def sample_noise(rng: jax.Array, sample_ids: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """N(0, 1) noise of shape (len(sample_ids), *shape): row n from fold_in(rng, sample_ids[n]).

  `shape` is the shape of ONE sample, e.g. (H, W, C).
  """
  keys = sample_keys(rng, sample_ids)
  return jax.vmap(lambda k: jax.random.normal(k, tuple(shape), dtype))(keys)


def step_noise(rng: jax.Array, sample_ids: jax.Array, step, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Noise of sampler step `step` (may be traced): fold_in(fold_in(rng, sample_id), step)."""
  keys = sample_keys(rng, sample_ids)
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), tuple(shape), dtype))(keys)


def per_sample_noise_fn(rng: jax.Array, sample_ids: jax.Array | None, batch: int):
  """noise_fn(step, x) for the samplers, using per-sample streams (ids default to 0..B-1)."""
  ids = jnp.arange(batch, dtype=jnp.int32) if sample_ids is None else jnp.asarray(sample_ids, jnp.int32)
  if ids.shape != (batch,):
    raise ValueError(f"sample_ids must have shape ({batch},), got {ids.shape}")

  def noise_fn(step, x):
    return step_noise(rng, ids, step, x.shape[1:], x.dtype)

  return noise_fn
