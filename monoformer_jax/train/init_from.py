"""`config.init_from`: start a run from converted weights instead of a fresh initialisation
(a Hugging Face LLaMA, the official MonoFormer checkpoint, or another run of ours)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from monoformer_jax.convert import checkpoints as convert_checkpoints
from monoformer_jax.convert.monoformer_weights import stack_layers
from monoformer_jax.model.config import from_official_config
from monoformer_jax.run.config import ConfigError
from monoformer_jax.run.open import is_export, open_run
from monoformer_jax.run.state import place_params
from monoformer_jax.train.reporting import report

# Fields the loaded weights must share with the config (the image path is created when missing).
_SHAPE_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "vocab_size",
    "image_channels",
    "patch_size",
)

# What a LLaMA checkpoint does not hold: the image path (and the reader of input images, for a
# run that reads them) is made fresh with the run's own settings.
_NEW_PATH_FIELDS = (
    "image_height",
    "image_width",
    "image_channels",
    "patch_size",
    "t_embed",
    "learn_sigma",
    "num_classes",
    "input_feature_dim",
    "input_embedder",
)


def check_init_from(config, model_config) -> None:
  """Before any state is built: the `init_from` folder exists and its config.json describes
  this model (a 1.1B config must not allocate 18 GB of state to learn that the folder holds
  another model). hf: and official: only; a run: is checked when it loads."""
  kind, _, path = config.init_from.partition(":")
  if kind not in ("hf", "official"):
    return
  try:
    loaded = from_official_config(convert_checkpoints.read_checkpoint_config(path))
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise ConfigError(f"config.init_from={config.init_from!r}: {type(e).__name__}: {e}") from None
  fields = _SHAPE_FIELDS[:5] if kind == "hf" else _SHAPE_FIELDS  # hf: the image path is new
  _raise_on_mismatch(config, {f: (getattr(loaded, f), getattr(model_config, f)) for f in fields})
  if loaded.vocab_size > model_config.vocab_size:
    _raise_on_mismatch(config, {"vocab_size": (loaded.vocab_size, model_config.vocab_size)})


def _raise_on_mismatch(config, pairs: dict) -> None:
  mismatch = {f: (a, b) for f, (a, b) in pairs.items() if a != b}
  if mismatch:
    raise ConfigError(
        f"config.init_from={config.init_from!r} holds a different model: "
        + ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in mismatch.items())
    )


def load_init_params(config, model_config, rng, mesh=None):
  """(ModelConfig of the loaded weights, params) of `config.init_from`: host arrays, or for a
  run of ours its raw weights (an export: the weights it holds) placed on `mesh` as it reads them."""
  kind, path = config.init_from.split(":", 1)
  if kind == "hf":
    return convert_checkpoints.load_llama_checkpoint(
        path, vocab_size=model_config.vocab_size, rng=rng, **{f: getattr(model_config, f) for f in _NEW_PATH_FIELDS}
    )
  if kind == "official":
    return convert_checkpoints.load_official_checkpoint(path)
  run = open_run(path, use_ema=None if is_export(path) else False, mesh=mesh)
  return run.model_config, run.params


def initialise_from(config, state, shardings, model_config, optimizer, rng):
  """Replaces fresh params (and EMA) by converted ones; the optimizer state restarts."""
  mesh = jax.tree.leaves(shardings.params)[0].mesh
  loaded_cfg, params = load_init_params(config, model_config, rng, mesh)
  _raise_on_mismatch(config, {f: (getattr(loaded_cfg, f), getattr(model_config, f)) for f in _SHAPE_FIELDS})
  if model_config.scan_layers and "layers" not in params:
    params = stack_layers(params, model_config.num_layers)
  params = place_params(params, shardings.params)
  ema = jax.tree.map(jnp.copy, params)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
  report(f"initialised from {config.init_from}")
  return state.replace(params=params, ema_params=ema, opt_state=opt_state)
