"""The key/value cache of the shared transformer, with logical axis names for sharding.

Layout (what `MonoFormer.apply(..., cache=..., cache_index=...)` reads and writes):

    {'layers': {'k': (num_layers, B, KVH, S, D), 'v': same},
     'meta':   {'segment_ids': (B, S), 'image_id': (B, S)}}

A slot with segment id 0 is empty (or padding) and invisible to every query, so one buffer of a
static size S serves prompts of different lengths and tokens written at a shared index.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from monoformer_jax.model.config import ModelConfig
from monoformer_jax.run.sharding import fit_spec

# Logical axes of the cache leaves; the config's rules map them to mesh axes (the batch over
# data x fsdp, the key/value heads over tensor, like the activations that fill them).
KV_AXES = ("layers", "activation_batch", "activation_kv_heads", "activation_length", None)
META_AXES = ("activation_batch", "activation_length")


def cache_logical_axes() -> dict:
  return {"layers": {"k": KV_AXES, "v": KV_AXES}, "meta": {"segment_ids": META_AXES, "image_id": META_AXES}}


def cache_shardings(config: ModelConfig, batch: int, size: int, mesh: Mesh, rules) -> dict:
  """NamedShardings of a (batch, size) cache on `mesh` under logical axis `rules`."""
  shapes = jax.eval_shape(lambda: init_cache(config, batch, size))
  axes = cache_logical_axes()
  return jax.tree.map(
      lambda s, a: NamedSharding(mesh, fit_spec(nn.logical_to_mesh_axes(a, rules), s.shape, mesh, "kv cache")),
      shapes,
      axes,
      is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(e, (str, type(None))) for e in x),
  )


def init_cache(config: ModelConfig, batch: int, size: int, dtype: Optional[str] = None) -> dict:
  """An empty cache: every slot invisible (segment 0), image_id -1."""
  dtype = jnp.dtype(dtype or config.dtype)
  kv_shape = (config.num_layers, batch, config.num_kv_heads, size, config.dim_per_head)
  return {
      "layers": {"k": jnp.zeros(kv_shape, dtype), "v": jnp.zeros(kv_shape, dtype)},
      "meta": {"segment_ids": jnp.zeros((batch, size), jnp.int32), "image_id": jnp.full((batch, size), -1, jnp.int32)},
  }


def constrain_cache(cache: dict) -> dict:
  """Pins the cache to its logical sharding inside jit (a no-op without axis rules)."""
  axes = cache_logical_axes()
  return {
      "layers": {k: nn.with_logical_constraint(cache["layers"][k], axes["layers"][k]) for k in ("k", "v")},
      "meta": {k: nn.with_logical_constraint(cache["meta"][k], axes["meta"][k]) for k in ("segment_ids", "image_id")},
  }
