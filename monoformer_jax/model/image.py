"""MonoFormer's image path: patch (un)folding, where image tokens sit in the sequence, 2-D
positions, timestep embedder, diffusion head.

The official code flattens a patch in (C, ph, pw) order on the way in and reads the output in
(ph, pw, C) order (as DiT does); the two orders differ and both are reproduced here.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax import batch as batch_lib
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.layers import normal_init, zeros_init

Array = jax.Array


def patchify(images: Array, patch: int) -> Array:
  """(..., H, W, C) -> (..., H/p * W/p, C*p*p), raster token order, feature = c*p*p + ph*p + pw."""
  *lead, h, w, c = images.shape
  x = images.reshape(*lead, h // patch, patch, w // patch, patch, c)
  n = len(lead)
  # (..., hp, ph, wp, pw, c) -> (..., hp, wp, c, ph, pw)
  x = jnp.transpose(x, (*range(n), n, n + 2, n + 4, n + 1, n + 3))
  return x.reshape(*lead, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: Array, patch: int, height: int, width: int) -> Array:
  """(..., H/p * W/p, p*p*C) in (ph, pw, C) feature order -> (..., H, W, C)."""
  *lead, _, f = tokens.shape
  c = f // (patch * patch)
  hp, wp = height // patch, width // patch
  x = tokens.reshape(*lead, hp, wp, patch, patch, c)
  n = len(lead)
  # (..., hp, wp, ph, pw, c) -> (..., hp, ph, wp, pw, c)
  x = jnp.transpose(x, (*range(n), n, n + 2, n + 1, n + 3, n + 4))
  return x.reshape(*lead, height, width, c)


def gather_tokens(values: Array, index: Array) -> Array:
  """values (B, N, D), index (B, L) -> (B, L, D)."""
  return jnp.take_along_axis(values, index[..., None], axis=1)


def place_input_tokens(x: Array, values: Array, kinds: Array, patch_index: Array) -> Array:
  """x with its KIND_INPUT_IMAGE tokens replaced by `values` (B, K * Q, D), token i of input
  slot k (patch_index k * Q + i) taking row k * Q + i."""
  is_input = (kinds == batch_lib.KIND_INPUT_IMAGE)[..., None]
  index = jnp.where(is_input[..., 0], patch_index, 0)
  return jnp.where(is_input, gather_tokens(values, index).astype(x.dtype), x)


def image_token_positions(kinds: Array, patch_index: Array, num_slots: int) -> Array:
  """(B, num_slots): where in the sequence each generated-image patch sits (0 for absent ones)."""
  seq = jnp.broadcast_to(jnp.arange(kinds.shape[1], dtype=jnp.int32), kinds.shape)
  target = jnp.where(kinds == batch_lib.KIND_IMAGE, patch_index, num_slots)  # num_slots: dropped

  def one_row(t, s):
    return jnp.zeros((num_slots,), jnp.int32).at[t].set(s, mode="drop")

  return jax.vmap(one_row)(target, seq)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """The MAE/DiT 2-D table, (grid_h * grid_w, dim), float32, raster order.

  The first half of the features encodes the column index, the second half the row index (the
  reference builds its grid with meshgrid(w, h)).
  """
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
  emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
  return emb.astype(np.float32)


def add_position_embedding(x: Array, is_image: Array, patch_index: Array, config: ModelConfig) -> Array:
  """x plus the 2-D table's row of each image token (`is_image` (B, L, 1)); patch_index modulo
  the patches of an image is the token's place in its image."""
  table = jnp.asarray(sincos_pos_embed_2d(config.hidden_size, *config.grid_size))
  pos = jnp.take(table, patch_index % config.num_patches, axis=0)
  return x + jnp.where(is_image, pos, 0).astype(config.compute_dtype)


def timestep_frequencies(t: Array, dim: int, max_period: float = 10000.0) -> Array:
  """[cos(t f), sin(t f)] with f = exp(-ln(max_period) * k / (dim/2)) (cos first, as the official)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[..., None] * freqs.reshape((1,) * t.ndim + (half,))
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimestepEmbedder(nn.Module):
  """Sinusoid (256) -> Linear -> SiLU -> Linear(hidden). Init N(0, 0.02)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, t: Array) -> Array:
    cfg = self.config
    x = timestep_frequencies(t, cfg.timestep_freq_dim)
    x = nn.Dense(
        cfg.hidden_size,
        param_dtype=jnp.float32,
        name="fc1",
        kernel_init=normal_init(0.02, ("freq", "embed")),
        bias_init=zeros_init(("embed",)),
    )(x)
    x = nn.silu(x)
    return nn.Dense(
        cfg.hidden_size,
        param_dtype=jnp.float32,
        name="fc2",
        kernel_init=normal_init(0.02, ("embed", "embed_out")),
        bias_init=zeros_init(("embed_out",)),
    )(x)


class FinalLayer(nn.Module):
  """Diffusion head: LayerNorm (no affine, eps 1e-6) -> adaLN (shift, scale) -> Linear.

  MonoFormer initialises the output Linear N(0, 0.02) with zero bias (DiT zero-initialises it) and
  the adaLN Linear with zeros.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, cond: Array) -> Array:
    """x: (..., N, hidden) image-token states; cond: (..., N or 1, hidden) conditioning vectors
    (one per image, broadcast over its N patches, is the cheap way)."""
    cfg = self.config
    mod = nn.Dense(
        2 * cfg.hidden_size,
        param_dtype=jnp.float32,
        name="adaln_modulation",
        kernel_init=zeros_init(("embed", "cond")),
        bias_init=zeros_init(("cond",)),
    )(nn.silu(cond.astype(jnp.float32)))
    shift, scale = jnp.split(mod, 2, axis=-1)
    x = nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=jnp.float32)(x.astype(jnp.float32))
    x = x * (1 + scale) + shift
    out_features = cfg.patch_size * cfg.patch_size * cfg.output_channels
    return nn.Dense(
        out_features,
        param_dtype=jnp.float32,
        name="linear",
        kernel_init=normal_init(0.02, ("embed", "patch_out")),
        bias_init=zeros_init(("patch_out",)),
    )(x)
