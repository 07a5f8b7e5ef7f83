"""MonoFormer: one LLaMA decoder for next-token prediction and for denoising image tokens.

`MonoFormer.apply({'params': params}, batch, images, timesteps, ...)` returns
  logits  (B, L, V) float32 next-token logits      (when return_logits)
  image   (B, M, H, W, C_out) denoiser output       (when images are given and return_image)
  cache   the updated key/value cache               (when a cache is passed)
The diffusion head runs on the image tokens only, and the LM head is skipped entirely for image-only
work (return_logits=False), which the official code cannot do.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax import batch as batch_lib
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.image import (FinalLayer, TimestepEmbedder, patchify, sincos_pos_embed_2d, unpatchify)
from monoformer_jax.model.layers import (DecoderLayer, Linear, RMSNorm, constrain, normal_init, rope_tables, zeros_init)
from monoformer_jax.model import attention
from monoformer_jax.model.mask import attention_mask, kernel_spans, token_meta

Array = jax.Array

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _gather_tokens(values: Array, index: Array) -> Array:
  """values (B, N, D), index (B, L) -> (B, L, D)."""
  return jnp.take_along_axis(values, index[..., None], axis=1)


def _at_input_tokens(x: Array, values: Array, kinds: Array, patch_index: Array) -> Array:
  """x with its KIND_INPUT_IMAGE tokens replaced by `values` (B, K * Q, D), token i of input
  slot k (patch_index k * Q + i) taking row k * Q + i."""
  is_input = (kinds == batch_lib.KIND_INPUT_IMAGE)[..., None]
  index = jnp.where(is_input[..., 0], patch_index, 0)
  return jnp.where(is_input, _gather_tokens(values, index).astype(x.dtype), x)


def _per_slot(values: Array, slot: Array) -> Array:
  """values (B, M, D) per image slot, slot (B, L) -> (B, L, D); a broadcast when M == 1."""
  if values.shape[1] == 1:
    return jnp.broadcast_to(values, (values.shape[0], slot.shape[1], values.shape[2]))
  return _gather_tokens(values, slot)


def _patch_positions(kinds: Array, patch_index: Array, num_slots: int) -> Array:
  """(B, num_slots): where in the sequence each image patch sits (0 for slots that are absent)."""
  seq = jnp.broadcast_to(jnp.arange(kinds.shape[1], dtype=jnp.int32), kinds.shape)
  target = jnp.where(kinds == batch_lib.KIND_IMAGE, patch_index, num_slots)  # num_slots: dropped

  def one_row(t, s):
    return jnp.zeros((num_slots,), jnp.int32).at[t].set(s, mode="drop")

  return jax.vmap(one_row)(target, seq)


class MonoFormer(nn.Module):
  config: ModelConfig

  def _decoder_stack(self, x, mask, cos, sin, layer_caches, cache_index):
    cfg = self.config
    layer_cls = DecoderLayer
    if cfg.remat != "none":
      layer_cls = nn.remat(DecoderLayer, prevent_cse=not cfg.scan_layers, policy=_REMAT_POLICIES[cfg.remat])
    if cfg.scan_layers:
      stack = nn.scan(
          layer_cls,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(nn.broadcast,) * 5,
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )
      if layer_caches is None:
        x, _ = stack(cfg, name="layers")(x, None, mask, cos, sin, cache_index)
        return x, None
      # The stacked cache and the layer index ride in the carry, so each layer writes its slice
      # in place (as scan inputs/outputs the cache would be sliced and restacked every step).
      (x, layer_caches, _), _ = stack(cfg, name="layers")(
          (x, layer_caches, jnp.zeros((), jnp.int32)), None, mask, cos, sin, cache_index
      )
      return x, layer_caches
    # Unrolled layers pass the stacked cache along and each writes its own slice in place
    # (slicing layers out and stacking them back would copy the whole cache per decode step).
    for i in range(cfg.num_layers):
      if i == 0:
        self.sow("intermediates", "layer0_input", x)
      x, layer_caches = layer_cls(cfg, name=f"layers_{i}")(
          x, layer_caches, mask, cos, sin, cache_index, None if layer_caches is None else i
      )
      self.sow("intermediates", f"layer{i}_output", x)
    return x, layer_caches

  def _embed_input_images(self, x, features, kinds, patch_index):
    """The official `im_embedder` (Linear, GELU, Linear) on input-image features (B, K, Q, D),
    placed at the KIND_INPUT_IMAGE tokens; returns (x, Q)."""
    cfg = self.config
    b, k, q, d = self._check_input_features(features)
    h = nn.Dense(
        cfg.hidden_size,
        param_dtype=jnp.float32,
        dtype=cfg.compute_dtype,
        name="im_embedder_fc1",
        kernel_init=normal_init(0.02, ("patch", "embed")),
        bias_init=zeros_init(("embed",)),
    )(features.reshape(b, k * q, d))
    h = nn.Dense(
        cfg.hidden_size,
        param_dtype=jnp.float32,
        dtype=cfg.compute_dtype,
        name="im_embedder_fc2",
        kernel_init=normal_init(0.02, ("embed", "embed_out")),
        bias_init=zeros_init(("embed_out",)),
    )(nn.gelu(h, approximate=False))
    return _at_input_tokens(x, h, kinds, patch_index), q

  def _check_input_features(self, features):
    cfg = self.config
    if not cfg.input_feature_dim:
      raise ValueError("the batch holds input_features but model.input_feature_dim is 0")
    d = features.shape[-1]
    if d != cfg.input_feature_dim:
      raise ValueError(f"input_features have width {d}, model.input_feature_dim is {cfg.input_feature_dim}")
    return features.shape

  @nn.compact
  def __call__(
      self,
      batch: dict,
      images: Optional[Array] = None,
      timesteps: Optional[Array] = None,
      *,
      cache: Optional[dict] = None,
      cache_index=0,
      return_logits: bool = True,
      return_image: bool = True,
  ) -> dict:
    cfg = self.config
    dtype = cfg.compute_dtype
    hidden = cfg.hidden_size
    num_patches = cfg.num_patches
    tokens, kinds = batch["tokens"], batch["kinds"]
    patch_index = batch["patch_index"]
    b, l = tokens.shape

    embed = nn.Embed(
        cfg.vocab_size,
        hidden,
        param_dtype=jnp.float32,
        dtype=dtype,
        embedding_init=normal_init(cfg.initializer_range, ("vocab", "embed")),
        name="embed_tokens",
    )
    x = embed(tokens)
    # The generation path's modules, shared by generated images and (input_embedder='x_embedder')
    # read ones; a module creates its parameters on first use.
    t_embedder = TimestepEmbedder(cfg, name="t_embedder")
    label_embedder = nn.Embed(
        cfg.num_classes + 1,
        hidden,
        param_dtype=jnp.float32,
        embedding_init=normal_init(0.02, ("classes", "embed")),
        name="label_embedder",
    )
    x_embedder = nn.Dense(
        hidden,
        param_dtype=jnp.float32,
        dtype=dtype,
        name="x_embedder",
        kernel_init=zeros_init(("patch", "embed")),
        bias_init=zeros_init(("embed",)),
    )
    adaln_module = nn.Dense(
        2 * hidden,
        param_dtype=jnp.float32,
        name="adaln_module",
        kernel_init=zeros_init(("embed", "cond")),
        bias_init=zeros_init(("cond",)),
    )

    def condition(t, labels):
      cond = t_embedder(t)  # (B, M, hidden), float32
      return cond + label_embedder(labels) if cfg.num_classes else cond

    def position_and_modulate(x, is_image, slot, cond):
      """The 2-D position embedding and the adaLN of `cond` on the image tokens `is_image`."""
      if cfg.use_pos_embed:
        table = jnp.asarray(sincos_pos_embed_2d(hidden, *cfg.grid_size))
        pos = jnp.take(table, patch_index % num_patches, axis=0)
        x = x + jnp.where(is_image, pos, 0).astype(dtype)
      if cfg.t_embed == "adaln_before_decoder":
        c = adaln_module(nn.silu(cond))
        self.sow("intermediates", "c_embeds", c)
        c_tok = _per_slot(c, slot)
        # The official code names the first chunk "scale" but adds it: port by position.
        modulated = x.astype(jnp.float32) * (1 + c_tok[..., hidden:]) + c_tok[..., :hidden]
        x = jnp.where(is_image, modulated.astype(dtype), x)
      return x

    input_tokens = 1
    if "input_features" in batch:
      if cfg.input_embedder == "im_embedder":
        x, input_tokens = self._embed_input_images(x, batch["input_features"], kinds, patch_index)
      else:  # read as a clean image (t = 0, the null class) through the generation path
        _, k, input_tokens, _ = self._check_input_features(batch["input_features"])
        if input_tokens != num_patches:
          raise ValueError(
              f"input_embedder='x_embedder' reads images of the model's own shape ({num_patches} patches), "
              f"got {input_tokens} patches an image"
          )
        emb = x_embedder(batch["input_features"].reshape(b, k * input_tokens, -1).astype(jnp.float32))
        x = _at_input_tokens(x, emb, kinds, patch_index)
        cond = condition(jnp.zeros((b, k), jnp.int32), jnp.full((b, k), cfg.num_classes, jnp.int32))
        is_input = (kinds == batch_lib.KIND_INPUT_IMAGE)[..., None]
        x = position_and_modulate(x, is_input, jnp.where(is_input[..., 0], patch_index, 0) // num_patches, cond)

    cond = None
    if images is not None:
      if timesteps is None:
        raise ValueError("images were given without timesteps")
      m = images.shape[1]
      if images.shape[2:] != (cfg.image_height, cfg.image_width, cfg.image_channels):
        raise ValueError(
            f"images have shape {images.shape[2:]} per slot, the model expects "
            f"{(cfg.image_height, cfg.image_width, cfg.image_channels)}"
        )
      cond = condition(timesteps, batch["labels"])
      self.sow("intermediates", "t_emb", cond)
      patches = patchify(images.astype(jnp.float32), cfg.patch_size).reshape(b, m * num_patches, -1)
      patch_emb = x_embedder(patches)
      is_image = (kinds == batch_lib.KIND_IMAGE)[..., None]
      x = jnp.where(is_image, _gather_tokens(patch_emb, patch_index).astype(dtype), x)
      slot = patch_index // num_patches  # image slot of image tokens and t-tokens
      if cfg.has_t_token:
        t_tok = nn.Dense(
            hidden,
            param_dtype=jnp.float32,
            name="t_projector_fc1",
            kernel_init=normal_init(0.02, ("embed", "embed_out")),
            bias_init=zeros_init(("embed_out",)),
        )(cond)
        t_tok = nn.Dense(
            hidden,
            param_dtype=jnp.float32,
            name="t_projector_fc2",
            kernel_init=zeros_init(("embed", "embed_out")),
            bias_init=zeros_init(("embed_out",)),
        )(nn.gelu(t_tok, approximate=False))
        self.sow("intermediates", "c_embeds", t_tok)
        is_t = (kinds == batch_lib.KIND_T_TOKEN)[..., None]
        x = jnp.where(is_t, _per_slot(t_tok, slot).astype(dtype), x)
      self.sow("intermediates", "merged_embeds", x)
      x = position_and_modulate(x, is_image, slot, cond)

    x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))
    cos, sin = rope_tables(batch["positions"], cfg.dim_per_head, cfg.rope_theta)

    order = jnp.broadcast_to(cache_index + jnp.arange(l, dtype=jnp.int32), (b, l))
    q_meta = token_meta(
        batch["segment_ids"],
        kinds,
        patch_index,
        num_patches,
        order,
        input_tokens=input_tokens,
        bidirectional_input=cfg.bidirectional_input_image,
    )
    new_cache = None
    layer_caches = None
    if cache is None:
      k_meta = q_meta
    else:
      k_meta = {
          key: jax.lax.dynamic_update_slice_in_dim(cache["meta"][key], q_meta[key], cache_index, 1)
          for key in ("segment_ids", "image_id")
      }
      size = cache["meta"]["segment_ids"].shape[1]
      k_meta["order"] = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (b, size))
      layer_caches = cache["layers"]
    k_len = l if cache is None else cache["meta"]["segment_ids"].shape[1]
    if attention.resolve(cfg.attention, dtype, cfg.dim_per_head, l, k_len) == "pallas":
      mask = kernel_spans(q_meta, k_meta, cfg.bidirectional_image)  # the kernel builds its tiles
    else:
      mask = attention_mask(q_meta, k_meta, cfg.bidirectional_image)

    x, new_layer_caches = self._decoder_stack(x, mask, cos, sin, layer_caches, cache_index)
    if cache is not None:
      new_cache = {
          "layers": new_layer_caches,
          "meta": {"segment_ids": k_meta["segment_ids"], "image_id": k_meta["image_id"]},
      }

    x = RMSNorm(cfg.rms_norm_eps, dtype, name="norm")(x)
    self.sow("intermediates", "final_hidden", x)
    out = {}
    if cache is not None:
      out["cache"] = new_cache
    if return_logits:
      logits = Linear((cfg.vocab_size,), 1, ("embed", "vocab"), dtype, cfg.initializer_range, name="lm_head")(x)
      out["logits"] = constrain(
          logits.astype(jnp.float32), ("activation_batch", "activation_length", "activation_vocab")
      )
    if images is not None and return_image:
      m = images.shape[1]
      where = _patch_positions(kinds, patch_index, m * num_patches)
      h_img = _gather_tokens(x, where).reshape(b, m, num_patches, hidden)
      # One modulation per image, broadcast over its patches (not one per token).
      y = FinalLayer(cfg, name="final_layer")(h_img, cond[:, :, None, :])
      self.sow("intermediates", "final_layer_out", y.reshape(b, m * num_patches, -1))
      out["image"] = unpatchify(y, cfg.patch_size, cfg.image_height, cfg.image_width)
    return out


def dummy_batch(
    config: ModelConfig, batch_size: int = 1, seq_len: Optional[int] = None, num_image_slots: int = 1
) -> tuple[dict, np.ndarray, np.ndarray]:
  """A minimal well-formed batch (one image sample per row), for init and shape inference."""
  n = config.num_patches + int(config.has_t_token)
  seq_len = seq_len or n + 4
  shape = (config.image_height, config.image_width, config.image_channels)
  batch = batch_lib.empty_batch(batch_size, seq_len, num_image_slots, shape)
  for r in range(batch_size):
    rb = batch_lib.RowBuilder(batch, r, config.num_patches, config.has_t_token)
    rb.add([("text", [1, 2], True), ("image", np.zeros(shape, np.float32), 0), ("text", [2], True)])
  if config.input_feature_dim and config.input_embedder == "im_embedder":  # creates its parameters
    batch["input_features"] = np.zeros((batch_size, 1, 1, config.input_feature_dim), np.float32)
  timesteps = np.zeros((batch_size, num_image_slots), np.float32)
  return batch, batch["images"], timesteps


def init_params(config: ModelConfig, rng: Array) -> dict:
  """Fresh parameters (boxed with their logical axis names; see nn.unbox / nn.get_partition_spec)."""
  batch, images, timesteps = dummy_batch(config)
  model = MonoFormer(config)
  return model.init(rng, batch, images, timesteps)["params"]
