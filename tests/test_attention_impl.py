"""The attention implementations (`model.attention`) against the einsum reference: the core on its
own here; the whole model (forward, gradients, cached decoding) for `xla` and `pallas` in
tests/test_flash_attention.py. cuDNN needs a GPU; on CPU its selection rules are tested."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax.model import attention
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.run import config as config_lib


def _qkv(rng, b, lq, lk, h, kvh, d, dtype=jnp.float32):
  def draw(*shape):
    return jnp.asarray(rng.standard_normal(shape), dtype)

  return draw(b, lq, h, d), draw(b, kvh, lk, d), draw(b, kvh, lk, d)


@pytest.mark.parametrize("lq, lk, h, kvh", [(7, 7, 4, 4), (5, 11, 8, 2), (1, 9, 4, 1)])
def test_xla_core_equals_einsum_with_fully_masked_rows(rng, lq, lk, h, kvh):
  q, k, v = _qkv(rng, 2, lq, lk, h, kvh, 16)
  mask = rng.random((2, lq, lk)) < 0.6
  mask[0, 0] = False  # a padding query: every key masked
  mask = jnp.asarray(mask)
  ref = np.asarray(attention.attend(q, k, v, mask, "einsum"))
  got = np.asarray(attention.attend(q, k, v, mask, "xla"))
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
  # The fully masked row is the plain mean of the values its heads read (no NaN, no zeros).
  groups = h // kvh
  np.testing.assert_allclose(ref[0, 0], np.repeat(np.asarray(v[0]).mean(axis=1), groups, axis=0), atol=1e-5)


def test_xla_core_in_bfloat16_is_within_bfloat16_rounding(rng):
  q, k, v = _qkv(rng, 2, 8, 8, 4, 2, 16, jnp.bfloat16)
  mask = jnp.asarray(np.tril(np.ones((8, 8), bool))[None].repeat(2, 0))
  ref = np.asarray(attention.attend(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask))
  for impl in ("einsum", "xla"):
    got = attention.attend(q, k, v, mask, impl)
    assert got.dtype == jnp.bfloat16
    # Inputs are bf16-exact; what differs is the bf16 probabilities and output (8 bits: 2^-8).
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=0, atol=2**-7 * np.abs(ref).max())


def test_auto_and_cudnn_selection_rules(monkeypatch):
  # auto: the einsum on CPU; on a GPU cuDNN where it takes the shape; cuDNN's limits are named.
  assert attention.resolve("auto", jnp.bfloat16, 64, 64, 64) == "einsum"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert attention.resolve("auto", jnp.bfloat16, 64, 64, 64) == "cudnn"
  assert attention.resolve("auto", jnp.float32, 64, 64, 64) == "einsum"
  assert attention.resolve("auto", jnp.bfloat16, 64, 1, 65) == "einsum"  # one-token decode
  monkeypatch.undo()
  assert attention.cudnn_unsupported(jnp.bfloat16, 64, 128, 256) == ""
  assert "bfloat16" in attention.cudnn_unsupported(jnp.float32, 64, 128, 128)
  assert "head_dim=12" in attention.cudnn_unsupported(jnp.bfloat16, 12, 128, 128)
  assert "head_dim=512" in attention.cudnn_unsupported(jnp.float16, 512, 128, 128)
  assert "67 x 67" in attention.cudnn_unsupported(jnp.bfloat16, 64, 67, 67)
  with pytest.raises(ValueError, match="model.attention='cudnn' cannot run this shape: cuDNN's flash attention takes"):
    attention.resolve("cudnn", jnp.float32, 64, 128, 128)
  with pytest.raises(ValueError, match="attention='flash' is not one of"):
    ModelConfig(attention="flash")


def test_a_resumed_run_may_change_the_attention_implementation(tmp_path):
  config = config_lib.base_config()
  config_lib.save_resolved_config(config, tmp_path, True, has_checkpoints=False)
  config.model.attention = "xla"
  config.model.remat = "full"
  changes = config_lib.save_resolved_config(config, tmp_path, True, has_checkpoints=True)
  assert [c[0] for c in changes] == ["model.attention", "model.remat"]
  config.model.hidden_size = 64
  with pytest.raises(config_lib.ConfigError, match="config.model.hidden_size: 2048 in"):
    config_lib.save_resolved_config(config, tmp_path, True, has_checkpoints=True)
