"""The TinyLlama-1.1B MonoFormer's size, with nothing allocated, against an independent count."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from monoformer_jax.model.config import tinyllama_monoformer
from monoformer_jax.model.monoformer import init_params


def _count(config):
  shapes = jax.eval_shape(lambda: nn.unbox(init_params(config, jax.random.key(0))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def _reference_count(t_embed):
  """transformers' LlamaForCausalLM on the meta device (32,004 tokens) + the image modules, built
  as torch modules from the official code's description (layer by layer, as its models/ define them)."""
  cfg = transformers.LlamaConfig(
      vocab_size=32004,
      hidden_size=2048,
      intermediate_size=5632,
      num_hidden_layers=22,
      num_attention_heads=32,
      num_key_value_heads=4,
      tie_word_embeddings=False,
  )
  with torch.device("meta"):
    llama = transformers.LlamaForCausalLM(cfg)
  n_llama = sum(p.numel() for p in llama.parameters())
  tnn = torch.nn
  h, p, c = 2048, 2, 4
  with torch.device("meta"):
    if t_embed == "adaln_before_decoder":
      conditioning = tnn.Sequential(tnn.SiLU(), tnn.Linear(h, 2 * h))  # adaLN_module
    else:
      conditioning = tnn.Sequential(tnn.Linear(h, h), tnn.GELU(), tnn.Linear(h, h))  # t_projector
    image = tnn.ModuleDict(
        {
            "x_embedder": tnn.Linear(c * p * p, h),
            "t_embedder": tnn.Sequential(tnn.Linear(256, h), tnn.SiLU(), tnn.Linear(h, h)),
            "conditioning": conditioning,
            "final_layer": tnn.ModuleDict(
                {
                    "adaLN_modulation": tnn.Sequential(tnn.SiLU(), tnn.Linear(h, 2 * h)),
                    "linear": tnn.Linear(h, p * p * 2 * c),
                }
            ),  # learn_sigma: 2c output channels
        }
    )
  n_image = sum(q.numel() for q in image.parameters())
  return n_llama, n_image


@pytest.mark.parametrize("variant", ["adaln_before_decoder", "add_before_image_tokens"])
def test_tinyllama_monoformer_parameter_count(variant):
  n_llama, n_image = _reference_count(variant)
  assert n_llama == 1_100_064_768
  assert n_image == 21_608_480  # h*2h + 2h == 2*(h*h + h): the two variants have the same size
  assert _count(tinyllama_monoformer(t_embed=variant)) == n_llama + n_image == 1_121_673_248
