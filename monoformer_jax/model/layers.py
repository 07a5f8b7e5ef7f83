"""LLaMA decoder building blocks with logical axis names (Hugging Face numerics).

Parameter logical axes: 'vocab', 'embed', 'mlp', 'heads', 'kv_heads', 'head_dim', 'norm'.
Activation logical axes: 'activation_batch', 'activation_length', 'activation_embed',
'activation_heads', 'activation_kv_heads', 'activation_mlp', 'activation_vocab'. The configs map
both onto the mesh axes ('data', 'fsdp', 'tensor'); the model knows nothing of meshes.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax.model import attention
from monoformer_jax.model.config import ModelConfig

Array = jax.Array


def normal_init(stddev: float, axes):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def zeros_init(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def constrain(x: Array, axes) -> Array:
  return nn.with_logical_constraint(x, axes)


class Linear(nn.Module):
  """y = x . W over the last `in_dims` axes of x; W has shape in_shape + out_shape.

  The contraction runs as one 2-D matmul ((tokens, in) x (in, out)): XLA:CPU is 2-3x slower on
  dot_generals that contract or batch several axes (the weight gradient of a (B, L, H) input
  contracts two), and the reshape is free on every backend.
  """

  features: tuple
  in_dims: int
  kernel_axes: tuple
  dtype: jnp.dtype = jnp.float32
  stddev: float = 0.02

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[x.ndim - self.in_dims :]
    lead = x.shape[: x.ndim - self.in_dims]
    kernel = self.param(
        "kernel", normal_init(self.stddev, self.kernel_axes), in_shape + tuple(self.features), jnp.float32
    )
    n_in = int(np.prod(in_shape))
    n_out = int(np.prod(self.features))
    y = jnp.dot(x.reshape(-1, n_in).astype(self.dtype), kernel.reshape(n_in, n_out).astype(self.dtype))
    return y.reshape(lead + tuple(self.features))


class RMSNorm(nn.Module):
  """LLaMA RMSNorm: normalise in float32, cast back, then scale (the HF order)."""

  eps: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (x.shape[-1],), jnp.float32
    )
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype).reshape((1,) * (x.ndim - 1) + (-1,)) * x32.astype(self.dtype)


def rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """cos/sin of shape (B, L, head_dim) for the HF rotate-half convention, in float32."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq.reshape((1,) * positions.ndim + (-1,))
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x: (B, L, heads, D); cos/sin: (B, L, D). HF: x * cos + rotate_half(x) * sin."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def _write_cache(kv_cache: dict, k: Array, v: Array, index, layer):
  """Writes (B, KVH, L, D) keys/values into layer `layer` of the stacked cache at slot `index`;
  returns this layer's (B, KVH, S, D) buffers and the updated cache."""
  zero = jnp.zeros((), jnp.int32)
  at = (jnp.asarray(layer, jnp.int32), zero, zero, jnp.asarray(index, jnp.int32), zero)
  put = lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype)[None], at)  # noqa: E731
  new_cache = {"k": put(kv_cache["k"], k), "v": put(kv_cache["v"], v)}
  read = lambda buf: jax.lax.dynamic_index_in_dim(buf, layer, axis=0, keepdims=False)  # noqa: E731
  return read(new_cache["k"]), read(new_cache["v"]), new_cache


class Attention(nn.Module):
  """Grouped-query attention over an explicit boolean mask.

  With `kv_cache`, the new keys/values are written into the cache buffer at `cache_index` and the
  queries attend over the whole buffer (the mask says which buffer slots are visible).
  `kv_cache` holds every layer's buffer stacked, (L, B, KVH, S, D): layer `cache_layer` writes
  its slice in place and reads it as (B, KVH, S, D), the layout the attention matmuls take, so no
  step transposes it. Slicing one layer out and stacking them back would copy the whole cache
  at every decode step (~3x the per-token time at 1,024 slots on a CPU).
  """

  config: ModelConfig

  @nn.compact
  def __call__(
      self,
      x: Array,
      mask: Array,
      cos: Array,
      sin: Array,
      kv_cache: Optional[dict] = None,
      cache_index=None,
      cache_layer=None,
  ):
    cfg = self.config
    dtype = cfg.compute_dtype
    d, h, kvh = cfg.dim_per_head, cfg.num_heads, cfg.num_kv_heads
    init = cfg.initializer_range

    def proj(name, heads, axes):
      return Linear((heads, d), 1, ("embed", axes, "head_dim"), dtype, init, name=name)

    q = proj("q_proj", h, "heads")(x)
    k = proj("k_proj", kvh, "kv_heads")(x)
    v = proj("v_proj", kvh, "kv_heads")(x)
    q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
    k = constrain(k, ("activation_batch", "activation_length", "activation_kv_heads", None))
    v = constrain(v, ("activation_batch", "activation_length", "activation_kv_heads", None))
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)

    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, KVH, L, D)
    new_cache = None
    if kv_cache is not None:
      if cache_layer is None:
        raise ValueError("a kv_cache needs cache_layer: the cache holds every layer, stacked")
      kh, vh, new_cache = _write_cache(kv_cache, kh, vh, cache_index, cache_layer)
      kh, vh = kh.astype(dtype), vh.astype(dtype)

    out = attention.attend(q, kh, vh, mask, cfg.attention, cfg.attention_block)
    out = constrain(out, ("activation_batch", "activation_length", "activation_heads", None))
    out = Linear((cfg.hidden_size,), 2, ("heads", "head_dim", "embed"), dtype, init, name="o_proj")(out)
    return out, new_cache


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dtype = cfg.compute_dtype

    def dense(name, features, axes):
      return Linear((features,), 1, axes, dtype, cfg.initializer_range, name=name)

    gate = dense("gate_proj", cfg.intermediate_size, ("embed", "mlp"))(x)
    up = dense("up_proj", cfg.intermediate_size, ("embed", "mlp"))(x)
    hidden = constrain(nn.silu(gate) * up, ("activation_batch", "activation_length", "activation_mlp"))
    return dense("down_proj", cfg.hidden_size, ("mlp", "embed"))(hidden)


class DecoderLayer(nn.Module):
  """Pre-norm LLaMA block: (x, cache) -> (x, cache), the cache every layer's, stacked, and
  `cache_layer` this layer's index in it (see Attention). Under nn.scan with a cache the carry is
  (x, stacked cache, layer index) and the block returns ((x, cache, index + 1), None)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, kv_cache, mask: Array, cos: Array, sin: Array, cache_index, cache_layer=None):
    if isinstance(x, tuple):  # scanned over layers with the stacked cache in the carry
      x, stacked, layer = x
      x, stacked = self.block(x, stacked, mask, cos, sin, cache_index, layer)
      return (x, stacked, layer + 1), None
    return self.block(x, kv_cache, mask, cos, sin, cache_index, cache_layer)

  def block(self, x, kv_cache, mask, cos, sin, cache_index, cache_layer):
    cfg = self.config
    dtype = cfg.compute_dtype
    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    h = RMSNorm(cfg.rms_norm_eps, dtype, name="input_layernorm")(x)
    attn, new_cache = Attention(cfg, name="self_attn")(h, mask, cos, sin, kv_cache, cache_index, cache_layer)
    x = x + attn
    h = RMSNorm(cfg.rms_norm_eps, dtype, name="post_attention_layernorm")(x)
    x = x + MLP(cfg, name="mlp")(h)
    return x, new_cache
