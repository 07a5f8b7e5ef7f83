"""Random MonoFormer parameters without running the model's initialisers.

`init_params` run eagerly compiles every initialiser op on XLA:CPU (seconds per config on a loaded
machine); the shapes come from `jax.eval_shape` (a trace, nothing compiled) and the values from
NumPy. Every leaf is random, the image path included (the official init zeroes several layers).
"""

import flax.linen as nn
import jax
import numpy as np

from monoformer_jax.model.monoformer import init_params


def random_params(config, seed: int = 0) -> dict:
  """Unboxed float32 params: kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm scales
  ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2) (works for the scanned layout too)."""
  shapes = jax.eval_shape(lambda: nn.unbox(init_params(config, jax.random.key(0))))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    shape = leaf.shape
    stacked = "'layers'" in name  # scanned layers: leading layer axis
    core = shape[1:] if stacked else shape
    x = rng.standard_normal(shape)
    if "embedding" in name:
      v = x
    elif name.endswith("['scale']"):
      v = 1.0 + 0.1 * x
    elif len(core) == 1:
      v = 0.1 * x
    else:
      # Attention's o_proj contracts (heads, head_dim); every other kernel its first axis.
      fan_in = core[0] * core[1] if "o_proj" in name else core[0]
      v = x / np.sqrt(fan_in)
    return v.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)
