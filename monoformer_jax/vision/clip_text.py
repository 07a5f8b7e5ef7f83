"""CLIP's text transformer in Flax Linen, with `transformers`' CLIPTextModel architecture and numerics.

    hidden, pooled = clip_text_outputs(params, config, ids_BxT)     # (B, T, D), (B, D)

Token + learned position embeddings, the vision tower's pre-norm encoder layers (vision/clip.py)
with a causal mask, a final layer norm; the pooled output is the hidden state at each row's
first end-of-text token (transformers' rule; configs whose eos_token_id is 2, written before
transformers fixed that field, pool at the largest id, which is end-of-text in CLIP's
vocabulary). Rows may be padded after their end-of-text token: the mask is causal, so padding
changes nothing before it. Parameters as the vision tower's (float32, logical axis names, the
encoder layers stacked under nn.scan).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from monoformer_jax.vision.clip import Encoder, LayerNorm, _param, check_tower

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The fields of transformers' CLIPTextConfig that the tower uses (defaults: transformers')."""

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  pad_token_id: int = 1
  dtype: str = "float32"  # matmul dtype; not a transformers field

  def __post_init__(self):
    check_tower(self)
    if min(self.vocab_size, self.hidden_size, self.intermediate_size, self.max_position_embeddings) <= 0:
      raise ValueError(f"non-positive sizes in {self}")

  @classmethod
  def from_transformers(cls, fields: Mapping, **overrides) -> CLIPTextConfig:
    """From a CLIPTextConfig's config.json fields, or a whole CLIPConfig's (its `text_config`)."""
    if "text_config" in fields or fields.get("model_type") == "clip":
      fields = fields.get("text_config") or {}
    kind = fields.get("model_type", "clip_text_model")
    if kind not in ("clip_text_model", "clip"):
      raise ValueError(f"model_type {kind!r} is not a CLIP text model (clip_text_model or clip)")
    cast = {"int": int, "float": float, "str": str}
    types = {f.name: cast[f.type] for f in dataclasses.fields(cls) if f.name != "dtype"}
    eos = fields.get("eos_token_id")
    if isinstance(eos, list):  # transformers allows several; CLIP's end-of-text is the first
      fields = {**fields, "eos_token_id": eos[0]}
    return cls(**{k: types[k](fields[k]) for k in types if fields.get(k) is not None}, **overrides)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


class TextEmbeddings(nn.Module):
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, ids_BxT: Array) -> Array:
    cfg = self.config
    d = cfg.hidden_size
    tokens = _param(self, "token_embedding", nn.initializers.normal(0.02), ("vocab", "embed"), (cfg.vocab_size, d))
    positions = _param(
        self,
        "position_embedding",
        nn.initializers.normal(0.01),
        ("positions", "embed"),
        (cfg.max_position_embeddings, d),
    )
    return jnp.take(tokens, ids_BxT, axis=0) + positions[None, : ids_BxT.shape[1]]


class CLIPTextTransformer(nn.Module):
  """transformers' CLIPTextModel: token ids (B, T) -> (last hidden state, pooled end-of-text)."""

  config: CLIPTextConfig

  def setup(self):
    cfg = self.config
    self.embeddings = TextEmbeddings(cfg)
    if cfg.num_hidden_layers:
      self.encoder = Encoder(cfg, causal=True)
    self.final_layer_norm = LayerNorm(cfg.layer_norm_eps)

  def __call__(self, ids_BxT: Array) -> tuple[Array, Array]:
    cfg = self.config
    if ids_BxT.ndim != 2 or not 0 < ids_BxT.shape[1] <= cfg.max_position_embeddings:
      raise ValueError(f"CLIP token ids must be B x T with T in 1..{cfg.max_position_embeddings}, got {ids_BxT.shape}")
    x = self.embeddings(ids_BxT)
    x = self.final_layer_norm(self.encoder(x) if cfg.num_hidden_layers else x)
    if cfg.eos_token_id == 2:
      where = jnp.argmax(ids_BxT, axis=-1)
    else:
      where = jnp.argmax(ids_BxT == cfg.eos_token_id, axis=-1)
    return x, jnp.take_along_axis(x, where[:, None, None], axis=1)[:, 0]


def init_text_params(config: CLIPTextConfig, rng: jax.Array) -> dict:
  """Fresh parameters, boxed with their logical axis names (nn.unbox for plain arrays)."""
  return CLIPTextTransformer(config).init(rng, jnp.zeros((1, 2), jnp.int32))["params"]


def clip_text_outputs(params: Mapping, config: CLIPTextConfig, ids_BxT: Array) -> tuple[Array, Array]:
  """transformers' (last_hidden_state, pooler_output): (B, T, hidden), (B, hidden)."""
  return CLIPTextTransformer(config).apply({"params": nn.unbox(params)}, jnp.asarray(ids_BxT, jnp.int32))
