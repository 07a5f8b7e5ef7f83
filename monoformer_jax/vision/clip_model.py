"""A whole CLIP (both towers and their projections) from a transformers CLIPModel folder, for
scoring how well images match texts (evaluation/clip_score.py).

    clip = load_clip_model("clip-vit-large-patch14/")                # openai/clip-vit-* layout
    img = image_embeds(clip, clip_preprocess(images_uint8, clip.config.vision.image_size))
    txt = text_embeds(clip, clip.tokenizer.batch(prompts, clip.config.text.max_position_embeddings))
    scores = clip_scores(img, txt)                                  # 100 * max(cos, 0), per pair

`image_embeds` / `text_embeds` are transformers' `CLIPModel.get_image_features` /
`get_text_features`: each tower's pooled output times its projection (no bias).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax.convert.torch_checkpoint import load_state_dict
from monoformer_jax.vision import clip, clip_text
from monoformer_jax.vision.clip_tokenizer import CLIPTokenizer
from monoformer_jax.vision.convert import (
    ConversionError,
    clip_folder,
    convert_state_dict,
    convert_tensors,
    tower_config,
    weight_files,
)


@dataclasses.dataclass(frozen=True)
class CLIPModelConfig:
  vision: clip.CLIPVisionConfig
  text: clip_text.CLIPTextConfig
  projection_dim: int = 512

  @classmethod
  def from_transformers(cls, fields, dtype: str = "float32") -> "CLIPModelConfig":
    """From a CLIPConfig's config.json fields (vision_config, text_config, projection_dim)."""
    if fields.get("model_type", "clip") != "clip" or "vision_config" not in fields or "text_config" not in fields:
      raise ValueError(
          f"model_type {fields.get('model_type')!r}: not a whole CLIPModel (needs vision_config and text_config: "
          "a CLIPVisionModel folder has no text tower to score with)"
      )
    return cls(
        clip.CLIPVisionConfig.from_transformers(fields, dtype=dtype),
        clip_text.CLIPTextConfig.from_transformers(fields, dtype=dtype),
        int(fields.get("projection_dim") or 512),
    )


@dataclasses.dataclass(frozen=True)
class CLIPModel:
  config: CLIPModelConfig
  params: Any  # {"vision", "text", "visual_projection", "text_projection", "logit_scale"}
  tokenizer: CLIPTokenizer = None


def _text_tensors(state) -> dict:
  prefix = "text_model."
  return {
      k[len(prefix) :]: v
      for k, v in state.items()
      if k.startswith(prefix) and not k.endswith("embeddings.position_ids")  # an old non-persistent buffer
  }


def convert_clip_model(state, config: CLIPModelConfig) -> dict:
  """A CLIPModel state dict -> {"vision", "text", "visual_projection", "text_projection",
  "logit_scale"} (float32; projections as (in, out) kernels). Errors name every problem."""
  problems = []
  try:
    vision = convert_state_dict(state, config.vision)
  except ConversionError as e:
    problems.append(str(e))
  abstract = jax.eval_shape(lambda: nn.unbox(clip_text.init_text_params(config.text, jax.random.key(0))))
  try:
    text = convert_tensors(_text_tensors(state), abstract, "text_model.", "the CLIP text config")
  except ConversionError as e:
    problems.append(str(e))
  out = {}
  for name, width in (("visual_projection", config.vision.hidden_size), ("text_projection", config.text.hidden_size)):
    key, want = f"{name}.weight", (config.projection_dim, width)
    if key not in state:
      problems.append(f"missing {key}")
    elif tuple(np.shape(state[key])) != want:
      problems.append(f"shape mismatch for {key}: file has {tuple(np.shape(state[key]))}, the config needs {want}")
    else:
      out[name] = np.asarray(state[key], np.float32).T
  if problems:
    raise ConversionError("; ".join(problems))
  scale = np.asarray(state.get("logit_scale", np.log(1 / 0.07)), np.float32).reshape(())
  return {"vision": vision, "text": text, **out, "logit_scale": scale}


def load_clip_model(path, dtype: str = "float32") -> CLIPModel:
  """Both towers, the projections and the tokenizer of a transformers CLIPModel folder."""
  folder = clip_folder(path)
  config = tower_config(folder, CLIPModelConfig.from_transformers, dtype)
  state = load_state_dict(folder)
  try:
    params = convert_clip_model(state, config)
  except ConversionError as e:
    raise ConversionError(f"{weight_files(folder)}: {e}") from e
  return CLIPModel(config, params, CLIPTokenizer.from_folder(folder))


@functools.partial(jax.jit, static_argnums=(1,))
def _image_embeds(params, config: CLIPModelConfig, pixels):
  _, pooled = clip.clip_vision_outputs(params["vision"], config.vision, pixels)
  return jnp.dot(pooled, params["visual_projection"])


@functools.partial(jax.jit, static_argnums=(1,))
def _text_embeds(params, config: CLIPModelConfig, ids):
  _, pooled = clip_text.clip_text_outputs(params["text"], config.text, ids)
  return jnp.dot(pooled, params["text_projection"])


def image_embeds(model: CLIPModel, pixels_BxHxWxC) -> jax.Array:
  """`get_image_features`: (B, projection_dim) of preprocessed pixels (clip.clip_preprocess)."""
  return _image_embeds(model.params, model.config, jnp.asarray(pixels_BxHxWxC, jnp.float32))


def text_embeds(model: CLIPModel, ids_BxT) -> jax.Array:
  """`get_text_features`: (B, projection_dim) of token ids (CLIPTokenizer.batch)."""
  return _text_embeds(model.params, model.config, jnp.asarray(ids_BxT, jnp.int32))


def clip_scores(image_embeds_NxP, text_embeds_NxP) -> np.ndarray:
  """CLIP score of each (image, text) pair: 100 * max(cosine similarity, 0) (Hessel et al.'s
  CLIPScore with w = 100, as torchmetrics computes it)."""
  a = np.asarray(image_embeds_NxP, np.float64)
  b = np.asarray(text_embeds_NxP, np.float64)
  cos = np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  return 100.0 * np.maximum(cos, 0.0)
