"""The decoder stack: RoPE tables, the LLaMA layers (unrolled, or one scanned body), the final norm.

`model.scan_layers` traces one layer and scans it (compile time flat in depth, parameters stacked
under `layers`); otherwise the layers are unrolled (`layers_0`, `layers_1`, ...: the official
checkpoint's layout). `model.remat` recomputes each layer's activations in the backward pass.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.layers import DecoderLayer, RMSNorm, rope_tables

Array = jax.Array

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Decoder(nn.Module):
  """layers / layers_i and norm (the official names).

  MonoFormer shares its scope with this module (nn.share_scope): the parameters and the
  intermediates sown here (layer0_input, layer{i}_output, final_hidden) keep their top-level names.
  """

  config: ModelConfig

  @nn.compact
  def __call__(
      self, x: Array, positions: Array, mask, layer_caches: Optional[dict], cache_index
  ) -> tuple[Array, Optional[dict]]:
    """x (B, L, hidden) at `positions` (B, L) through every layer and the final norm; the layers
    write their keys/values into `layer_caches` (every layer's, stacked) at `cache_index`."""
    cfg = self.config
    cos, sin = rope_tables(positions, cfg.dim_per_head, cfg.rope_theta)
    layer = DecoderLayer
    if cfg.remat != "none":
      layer = nn.remat(DecoderLayer, prevent_cse=not cfg.scan_layers, policy=_REMAT_POLICIES[cfg.remat])
    run = self._scanned if cfg.scan_layers else self._unrolled
    x, layer_caches = run(layer, x, (mask, cos, sin), layer_caches, cache_index)
    x = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="norm")(x)
    self.sow("intermediates", "final_hidden", x)
    return x, layer_caches

  def _scanned(self, layer, x, attention_inputs, layer_caches, cache_index):
    stack = nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * 5,
        length=self.config.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(self.config, name="layers")
    if layer_caches is None:
      x, _ = stack(x, None, *attention_inputs, cache_index)
      return x, None
    # The stacked cache and the layer index ride in the carry, so each layer writes its slice
    # in place (as scan inputs/outputs the cache would be sliced and restacked every step).
    (x, layer_caches, _), _ = stack((x, layer_caches, jnp.zeros((), jnp.int32)), None, *attention_inputs, cache_index)
    return x, layer_caches

  def _unrolled(self, layer, x, attention_inputs, layer_caches, cache_index):
    # The layers pass the stacked cache along and each writes its own slice in place (slicing
    # layers out and stacking them back would copy the whole cache per decode step).
    for i in range(self.config.num_layers):
      if i == 0:
        self.sow("intermediates", "layer0_input", x)
      x, layer_caches = layer(self.config, name=f"layers_{i}")(
          x, layer_caches, *attention_inputs, cache_index, None if layer_caches is None else i
      )
      self.sow("intermediates", f"layer{i}_output", x)
    return x, layer_caches
