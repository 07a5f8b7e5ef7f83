"""The attention implementations (`model.attention`) against the einsum reference: the core on its
own, then the whole model (forward and gradients) over every mask feature, then cached decoding.
cuDNN needs a GPU; on CPU its selection rules are tested, and `xla` (the same jax.nn op) numerically."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax import diffusion
from monoformer_jax.model import attention
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.monoformer import MonoFormer
from monoformer_jax.run import config as config_lib
from monoformer_jax.sampling.decode import generate_tokens
from monoformer_jax.sampling.image import sample_images
from monoformer_jax.train.steps import batch_normalisers, make_loss_fn
from tests.helpers import build, image_sample, random_params, text_sample, tiny_config

IMS = 5  # <|im_start|> in the tiny vocabulary (any id works for a random model)


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


def test_auto_and_cudnn_selection_rules():
  # auto is the einsum (until cuDNN's gradients are checked on a GPU); cuDNN's limits are named.
  assert attention.resolve("auto", jnp.bfloat16, 64, 64, 64) == "einsum"
  assert attention.cudnn_unsupported(jnp.bfloat16, 64, 128, 256) == ""
  assert "bfloat16" in attention.cudnn_unsupported(jnp.float32, 64, 128, 128)
  assert "head_dim=12" in attention.cudnn_unsupported(jnp.bfloat16, 12, 128, 128)
  assert "head_dim=512" in attention.cudnn_unsupported(jnp.float16, 512, 128, 128)
  assert "67 x 67" in attention.cudnn_unsupported(jnp.bfloat16, 64, 67, 67)
  with pytest.raises(ValueError, match="model.attention='cudnn' cannot run this shape: cuDNN's flash attention takes"):
    attention.resolve("cudnn", jnp.float32, 64, 128, 128)
  with pytest.raises(ValueError, match="attention='flash' is not one of"):
    ModelConfig(attention="flash")


def _mixed_batch(config, rng):
  """Every mask feature at once: packed samples, two images in one row, a text-only sample,
  padding at the end of each row."""
  rows = [
      [image_sample(config, rng, 3, label=1), text_sample(config, rng, 4)],
      [image_sample(config, rng, 2, label=0) + image_sample(config, rng, 2, label=2)[1:]],
      [text_sample(config, rng, 5), image_sample(config, rng, 4, label=2)],
  ]
  return build(config, rows, seq_len=40, slots=2)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_model_forward_and_gradients_equal_across_implementations(rng, seed, bidirectional):
  base = tiny_config(num_classes=3, bidirectional_image=bidirectional)
  params = random_params(base, seed)
  batch = {k: jnp.asarray(v) for k, v in _mixed_batch(base, rng).items()}
  assert int((batch["segment_ids"] == 0).sum()) > 0 and int(batch["image_mask"].sum()) == 4
  objective = diffusion.make_objective("gaussian")
  norms = batch_normalisers(batch)
  timesteps = jnp.asarray(rng.integers(0, 1000, batch["image_mask"].shape))
  results = {}
  for impl in ("einsum", "xla"):
    config = base.replace(attention=impl)
    out = MonoFormer(config).apply({"params": params}, batch, batch["images"], timesteps)
    loss_fn = make_loss_fn("mixed", config, objective, 1.0, 0.5)
    grads = jax.grad(lambda p: loss_fn(p, batch, jax.random.key(seed), norms, jnp.arange(3))[0])(params)  # pylint: disable=cell-var-from-loop
    results[impl] = (np.asarray(out["logits"]), np.asarray(out["image"]), grads)
  (l0, i0, g0), (l1, i1, g1) = results["einsum"], results["xla"]
  np.testing.assert_allclose(l1, l0, rtol=0, atol=1e-5 * np.abs(l0).max())
  np.testing.assert_allclose(i1, i0, rtol=0, atol=1e-5 * np.abs(i0).max())
  flat0 = dict(jax.tree_util.tree_leaves_with_path(g0))
  flat1 = dict(jax.tree_util.tree_leaves_with_path(g1))
  assert flat0.keys() == flat1.keys()
  for path, a in flat0.items():
    a, b = np.asarray(a), np.asarray(flat1[path])
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * max(np.abs(a).max(), 1e-6), err_msg=jax.tree_util.keystr(path))


def test_cached_decoding_and_sampling_equal_across_implementations(rng, seed):
  base = tiny_config(num_classes=3)
  params = random_params(base, seed, scale=0.5)
  prompts = [[1, *rng.integers(6, 90, n)] for n in (3, 7)]
  texts, images = {}, {}
  for impl in ("einsum", "xla"):
    config = base.replace(attention=impl)
    texts[impl] = generate_tokens(params, config, prompts, max_new_tokens=6)
    images[impl] = sample_images(
        params,
        config,
        diffusion.make_objective("gaussian"),
        [p + [IMS] for p in prompts],
        uncond_prompt=[1, IMS],
        labels=[0, 2],
        guidance_scale=3.0,
        num_steps=3,
        rng=jax.random.key(seed),
    )
  assert np.array_equal(np.asarray(texts["einsum"]), np.asarray(texts["xla"]))
  ref = images["einsum"]
  np.testing.assert_allclose(images["xla"], ref, rtol=0, atol=1e-5 * np.abs(ref).max())


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
