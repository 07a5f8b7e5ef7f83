"""Small shared helpers for tests: tiny configs, random parameters, random batches."""
import flax.linen as nn
import jax
import numpy as np

from monoformer_jax.model import inputs as inputs_lib
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.monoformer import init_params


def tiny_config(**kw) -> ModelConfig:
  base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
              num_kv_heads=2, image_height=4, image_width=6, image_channels=3, patch_size=2)
  base.update(kw)
  return ModelConfig(**base)


def random_params(config: ModelConfig, seed: int = 0, scale: float = 0.3) -> dict:
  """Fresh params with every leaf perturbed (the zero-initialised image layers too)."""
  params = jax.device_get(nn.unbox(init_params(config, jax.random.key(seed))))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: (p + scale * rng.standard_normal(p.shape) / np.sqrt(
      max(p.shape[0], 1) if p.ndim > 1 else 4)).astype(np.float32), params)


def image_sample(config, rng, prompt_len, tail_len=2, label=0):
  shape = (config.image_height, config.image_width, config.image_channels)
  return [("text", rng.integers(3, config.vocab_size, prompt_len), True),
          ("image", rng.standard_normal(shape).astype(np.float32), label),
          ("text", rng.integers(3, config.vocab_size, tail_len), True)]


def text_sample(config, rng, length):
  return [("text", rng.integers(3, config.vocab_size, length), True)]


def build(config, rows, seq_len, slots=1):
  """rows: list of lists of samples (each a list of pieces) -> batch."""
  shape = (config.image_height, config.image_width, config.image_channels)
  batch = inputs_lib.empty_batch(len(rows), seq_len, slots, shape)
  for r, samples in enumerate(rows):
    builder = inputs_lib.RowBuilder(batch, r, config.num_patches, config.has_t_token)
    for s in samples:
      builder.add(s)
  return batch
