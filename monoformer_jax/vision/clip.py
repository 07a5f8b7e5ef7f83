"""CLIP's vision transformer in Flax Linen, with `transformers`' CLIPVisionModel architecture and numerics.

MonoFormer's main branch reads an image through a frozen CLIP ViT-L/14: the hidden states of its
second-to-last encoder layer without the CLS token (256 tokens of 1024 for 224x224 images), which
the model's `im_embedder` then maps into the sequence. This module is that tower:

    config, params = convert.load_clip_vision("clip-vit-large-patch14/")
    pixels = clip_preprocess(images_uint8, config.image_size)              # (B, 224, 224, 3)
    features = clip_image_features(params, config, pixels)                 # (B, 256, 1024)

NHWC throughout. Layer numbering follows transformers' `hidden_states`: 0 is the embeddings after
`pre_layrnorm`, i the output of encoder layer i, negative indices count from the end (-1 is the
last layer's output, -2 the penultimate's). The encoder layers run under `nn.scan`, so their
parameters are stacked on a leading 'layers' axis and a tower of any depth compiles one layer body.

Parameters are float32; `CLIPVisionConfig.dtype` is the matmul dtype. Layer norms, the attention
softmax and the residual stream stay float32 whatever it is. Parameter logical axes, named as the
LLaMA model's (model/layers.py) so that the same rules shard both:
  patch kernel            ('conv_height', 'conv_width', 'conv_in', 'embed')
  class / position embed  ('embed',) / ('positions', 'embed')
  q / k / v projections   ('embed', 'heads', 'head_dim'), bias ('heads', 'head_dim')
  out projection          ('heads', 'head_dim', 'embed'), bias ('embed',)
  MLP                     ('embed', 'mlp') and ('mlp', 'embed'), biases ('mlp',) / ('embed',)
  layer-norm scale / bias ('norm',)
  scanned layers          a leading 'layers' axis on all of the encoder's
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# OpenAI CLIP's normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD), RGB.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# transformers' ACT2FN names this port implements -> the function. "gelu" is the exact (erf) GELU;
# the two tanh names are the same approximation under transformers' two spellings.
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def check_tower(config) -> None:
  """What a CLIP tower's config (vision or text) must hold: a known activation, and heads that
  divide the hidden size."""
  if config.hidden_act not in _ACTIVATIONS:
    raise ValueError(f"hidden_act={config.hidden_act!r} unsupported (one of {sorted(_ACTIVATIONS)})")
  if config.hidden_size % config.num_attention_heads:
    raise ValueError(
        f"hidden_size={config.hidden_size} is not a multiple of num_attention_heads={config.num_attention_heads}"
    )


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The fields of transformers' CLIPVisionConfig that the tower uses (defaults: transformers').

  Frozen and hashable, so it can be a static argument of a jitted function.
  """

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: str = "float32"  # matmul dtype; not a transformers field

  def __post_init__(self):
    check_tower(self)
    if not 0 < self.patch_size <= self.image_size:
      raise ValueError(f"patch_size={self.patch_size} must be in 1..image_size={self.image_size}")
    if min(self.hidden_size, self.intermediate_size, self.num_channels) <= 0 or self.num_hidden_layers < 0:
      raise ValueError(f"non-positive sizes in {self}")

  @classmethod
  def from_transformers(cls, fields: Mapping, **overrides) -> CLIPVisionConfig:
    """From a transformers config.json's fields: a CLIPVisionConfig's, or a whole CLIPConfig's
    (its `vision_config` section is used; the text tower's fields are ignored)."""
    if "vision_config" in fields:
      fields = fields["vision_config"] or {}  # a CLIPConfig: None there means all defaults
    kind = fields.get("model_type", "clip_vision_model")
    if kind not in ("clip_vision_model", "clip"):
      raise ValueError(f"model_type {kind!r} is not a CLIP vision model (clip_vision_model or clip)")
    cast = {"int": int, "float": float, "str": str}
    types = {f.name: cast[f.type] for f in dataclasses.fields(cls) if f.name != "dtype"}
    return cls(**{k: types[k](fields[k]) for k in types if fields.get(k) is not None}, **overrides)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def grid_size(self) -> int:
    """Patches per side: the patch convolution has stride = kernel and no padding, so a remainder
    (image_size not a multiple of patch_size) is dropped, as transformers' Conv2d drops it."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2


def _param(module: nn.Module, name: str, init, axes: tuple, shape: tuple) -> Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def _lead(x: Array, ndim: int) -> Array:
  """`x` with leading unit axes up to `ndim` (the tests forbid implicit rank promotion)."""
  return x.reshape((1,) * (ndim - x.ndim) + x.shape)


class Dense(nn.Module):
  """y = x . W + b over the last `in_dims` axes of x; W has shape in_shape + features.

  Heads get their own kernel axis (q/k/v: (embed, heads, head_dim)) so that the sharding rules
  split them as they split the LLaMA model's; the product still runs as one 2-D matmul, as
  model/layers.Linear does, for the same reason (XLA:CPU is slow on multi-axis contractions).
  """

  features: tuple
  in_dims: int
  kernel_axes: tuple
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[x.ndim - self.in_dims :]
    lead = x.shape[: x.ndim - self.in_dims]
    kernel = _param(self, "kernel", nn.initializers.normal(0.02), self.kernel_axes, in_shape + tuple(self.features))
    bias = _param(self, "bias", nn.initializers.zeros_init(), self.kernel_axes[self.in_dims :], tuple(self.features))
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(self.features))
    y = jnp.dot(x.reshape(-1, n_in).astype(self.dtype), kernel.reshape(n_in, n_out).astype(self.dtype))
    y = y.astype(jnp.float32) + bias.reshape(1, n_out)
    return y.reshape(lead + tuple(self.features))


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm in float32: biased variance of the centred values (two passes, as torch;
  flax's nn.LayerNorm defaults to the single-pass E[x^2] - E[x]^2, which cancels digits when the
  mean is large next to the spread)."""

  eps: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", nn.initializers.ones_init(), ("norm",), (x.shape[-1],))
    bias = _param(self, "bias", nn.initializers.zeros_init(), ("norm",), (x.shape[-1],))
    x = x.astype(jnp.float32)
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
    return normed * _lead(scale, x.ndim) + _lead(bias, x.ndim)


class Embeddings(nn.Module):
  """Patches (a stride-p convolution without bias, written as a matmul on flattened patches),
  a learned CLS token in front, then learned absolute position embeddings."""

  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixels_BxHxWxC: Array) -> Array:
    cfg = self.config
    p, g, d = cfg.patch_size, cfg.grid_size, cfg.hidden_size
    kernel = _param(
        self,
        "patch_embedding",
        nn.initializers.normal(0.02),
        ("conv_height", "conv_width", "conv_in", "embed"),
        (p, p, cfg.num_channels, d),
    )
    cls = _param(self, "class_embedding", nn.initializers.normal(d**-0.5), ("embed",), (d,))
    positions = _param(self, "position_embedding", nn.initializers.normal(0.02), ("positions", "embed"), (g * g + 1, d))
    dtype = jnp.dtype(cfg.dtype)
    patches = einops.rearrange(
        pixels_BxHxWxC[:, : g * p, : g * p], "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p
    )  # (p q c) is the order of the HWIO kernel's first three axes
    x = jnp.einsum("bnk,kd->bnd", patches.astype(dtype), kernel.reshape(-1, d).astype(dtype)).astype(jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.reshape(1, 1, d), (x.shape[0], 1, d)), x], axis=1)
    return x + positions[None]


class Attention(nn.Module):
  """Multi-head self-attention: bidirectional (the vision tower: every token sees every token),
  or causal (the text tower: a token sees itself and the tokens before it)."""

  config: Any  # CLIPVisionConfig, or clip_text.CLIPTextConfig (the same fields)
  causal: bool = False

  @nn.compact
  def __call__(self, x_BxTxD: Array) -> Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    h, hd = cfg.num_attention_heads, cfg.head_dim

    def proj(name):
      return Dense((h, hd), 1, ("embed", "heads", "head_dim"), dtype, name=name)

    q, k, v = proj("q_proj")(x_BxTxD), proj("k_proj")(x_BxTxD), proj("v_proj")(x_BxTxD)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(dtype), k.astype(dtype)).astype(jnp.float32) * hd**-0.5
    if self.causal:
      t = x_BxTxD.shape[1]
      scores = jnp.where(jnp.tril(jnp.ones((t, t), bool))[None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(dtype), v.astype(dtype)).astype(jnp.float32)
    return Dense((cfg.hidden_size,), 2, ("heads", "head_dim", "embed"), dtype, name="out_proj")(out)


class MLP(nn.Module):
  config: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    x = Dense((cfg.intermediate_size,), 1, ("embed", "mlp"), dtype, name="fc1")(x)
    x = _ACTIVATIONS[cfg.hidden_act](x)
    return Dense((cfg.hidden_size,), 1, ("mlp", "embed"), dtype, name="fc2")(x)


class EncoderLayer(nn.Module):
  """Pre-norm block: x + attn(ln1(x)), then + mlp(ln2(.)). Returns (x, None), the nn.scan form."""

  config: Any
  causal: bool = False

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, None]:
    cfg = self.config
    x = x + Attention(cfg, self.causal, name="self_attn")(LayerNorm(cfg.layer_norm_eps, name="layer_norm1")(x))
    x = x + MLP(cfg, name="mlp")(LayerNorm(cfg.layer_norm_eps, name="layer_norm2")(x))
    return x, None


class Encoder(nn.Module):
  config: Any
  causal: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    stack = nn.scan(
        EncoderLayer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=self.config.num_hidden_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x, _ = stack(self.config, self.causal, name="layers")(x)
    return x


class CLIPVisionTransformer(nn.Module):
  """transformers' CLIPVisionModel: (B, H, W, C) pixels -> (last hidden state, pooled CLS).

  H = W = config.image_size (as transformers, without position-embedding interpolation).
  """

  config: CLIPVisionConfig

  def setup(self):
    cfg = self.config
    self.embeddings = Embeddings(cfg)
    self.pre_layernorm = LayerNorm(cfg.layer_norm_eps)  # transformers' `pre_layrnorm`
    if cfg.num_hidden_layers:  # a zero-layer tower (clip_image_features(layer=0)) has no scan to run
      self.encoder = Encoder(cfg)
    self.post_layernorm = LayerNorm(cfg.layer_norm_eps)

  def encode(self, pixels_BxHxWxC: Array) -> Array:
    """(B, 1 + num_patches, hidden): the last encoder layer's output, CLS first, no final norm."""
    cfg = self.config
    shape = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if pixels_BxHxWxC.ndim != 4 or tuple(pixels_BxHxWxC.shape[1:]) != shape:
      raise ValueError(f"CLIP pixels must be B x {' x '.join(map(str, shape))} (NHWC), got {pixels_BxHxWxC.shape}")
    x = self.pre_layernorm(self.embeddings(pixels_BxHxWxC))
    return self.encoder(x) if cfg.num_hidden_layers else x

  def __call__(self, pixels_BxHxWxC: Array) -> tuple[Array, Array]:
    hidden = self.encode(pixels_BxHxWxC)
    return hidden, self.post_layernorm(hidden[:, 0])


def init_params(config: CLIPVisionConfig, rng: jax.Array) -> dict:
  """Fresh parameters, boxed with their logical axis names (nn.unbox for plain arrays)."""
  pixels = jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
  return CLIPVisionTransformer(config).init(rng, pixels)["params"]


def _depth(config: CLIPVisionConfig, layer: int) -> int:
  """transformers' hidden_states index -> how many encoder layers to run."""
  n = config.num_hidden_layers
  if not -(n + 1) <= layer <= n:
    raise ValueError(f"layer {layer} out of range: hidden_states has {n + 1} entries (0..{n}, or -1..-{n + 1})")
  return layer % (n + 1)


def clip_vision_outputs(params: Mapping, config: CLIPVisionConfig, pixels_BxHxWxC: Array) -> tuple[Array, Array]:
  """transformers' (last_hidden_state, pooler_output): (B, 1 + num_patches, hidden), (B, hidden)."""
  return CLIPVisionTransformer(config).apply({"params": nn.unbox(params)}, pixels_BxHxWxC)


def clip_image_features(
    params: Mapping, config: CLIPVisionConfig, pixels_BxHxWxC: Array, layer: int = -2, drop_cls: bool = True
) -> Array:
  """transformers' `hidden_states[layer]` (CLS dropped: `[:, 1:]`): (B, num_patches, hidden).

  Only the layers up to `layer` run: the stacked encoder parameters are cut to their first
  `depth` entries and a tower of that depth is applied, so the default (the penultimate layer,
  what MonoFormer reads) does not pay for the last layer.
  """
  params = dict(nn.unbox(params))
  depth = _depth(config, layer)
  if depth < config.num_hidden_layers:
    config = dataclasses.replace(config, num_hidden_layers=depth)
    if depth:
      params["encoder"] = jax.tree.map(lambda x: x[:depth], params["encoder"])
    else:
      params.pop("encoder", None)
  hidden = CLIPVisionTransformer(config).apply({"params": params}, pixels_BxHxWxC, method="encode")
  return hidden[:, 1:] if drop_cls else hidden


def resize_output_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
  """transformers' (and torchvision's) shortest-edge target: the short side becomes
  `shortest_edge`, the long side int(shortest_edge * long / short) (truncated, not rounded)."""
  if height <= width:
    return shortest_edge, int(shortest_edge * width / height)
  return int(shortest_edge * height / width), shortest_edge


def clip_preprocess(
    images: Array, image_size: int = 224, crop_size: Optional[int] = None, max_value: float = 255.0
) -> Array:
  """CLIPImageProcessor as a pure (jittable) function: (..., H, W, C) -> (..., crop, crop, 3) float32.

  Resize the short side to `image_size` (bicubic, antialiased when shrinking, as PIL's), centre
  crop `crop_size` x `crop_size` (default `image_size`), divide by `max_value`, normalise with
  CLIP's mean / std. C is 3 (RGB) or 1 (grayscale, repeated to 3 channels). `max_value` is the value
  of white: 255 for uint8 and 0..255 floats, 1.0 for floats in [0, 1]. uint8 images are rounded
  back to integers after the resize (clipped to 0..255), as PIL and torchvision resize them, so
  the rounding matches theirs rather than adding its own difference.
  """
  images = jnp.asarray(images)
  crop = image_size if crop_size is None else crop_size
  if images.ndim < 3 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be (..., H, W, 1 or 3), got {images.shape}")
  if crop > image_size:
    raise ValueError(f"crop_size {crop} is larger than the resized short side {image_size}")
  is_uint8 = images.dtype == jnp.uint8
  h, w = images.shape[-3:-1]
  new_h, new_w = resize_output_size(h, w, image_size)
  x = images.astype(jnp.float32)
  for axis, size in ((-2, new_w), (-3, new_h)):  # PIL's order: the width pass, then the height pass
    if x.shape[axis] != size:
      shape = list(x.shape)
      shape[axis] = size
      x = jax.image.resize(x, tuple(shape), method="bicubic", antialias=True)
      if is_uint8:
        x = jnp.clip(jnp.floor(x + 0.5), 0, 255)
  top, left = (new_h - crop) // 2, (new_w - crop) // 2
  x = x[..., top : top + crop, left : left + crop, :]
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  mean = _lead(jnp.asarray(CLIP_MEAN, jnp.float32), x.ndim)
  std = _lead(jnp.asarray(CLIP_STD, jnp.float32), x.ndim)
  return (x / max_value - mean) / std
