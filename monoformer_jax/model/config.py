"""Model hyper-parameters as one frozen dataclass (hashable, so Linen modules can hold it)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from monoformer_jax.model.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS

T_EMBED_VARIANTS = ("adaln_before_decoder", "add_before_image_tokens")
REMAT_POLICIES = ("none", "full", "dots")
INPUT_EMBEDDERS = ("im_embedder", "x_embedder")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The shared transformer: a LLaMA decoder plus MonoFormer's image path.

  Defaults are the released MonoFormer ImageNet-256 model (TinyLlama-1.1B backbone, 32,004-token
  vocabulary, SD-VAE latents 32x32x4, patch 2, `adaln_before_decoder`).
  """

  # LLaMA backbone.
  vocab_size: int = 32004
  hidden_size: int = 2048
  intermediate_size: int = 5632
  num_layers: int = 22
  num_heads: int = 32
  num_kv_heads: int = 4
  head_dim: int = 0  # 0 means hidden_size // num_heads.
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  max_position_embeddings: int = 2048
  initializer_range: float = 0.02
  # Image path. Sizes are those of what the transformer diffuses: VAE latents, or pixels when the
  # "autoencoder" is the identity (the embedded MNIST default: 28x28x1, patch 4).
  image_height: int = 32
  image_width: int = 32
  image_channels: int = 4
  patch_size: int = 2
  learn_sigma: bool = True
  t_embed: str = "adaln_before_decoder"
  bidirectional_image: bool = True  # official use_bi_attn_img_tokens; False = the causal ablation.
  use_pos_embed: bool = True
  num_classes: int = 0  # > 0 adds a DiT-style label embedding (index num_classes = null class).
  timestep_freq_dim: int = 256
  # Image understanding (official main branch): the width of the features an input image arrives
  # as (CLIP ViT-L/14's 1024, or a patch of pixels / latents), which `im_embedder` (Linear, GELU,
  # Linear) maps into the sequence; 0 = the model reads no images (and has no im_embedder).
  input_feature_dim: int = 0
  # What maps input-image features into the sequence: "im_embedder" (the official main branch's
  # own MLP), or "x_embedder": the patches go through the generation path (x_embedder, position
  # embedding, adaLN at t = 0 of the null class), so a read image looks to the transformer as a
  # clean generated one does (features must be the model's own patches).
  input_embedder: str = "im_embedder"
  bidirectional_input_image: bool = True  # False: input-image tokens causal, as the official code
  # Numerics and memory.
  dtype: str = "float32"  # compute dtype; parameters are always float32.
  remat: str = "none"
  scan_layers: bool = False
  attention: str = "auto"  # the attention core: auto | einsum | xla | cudnn | pallas (model/attention.py)
  attention_block: int = 128  # the pallas kernels' query / key block (TPU: a multiple of 128)

  def __post_init__(self):
    errors = []
    if self.hidden_size % self.num_heads and not self.head_dim:
      errors.append(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
    if self.num_heads % self.num_kv_heads:
      errors.append(f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")
    for name, size in (("image_height", self.image_height), ("image_width", self.image_width)):
      if size % self.patch_size:
        errors.append(f"patch_size={self.patch_size} does not divide {name}={size}")
    for name, known in (
        ("t_embed", T_EMBED_VARIANTS),
        ("remat", REMAT_POLICIES),
        ("attention", ATTENTION_IMPLEMENTATIONS),
    ):
      if getattr(self, name) not in known:
        errors.append(f"{name}={getattr(self, name)!r} is not one of {known}")
    if self.attention_block < 8 or self.attention_block % 8:
      errors.append(f"attention_block={self.attention_block} must be a positive multiple of 8")
    if self.dtype not in ("float32", "bfloat16", "float16"):
      errors.append(f"dtype={self.dtype!r} is not float32, bfloat16 or float16")
    errors += self._input_errors()
    if self.timestep_freq_dim % 2:
      errors.append(f"timestep_freq_dim={self.timestep_freq_dim} must be even")
    if errors:
      raise ValueError("invalid model config: " + "; ".join(errors))

  def _input_errors(self) -> list[str]:
    """What is wrong with the fields of the read-image path."""
    errors = []
    if self.input_feature_dim < 0:
      errors.append(f"input_feature_dim={self.input_feature_dim} must be >= 0")
    if self.input_embedder not in INPUT_EMBEDDERS:
      errors.append(f"input_embedder={self.input_embedder!r} is not one of {INPUT_EMBEDDERS}")
    elif self.input_embedder == "x_embedder" and self.input_feature_dim not in (0, self.patch_dim):
      errors.append(
          f"input_embedder='x_embedder' reads the model's own {self.patch_size}x{self.patch_size} patches "
          f"({self.patch_dim} values), not features of width {self.input_feature_dim}"
      )
    elif self.input_embedder == "x_embedder" and self.has_t_token:
      errors.append("input_embedder='x_embedder' needs t_embed='adaln_before_decoder' (a read image has no t-token)")
    return errors

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def grid_size(self) -> tuple[int, int]:
    return self.image_height // self.patch_size, self.image_width // self.patch_size

  @property
  def num_patches(self) -> int:
    h, w = self.grid_size
    return h * w

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * self.image_channels

  @property
  def output_channels(self) -> int:
    return self.image_channels * (2 if self.learn_sigma else 1)

  @property
  def has_t_token(self) -> bool:
    return self.t_embed == "add_before_image_tokens"

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> "ModelConfig":
    """Builds a config from a dict / ConfigDict, refusing unknown keys by name."""
    values = dict(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown model config field(s): {', '.join(unknown)}; known fields: {', '.join(sorted(known))}")
    return cls(**values)


def tinyllama_monoformer(**overrides) -> ModelConfig:
  """The paper's model: TinyLlama-1.1B with the 32,004-token vocabulary, ImageNet-256 latents."""
  return ModelConfig(**overrides)


def from_official_config(cfg: Mapping[str, Any], **overrides) -> ModelConfig:
  """Maps an official MonoFormer / HF LLaMA `config.json` dict onto ModelConfig.

  The official image fields: `image_size` is in pixels (latent = image_size // 8, SD-VAE), and
  `in_channels`, `patch_size`, `learn_sigma`, `decoder_t_embed`, `use_bi_attn_img_tokens`,
  `use_pos_embed`. A plain LLaMA config (no image fields) gets the ImageNet-256 image defaults.
  """
  if cfg.get("tie_word_embeddings", False):
    raise ValueError("tied input/output embeddings are not supported (LLaMA/TinyLlama untie them)")
  if cfg.get("rope_scaling"):
    raise ValueError(f"rope_scaling={cfg['rope_scaling']!r} is not supported")
  rope = dict(cfg.get("rope_parameters") or {})  # transformers >= 5 nests the RoPE settings
  if rope.get("rope_type", "default") != "default":
    raise ValueError(f"rope_parameters={rope!r}: only the default RoPE is supported")
  theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
  heads = cfg["num_attention_heads"]
  kw = dict(
      vocab_size=cfg["vocab_size"],
      hidden_size=cfg["hidden_size"],
      intermediate_size=cfg["intermediate_size"],
      num_layers=cfg["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=cfg.get("num_key_value_heads") or heads,
      head_dim=cfg.get("head_dim") or 0,
      rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
      rope_theta=float(theta),
      max_position_embeddings=cfg.get("max_position_embeddings", 2048),
      initializer_range=cfg.get("initializer_range", 0.02),
  )
  if kw["head_dim"] == kw["hidden_size"] // heads:
    kw["head_dim"] = 0
  if "image_size" in cfg:
    latent = cfg["image_size"] // 8
    kw.update(
        image_height=latent,
        image_width=latent,
        image_channels=cfg.get("in_channels", 4),
        patch_size=cfg.get("patch_size", 2),
        learn_sigma=cfg.get("learn_sigma", True),
        t_embed=cfg.get("decoder_t_embed", "adaln_before_decoder"),
        bidirectional_image=bool(cfg.get("use_bi_attn_img_tokens", True)),
        use_pos_embed=bool(cfg.get("use_pos_embed", True)),
    )
    if cfg.get("add_pos_embed_each_layer"):
      raise ValueError("add_pos_embed_each_layer=True is not supported (the official configs use False)")
    if not cfg.get("use_adaln_final_layer", True):
      raise ValueError("use_adaln_final_layer=False is not supported (the official configs use True)")
  kw.update(overrides)
  return ModelConfig(**kw)
