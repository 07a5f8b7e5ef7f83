"""transformers CLIP (config.json + weights) -> CLIPVisionConfig + Flax parameters of the vision tower.

    config, params = load_clip_vision("clip-vit-large-patch14/")
    features = clip.clip_image_features(params, config, clip.clip_preprocess(images, config.image_size))

The folder is what `save_pretrained` writes for a CLIPVisionModel (its own config.json) or for a
whole CLIPModel (a CLIPConfig whose `vision_config` section describes the tower; the text tower,
the projections and `logit_scale` are ignored). Tensor names come in two spellings, both accepted:
`vision_model.embeddings...` (every CLIPModel, and CLIPVisionModel as transformers 4.x saved it)
and bare `embeddings...` (CLIPVisionModel as transformers 5 saves it). Weights are read with
`convert.torch_checkpoint.load_state_dict` (model.safetensors or pytorch_model.bin, sharded or not),
so no torch is needed and no code from the file runs.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from monoformer_jax.convert.checkpoints import read_checkpoint_config
from monoformer_jax.convert.torch_checkpoint import load_state_dict
from monoformer_jax.vision.clip import CLIPVisionConfig, init_params


class ConversionError(ValueError):
  """The state dict does not fit the config: lists every missing, unexpected or misshapen key."""


_PREFIX = "vision_model."
# Keys of a CLIPModel (or CLIPVisionModelWithProjection) outside the vision tower, when its tensor
# names carry no `vision_model.` prefix to tell them apart.
_NOT_VISION = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
# A non-persistent buffer (arange) that transformers < 4.31 still wrote into the checkpoint.
_IGNORED = ("embeddings.position_ids",)
# Flax module names that differ from transformers' (who spell it `pre_layrnorm`).
_RENAMED = {"pre_layernorm": "pre_layrnorm"}


def vision_tensors(state: Mapping[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray]]:
  """(prefix, {name without prefix: tensor}) of the vision tower's tensors in a CLIP state dict."""
  if any(name.startswith(_PREFIX) for name in state):
    prefix = _PREFIX
    names = [n for n in state if n.startswith(_PREFIX)]
  else:
    prefix = ""
    names = [n for n in state if not n.startswith(_NOT_VISION)]
  tensors = {n[len(prefix) :]: state[n] for n in names}
  return prefix, {n: v for n, v in tensors.items() if n not in _IGNORED}


def _layout(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str, tuple[int, ...], Callable]:
  """For one Flax parameter (the path below `encoder/layers` for a scanned one, shape without the
  layers axis): (transformers name, its shape there, torch tensor -> Flax array)."""
  *modules, leaf = path
  modules = [_RENAMED.get(m, m) for m in modules]
  if leaf == "patch_embedding":  # Conv2d OIHW -> HWIO
    return (
        "embeddings.patch_embedding.weight",
        (shape[3], shape[2], shape[0], shape[1]),
        lambda w: w.transpose(2, 3, 1, 0),
    )
  if leaf in ("position_embedding", "token_embedding"):  # an nn.Embedding's table
    return f"embeddings.{leaf}.weight", shape, lambda w: w
  if leaf == "class_embedding":
    return "embeddings.class_embedding", shape, lambda w: w
  name = ".".join(modules + ["bias" if leaf == "bias" else "weight"])  # kernel and norm scale: 'weight'
  if leaf == "kernel":  # nn.Linear (out, in) -> (in..., out...); out_proj reads 2 axes (heads, head_dim)
    in_dims = 2 if modules[-1] == "out_proj" else 1
    n_in, n_out = int(np.prod(shape[:in_dims])), int(np.prod(shape[in_dims:]))
    return name, (n_out, n_in), lambda w: w.T.reshape(shape)
  return name, (int(np.prod(shape)),), lambda w: w.reshape(shape)  # biases (q/k/v: per head) and norms


def convert_state_dict(state: Mapping[str, np.ndarray], config: CLIPVisionConfig) -> dict:
  """transformers CLIP state dict -> Flax `params` (float32 NumPy arrays, encoder layers stacked).

  Raises ConversionError naming every missing key, unexpected key and shape mismatch at once.
  """
  prefix, tensors = vision_tensors(state)
  abstract = jax.eval_shape(lambda: nn.unbox(init_params(config, jax.random.PRNGKey(0))))
  return convert_tensors(tensors, abstract, prefix, "the CLIP vision config")


def convert_tensors(tensors: Mapping[str, np.ndarray], abstract, prefix: str, what: str) -> dict:
  """A tower's tensors (names without `prefix`) -> the Flax tree shaped as `abstract` (the
  tower's parameter shapes); `what` the tower, in the error message."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  converted, used, problems = [], set(), []

  def take(name: str, want: tuple[int, ...], to_flax: Callable):
    if name not in tensors:
      problems.append(f"missing {prefix}{name}")
      return None
    used.add(name)
    value = np.asarray(tensors[name])
    if value.shape != want:
      problems.append(f"shape mismatch for {prefix}{name}: file has {value.shape}, the config needs {want}")
      return None
    return to_flax(value).astype(np.float32)

  for key_path, spec in leaves:
    path = tuple(k.key for k in key_path)
    if path[:2] == ("encoder", "layers"):  # scanned: one tensor per layer, stacked on axis 0
      suffix, want, to_flax = _layout(path[2:], spec.shape[1:])
      layers = [take(f"encoder.layers.{i}.{suffix}", want, to_flax) for i in range(spec.shape[0])]
      converted.append(None if any(x is None for x in layers) else np.stack(layers))
    else:
      converted.append(take(*_layout(path, spec.shape)))
  problems += [f"unexpected key {prefix}{name}" for name in sorted(set(tensors) - used)]
  if problems:
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise ConversionError(f"state dict does not match {what}:\n  " + "\n  ".join(shown))
  return jax.tree_util.tree_unflatten(treedef, converted)


def clip_folder(path) -> str:
  path = os.fspath(path)
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(f"no such CLIP directory: {path!r}")
  return path


def load_clip_config(path, dtype: str = "float32") -> CLIPVisionConfig:
  """The tower's config from a folder's config.json (a CLIPVisionConfig's or a CLIPConfig's)."""
  return tower_config(path, CLIPVisionConfig.from_transformers, dtype)


def tower_config(path, from_transformers: Callable, dtype: str = "float32"):
  """`from_transformers(fields, dtype=dtype)` of a CLIP folder's config.json; errors name the file."""
  folder = clip_folder(path)
  fields = read_checkpoint_config(
      folder, "expected a transformers CLIPVisionModel or CLIPModel folder, as written by save_pretrained"
  )
  try:
    return from_transformers(fields, dtype=dtype)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{os.path.join(folder, 'config.json')}: {e}") from e


def weight_files(folder: str) -> str:
  """The folder's weight file(s), to name in an error (load_state_dict picks which one it reads)."""
  names = sorted(
      p.name for p in epath.Path(folder).iterdir() if p.name.endswith((".safetensors", ".bin", ".index.json"))
  )
  return os.path.join(folder, names[0]) if len(names) == 1 else f"{folder} ({', '.join(names)})"


def load_clip_vision(path, dtype: str = "float32") -> tuple[CLIPVisionConfig, dict]:
  """(config, params) of the vision tower in a transformers CLIPVisionModel / CLIPModel folder.

  `dtype` is the tower's matmul dtype (config.dtype); the parameters are float32 either way.
  """
  folder = clip_folder(path)
  config = load_clip_config(folder, dtype)
  state = load_state_dict(folder)
  try:
    return config, convert_state_dict(state, config)
  except ConversionError as e:
    raise ConversionError(f"{weight_files(folder)}: {e}") from e
