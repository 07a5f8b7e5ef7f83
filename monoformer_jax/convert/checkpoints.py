"""Load and export PyTorch-format checkpoints: Hugging Face LLaMA/TinyLlama and official MonoFormer.

    config, params = load_llama_checkpoint("TinyLlama-1.1B-Chat-v1.0/", vocab_size=32004)
    config, params = load_official_checkpoint("MonoFormer_ImageNet_256/")      # reads ema/ first
    save_hf_llama(params, config, "out/")        # transformers.LlamaForCausalLM.from_pretrained("out/")
    save_official(params, config, "out/")        # official key names + config.json fields

Weights are read with `torch_checkpoint.load_state_dict` (safetensors, sharded index files, or
PyTorch zip files through a tensors-only unpickler): no torch needed and no code from the file run.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from monoformer_jax import paths
from monoformer_jax.convert.monoformer_weights import (params_to_state_dict, state_dict_to_params, weight_table)
from monoformer_jax.convert.torch_checkpoint import load_state_dict
from monoformer_jax.model.config import ModelConfig, from_official_config
from monoformer_jax.model.monoformer import init_params

_IMAGE_KEY_PREFIXES = ("x_embedder", "t_embedder", "adaLN_module", "t_projector", "final_layer", "y_embedder")


def read_checkpoint_config(path: str, expected: str = "") -> dict:
  """The fields of a checkpoint folder's config.json (a JSON object), errors naming the file;
  `expected`: what the folder should be, said where it has no config.json."""
  cfg_path = os.path.join(path, "config.json")
  if not epath.Path(cfg_path).is_file():
    raise FileNotFoundError(f"no config.json in {path!r}" + (f" ({expected})" if expected else ""))
  try:
    fields = json.loads(epath.Path(cfg_path).read_text())
  except (UnicodeDecodeError, RecursionError, json.JSONDecodeError) as e:
    raise ValueError(f"{cfg_path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from e
  if not isinstance(fields, dict):
    raise ValueError(f"{cfg_path}: expected a JSON object of config fields, got a {type(fields).__name__}")
  return fields


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  return load_state_dict(path)


def resize_vocab(params: dict, vocab_size: int, rng: jax.Array, stddev: float) -> dict:
  """Grows (or keeps) the embedding and LM head to `vocab_size` rows.

  New rows are drawn from N(0, stddev), as transformers' `resize_token_embeddings` does with the
  model's initializer_range (the official code grows TinyLlama's 32000 to 32004 this way).
  """
  old = params["embed_tokens"]["embedding"].shape[0]
  if vocab_size < old:
    raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size}")
  if vocab_size == old:
    return params
  k1, k2 = jax.random.split(rng)
  hidden = params["embed_tokens"]["embedding"].shape[1]
  new_e = np.asarray(jax.random.normal(k1, (vocab_size - old, hidden))) * stddev
  new_h = np.asarray(jax.random.normal(k2, (hidden, vocab_size - old))) * stddev
  params = dict(params)
  params["embed_tokens"] = {
      "embedding": np.concatenate([params["embed_tokens"]["embedding"], new_e.astype(np.float32)])
  }
  params["lm_head"] = {"kernel": np.concatenate([params["lm_head"]["kernel"], new_h.astype(np.float32)], axis=1)}
  return params


def _fill_missing(loaded: dict, fresh: dict) -> dict:
  """Loaded params where present, fresh ones elsewhere (image path of a pure LLaMA checkpoint)."""
  out = {}
  for k, v in fresh.items():
    if isinstance(v, dict):
      out[k] = _fill_missing(loaded.get(k, {}), v)
    else:
      out[k] = loaded[k] if k in loaded else np.asarray(v)
  return out


def load_llama_checkpoint(
    path: str, *, vocab_size: Optional[int] = None, rng: Optional[jax.Array] = None, **config_overrides
) -> tuple[ModelConfig, dict]:
  """A Hugging Face LLaMA directory -> (config, params) of a full MonoFormer.

  The LLaMA weights are loaded; the image path (x_embedder, timestep embedder, conditioning,
  diffusion head) gets its fresh official initialisation from `rng`. `vocab_size` grows the
  vocabulary (new rows ~ N(0, initializer_range)).
  """
  hf = read_checkpoint_config(path)
  rng = jax.random.key(0) if rng is None else rng
  base = from_official_config(hf, **config_overrides)
  state = read_state_dict(path)
  llama = state_dict_to_params(state, base, allow_missing=_IMAGE_KEY_PREFIXES)
  config = base if vocab_size is None else base.replace(vocab_size=vocab_size)
  init_rng, resize_rng = jax.random.split(rng)
  if vocab_size is not None:
    llama = resize_vocab(llama, vocab_size, resize_rng, base.initializer_range)
  fresh = jax.device_get(nn.unbox(init_params(config, init_rng)))
  return config, _fill_missing(llama, fresh)


def load_official_checkpoint(path: str, *, ema: bool = True) -> tuple[ModelConfig, dict]:
  """An official MonoFormer checkpoint directory -> (config, params).

  Layout: `config.json` (official field names) and the weights either beside it or in `ema/`
  (the EMA weights of the released checkpoint, preferred when `ema` is True) as safetensors or a
  torch `.bin`.
  """
  config = from_official_config(read_checkpoint_config(path))
  weights = path
  ema_dir = os.path.join(path, "ema")
  if ema and epath.Path(ema_dir).is_dir():
    weights = ema_dir
  state = read_state_dict(weights)
  return config, state_dict_to_params(state, config)


def _hf_config(config: ModelConfig) -> dict:
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.dim_per_head,
      "hidden_act": "silu",
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "max_position_embeddings": config.max_position_embeddings,
      "initializer_range": config.initializer_range,
      "tie_word_embeddings": False,
      "attention_bias": False,
      "mlp_bias": False,
      "bos_token_id": 1,
      "eos_token_id": 2,
      "torch_dtype": "float32",
  }


def _save(state: dict, cfg: dict, out_dir: str, overwrite: bool) -> None:
  import safetensors.numpy  # pylint: disable=import-outside-toplevel

  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  target = epath.Path(out_dir) / "model.safetensors"
  if target.exists() and not overwrite:
    raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
  arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
  # Never leave a half-written checkpoint under the final name.
  if paths.is_local(target):  # streamed to disk: no second copy of the weights in memory
    tmp = f"{target}.tmp"
    safetensors.numpy.save_file(arrays, tmp, metadata={"format": "pt"})
    os.replace(tmp, target)
  else:
    paths.write_bytes_atomic(target, safetensors.numpy.save(arrays, metadata={"format": "pt"}))
  (epath.Path(out_dir) / "config.json").write_text(json.dumps(cfg, indent=2))


def save_hf_llama(params: dict, config: ModelConfig, out_dir: str, *, overwrite: bool = False):
  """Writes the language-model part as a transformers LlamaForCausalLM directory."""
  state = params_to_state_dict(params, config, include_image=False)
  _save(state, _hf_config(config), out_dir, overwrite)


# The fields the official `MonoFormerForCausalLM` reads from its config.json beyond LLaMA's own
# (models/monoformer.py and models/modeling.py of its single_image branch, which made the released
# checkpoint); a missing one is an AttributeError when the official code loads the folder.
OFFICIAL_CONFIG_FIELDS = (
    "image_size",
    "in_channels",
    "patch_size",
    "learn_sigma",
    "decoder_t_embed",
    "use_bi_attn_img_tokens",
    "use_pos_embed",
    "add_pos_embed_each_layer",
    "use_adaln_final_layer",
    "image_token_index",
    "use_flash_attn",
)


def official_config(config: ModelConfig, image_token_index: int) -> dict:
  """The official config.json of `config` (LLaMA fields + OFFICIAL_CONFIG_FIELDS).
  `image_token_index`: the id of the tokenizer's `<image>` (32001 with TinyLlama's)."""
  if config.image_height != config.image_width or config.num_classes:
    raise ValueError(
        "the official layout describes square SD-VAE latents (image_size = 8 x latent) and has no label embedding"
    )
  cfg = _hf_config(config)
  cfg.update(
      {
          "architectures": ["MonoFormerForCausalLM"],
          "image_size": config.image_height * 8,
          "in_channels": config.image_channels,
          "patch_size": config.patch_size,
          "learn_sigma": config.learn_sigma,
          "decoder_t_embed": config.t_embed,
          "use_bi_attn_img_tokens": config.bidirectional_image,
          "use_pos_embed": config.use_pos_embed,
          "add_pos_embed_each_layer": False,
          "use_adaln_final_layer": True,
          "image_token_index": int(image_token_index),
          # The official code refuses flash attention with its mask (it needs the dense one).
          "use_flash_attn": False,
      }
  )
  return cfg


def save_official(
    params: dict, config: ModelConfig, out_dir: str, *, image_token_index: int = 32001, overwrite: bool = False
):
  """Writes every parameter under the official key names, with the official config.json."""
  _save(params_to_state_dict(params, config), official_config(config, image_token_index), out_dir, overwrite)


__all__ = [
    "OFFICIAL_CONFIG_FIELDS",
    "official_config",
    "load_llama_checkpoint",
    "load_official_checkpoint",
    "save_hf_llama",
    "save_official",
    "resize_vocab",
    "weight_table",
]
