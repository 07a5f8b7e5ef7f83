"""The TinyLlama-1.1B MonoFormer's size, with nothing allocated, against an independent count."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from monoformer_jax.model.config import tinyllama_monoformer
from monoformer_jax.model.monoformer import init_params


def _count(config):
  shapes = jax.eval_shape(lambda: nn.unbox(init_params(config, jax.random.key(0))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def _reference_count():
  """transformers' LlamaForCausalLM on the meta device (32,004 tokens) + the image modules."""
  torch = pytest.importorskip("torch")
  import transformers
  cfg = transformers.LlamaConfig(vocab_size=32004, hidden_size=2048, intermediate_size=5632,
                                 num_hidden_layers=22, num_attention_heads=32,
                                 num_key_value_heads=4, tie_word_embeddings=False)
  with torch.device("meta"):
    llama = transformers.LlamaForCausalLM(cfg)
  n_llama = sum(p.numel() for p in llama.parameters())
  with torch.device("meta"):
    h, p, c = 2048, 2, 4
    image = [torch.nn.Linear(c * p * p, h),                 # x_embedder
             torch.nn.Linear(256, h), torch.nn.Linear(h, h),  # t_embedder
             torch.nn.Linear(h, 2 * h),                      # adaLN_module (or t_projector 2 x h*h)
             torch.nn.Linear(h, 2 * h), torch.nn.Linear(h, p * p * 2 * c)]  # final layer
  n_image = sum(q.numel() for m in image for q in m.parameters())
  return n_llama, n_image


def test_tinyllama_monoformer_parameter_count():
  n_llama, n_image = _reference_count()
  assert n_llama == 1_100_064_768
  for variant in ("adaln_before_decoder", "add_before_image_tokens"):
    assert _count(tinyllama_monoformer(t_embed=variant)) == n_llama + n_image == 1_121_673_248
