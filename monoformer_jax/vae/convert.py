"""diffusers AutoencoderKL (config.json + weights) -> VAEConfig + Flax parameters.

    config, params = load_diffusers_vae("sd-vae-ft-mse/")      # or an SD pipeline folder with vae/
    mean, logvar = AutoencoderKL(config).apply({"params": params}, images, method="encode")

Weights are read with `convert.torch_checkpoint.load_state_dict`, so the folder may hold
`diffusion_pytorch_model.safetensors` or `.bin` (no torch needed, no code from the file run).
Both attention naming schemes are accepted: diffusers >= 0.15 (`to_q`, `to_k`, `to_v`,
`to_out.0`) and older files (`query`, `key`, `value`, `proj_attn`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from monoformer_jax.convert.torch_checkpoint import load_state_dict
from monoformer_jax.vae.autoencoder_kl import AutoencoderKL, VAEConfig


class ConversionError(ValueError):
  """The state dict does not fit the config: lists every missing, unexpected or misshapen key."""


# Far above any released VAE (the SD VAE: 4 blocks of 2 layers), and what keeps a crafted
# config.json from having a model of millions of layers built (abstractly) before its weights
# are compared.
_MAX_BLOCKS = 16
_MAX_LAYERS_PER_BLOCK = 64
_MAX_CHANNELS = 1 << 16


def _count(name: str, value, most: int) -> int:
  """A size field: an integer from 1 to `most` (an integral float like 4.0 passes, as int() let it)."""
  try:
    count = int(value)
  except (TypeError, ValueError, OverflowError):
    count = None
  if count is None or count != value or not 1 <= count <= most:
    raise ValueError(f"{name}={value!r:.100}: expected an integer from 1 to {most}")
  return count


def config_from_diffusers(fields: Mapping) -> VAEConfig:
  """A VAEConfig from diffusers' AutoencoderKL config.json fields (refusing what it cannot run)."""
  name = fields.get("_class_name", "AutoencoderKL")
  if name != "AutoencoderKL":
    raise ValueError(f"config is for {name!r:.100}, not AutoencoderKL")
  blocks = fields.get("block_out_channels", (64,))
  if not isinstance(blocks, (list, tuple)) or not 1 <= len(blocks) <= _MAX_BLOCKS:
    raise ValueError(f"block_out_channels={blocks!r:.100}: expected a list of 1 to {_MAX_BLOCKS} channel counts")
  blocks = tuple(_count("block_out_channels", c, _MAX_CHANNELS) for c in blocks)
  down = tuple(fields.get("down_block_types", ("DownEncoderBlock2D",) * len(blocks)))
  up = tuple(fields.get("up_block_types", ("UpDecoderBlock2D",) * len(blocks)))
  if set(down) != {"DownEncoderBlock2D"} or set(up) != {"UpDecoderBlock2D"}:
    raise ValueError(
        f"unsupported block types {down} / {up}: only DownEncoderBlock2D and "
        "UpDecoderBlock2D (the SD VAE's) are implemented"
    )
  if not len(down) == len(up) == len(blocks):
    raise ValueError(f"{len(down)} down blocks, {len(up)} up blocks and {len(blocks)} block_out_channels must agree")
  if fields.get("act_fn", "silu") != "silu":
    raise ValueError(f"act_fn={fields['act_fn']!r} unsupported (only 'silu')")
  for unsupported in ("latents_mean", "latents_std"):
    if fields.get(unsupported) is not None:
      raise ValueError(f"{unsupported} normalisation is not implemented")
  return VAEConfig(
      in_channels=_count("in_channels", fields.get("in_channels", 3), _MAX_CHANNELS),
      out_channels=_count("out_channels", fields.get("out_channels", 3), _MAX_CHANNELS),
      block_out_channels=blocks,
      layers_per_block=_count("layers_per_block", fields.get("layers_per_block", 1), _MAX_LAYERS_PER_BLOCK),
      latent_channels=_count("latent_channels", fields.get("latent_channels", 4), _MAX_CHANNELS),
      norm_num_groups=_count("norm_num_groups", fields.get("norm_num_groups", 32), _MAX_CHANNELS),
      scaling_factor=float(fields.get("scaling_factor", 0.18215)),
      shift_factor=float(fields.get("shift_factor") or 0.0),
      use_quant_conv=bool(fields.get("use_quant_conv", True)),
      use_post_quant_conv=bool(fields.get("use_post_quant_conv", True)),
      mid_block_add_attention=bool(fields.get("mid_block_add_attention", True)),
  )


# Flax module name -> diffusers name; order matters (the block patterns before bare resnets_N).
_MODULE_PATTERNS = (
    (r"(down|up)_blocks_(\d+)_resnets_(\d+)", r"\1_blocks.\2.resnets.\3"),
    (r"down_blocks_(\d+)_downsample", r"down_blocks.\1.downsamplers.0.conv"),
    (r"up_blocks_(\d+)_upsample", r"up_blocks.\1.upsamplers.0.conv"),
    (r"^resnets_(\d+)$", r"resnets.\1"),
    (r"^attention$", "attentions.0"),
)
# Flax attention projection -> (current diffusers name, pre-0.15 name).
_ATTENTION_NAMES = {
    "query": ("to_q", "query"),
    "key": ("to_k", "key"),
    "value": ("to_v", "value"),
    "out": ("to_out.0", "proj_attn"),
}


def _torch_names(path: tuple[str, ...]) -> tuple[str, ...]:
  """Candidate diffusers keys (new naming first) for one Flax parameter path."""
  *modules, leaf = path
  leaf = "bias" if leaf == "bias" else "weight"  # kernel and norm scale are both 'weight'
  renamed = []
  for module in modules:
    for pattern, replacement in _MODULE_PATTERNS:
      module = re.sub(pattern, replacement, module)
    renamed.append(module)
  if len(renamed) >= 2 and renamed[-2] == "attentions.0" and renamed[-1] in _ATTENTION_NAMES:
    return tuple(".".join(renamed[:-1] + [alias, leaf]) for alias in _ATTENTION_NAMES[renamed[-1]])
  return (".".join(renamed + [leaf]),)


def _to_flax(value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
  """PyTorch layout -> Flax layout: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
  if len(flax_shape) == 4 and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if len(flax_shape) == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
    value = value[:, :, 0, 0]  # attention stored as 1x1 convolutions by some old conversions
  if len(flax_shape) == 2 and value.ndim == 2:
    return value.T
  return value


def convert_state_dict(state: Mapping[str, np.ndarray], config: VAEConfig) -> dict:
  """diffusers AutoencoderKL state dict -> Flax `params` (float32 NumPy arrays).

  Raises ConversionError naming every missing key, unexpected key and shape mismatch at once.
  """
  abstract = jax.eval_shape(
      lambda: nn.unbox(
          AutoencoderKL(config).init(
              jax.random.PRNGKey(0),
              np.zeros((1, 2 * config.downsample_factor, 2 * config.downsample_factor, config.in_channels), np.float32),
          )["params"]
      )
  )
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  converted, used, problems = [], set(), []
  for key_path, spec in leaves:
    path = tuple(k.key for k in key_path)
    candidates = _torch_names(path)
    name = next((n for n in candidates if n in state), None)
    if name is None:
      problems.append(f"missing {' or '.join(candidates)} (for {'/'.join(path)})")
      converted.append(None)
      continue
    used.add(name)
    value = _to_flax(np.asarray(state[name]), spec.shape)
    if value.shape != spec.shape:
      problems.append(
          f"shape mismatch for {name}: file has {tuple(state[name].shape)}, "
          f"the config needs {spec.shape} in Flax layout (got {value.shape})"
      )
    converted.append(value.astype(np.float32))
  unexpected = sorted(set(state) - used)
  problems += [f"unexpected key {name}" for name in unexpected]
  if problems:
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise ConversionError("state dict does not match the VAE config:\n  " + "\n  ".join(shown))
  return jax.tree_util.tree_unflatten(treedef, converted)


def params_to_state_dict(params: Mapping) -> dict[str, np.ndarray]:
  """The inverse of convert_state_dict (current diffusers naming), e.g. to save_file() back."""
  state = {}
  for key_path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = tuple(k.key for k in key_path)
    value = np.asarray(value)
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2:
      value = value.T
    state[_torch_names(path)[0]] = np.ascontiguousarray(value)
  return state


def _vae_folder(path: str) -> str:
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(f"no such VAE directory: {path!r}")
  if not epath.Path(path, "config.json").is_file() and epath.Path(path, "vae", "config.json").is_file():
    return os.path.join(path, "vae")  # a whole Stable-Diffusion pipeline folder
  return path


def load_diffusers_config(path: str) -> VAEConfig:
  folder = _vae_folder(os.fspath(path))
  config_path = os.path.join(folder, "config.json")
  if not epath.Path(config_path).is_file():
    raise FileNotFoundError(
        f"no config.json in {folder!r} (expected a diffusers AutoencoderKL folder, as written by save_pretrained)"
    )
  try:
    fields = json.loads(epath.Path(config_path).read_text())
  except (ValueError, RecursionError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
    raise ValueError(f"{config_path}: not valid JSON ({type(e).__name__}: {e})") from e
  if not isinstance(fields, dict):
    raise ValueError(f"{config_path}: a JSON {type(fields).__name__}, not an object of AutoencoderKL fields")
  try:
    return config_from_diffusers(fields)
  except ValueError as e:
    raise ValueError(f"{config_path}: {e}") from e
  except TypeError as e:  # e.g. a number where a list of block types belongs
    raise ValueError(f"{config_path}: a field of the wrong JSON type ({e})") from e


def load_diffusers_vae(path: str) -> tuple[VAEConfig, dict]:
  """(config, params) from a diffusers AutoencoderKL folder (safetensors or .bin weights)."""
  folder = _vae_folder(os.fspath(path))
  config = load_diffusers_config(folder)
  state = load_state_dict(folder)
  try:
    return config, convert_state_dict(state, config)
  except ConversionError as e:
    raise ConversionError(f"{folder}: {e}") from e
