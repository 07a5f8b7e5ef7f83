"""The Pallas flash kernels (model/flash_attention.py, `model.attention=pallas`) against the dense
einsum, in Pallas' interpreter on this CPU (and the whole model through `xla`,
jax.nn.dot_product_attention, likewise): the spans they read say what the dense mask says, and
the kernels give the same outputs and gradients over every mask feature (packed rows, several
images, padding, the causal-image switch, read images, a cache). Padding queries (no visible key)
are the one documented difference: zero there, an average in the dense path; nothing reads them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax import diffusion
from monoformer_jax.diffusion.options import ImageSampling
from monoformer_jax.batch import KIND_IMAGE, KIND_INPUT_IMAGE
from monoformer_jax.model import attention, mask as mask_lib
from monoformer_jax.model.flash_attention import flash_attention
from monoformer_jax.model.monoformer import MonoFormer
from monoformer_jax.run import sharding
from monoformer_jax.sampling.decode import generate_tokens
from monoformer_jax.sampling.image import sample_images
from monoformer_jax.train.steps import batch_normalisers, make_loss_fn
from tests.helpers import build, image_sample, random_params, text_sample, tiny_config

IMS = 5


def _meta(rng, b=3, length=40, cache_index=0):
  """Token attributes of rows with packed samples, two generated images, a read image and padding."""
  seg = np.zeros((b, length), np.int32)
  kinds = np.zeros((b, length), np.int32)
  patch = np.zeros((b, length), np.int32)
  for r in range(b):
    cut = int(rng.integers(length // 3, length // 2))
    end = length - int(rng.integers(0, 6))
    seg[r, :cut], seg[r, cut:end] = 1, 2
    starts = [int(rng.integers(1, cut - 5)), int(rng.integers(cut + 1, end - 5))]
    for n, s in enumerate(starts):
      kinds[r, s : s + 4] = KIND_IMAGE if (r + n) % 3 else KIND_INPUT_IMAGE
      patch[r, s : s + 4] = np.arange(4 * n, 4 * n + 4) if kinds[r, s] == KIND_IMAGE else np.arange(4)
  order = jnp.broadcast_to(cache_index + jnp.arange(length, dtype=jnp.int32), (b, length))
  return mask_lib.token_meta(
      jnp.asarray(seg), jnp.asarray(kinds), jnp.asarray(patch), 4, order, input_tokens=4, bidirectional_input=True
  )


def _dense_from_spans(spans, k_len):
  kpos = jnp.arange(k_len)[None, None, :]
  same = spans["q_segment"][:, :, None] == spans["k_segment"][:, None, :]
  return same & (spans["k_segment"][:, None, :] > 0) & (kpos <= spans["q_reach"][:, :, None])


@pytest.mark.parametrize("bidirectional", [True, False])
def test_spans_say_what_the_dense_mask_says(rng, bidirectional):
  meta = _meta(rng)
  dense = mask_lib.attention_mask(meta, meta, bidirectional)
  spans = mask_lib.kernel_spans(meta, meta, bidirectional)
  np.testing.assert_array_equal(_dense_from_spans(spans, 40), dense)
  above_diagonal = int(jnp.sum(dense & ~jnp.tril(jnp.ones((1, 40, 40), bool))))
  assert above_diagonal > 0 if bidirectional else above_diagonal == 0
  # A chunk of queries at cache slots 12.. over a 64-slot cache (the keys: the cache's slots).
  chunk = _meta(rng, length=24, cache_index=12)
  keys = {
      "segment_ids": jnp.pad(chunk["segment_ids"], ((0, 0), (12, 28)), constant_values=1),
      "image_id": jnp.pad(chunk["image_id"], ((0, 0), (12, 28)), constant_values=-1),
      "order": jnp.broadcast_to(jnp.arange(64), (3, 64)),
  }
  dense = mask_lib.attention_mask(chunk, keys, bidirectional)
  np.testing.assert_array_equal(_dense_from_spans(mask_lib.kernel_spans(chunk, keys, bidirectional), 64), dense)


@pytest.mark.parametrize("h, kvh, block", [(4, 2, 8), (4, 1, 128)])
def test_kernel_outputs_and_gradients_equal_the_einsum(rng, h, kvh, block):
  meta = _meta(rng)
  dense = mask_lib.attention_mask(meta, meta, True)
  spans = mask_lib.kernel_spans(meta, meta, True)
  q = jnp.asarray(rng.standard_normal((3, 40, h, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.standard_normal((3, kvh, 40, 16)), jnp.float32) for _ in range(2))
  seen = np.asarray(dense.any(-1))
  weights = jnp.asarray(rng.standard_normal((3, 40, h, 16)), jnp.float32) * seen[:, :, None, None]

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

  ref = attention.attend(q, k, v, dense, "einsum")
  got = flash_attention(q, k, v, spans, block_q=block, block_k=block)
  np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(ref)[seen], rtol=0, atol=2e-6 * np.abs(ref).max())
  assert not np.asarray(got)[~seen].any()  # padding queries: zeros, no NaN
  g_ref = jax.grad(loss(lambda q, k, v: attention.attend(q, k, v, dense, "einsum")), argnums=(0, 1, 2))(q, k, v)
  g_got = jax.grad(
      loss(lambda q, k, v: flash_attention(q, k, v, spans, block_q=block, block_k=block)), argnums=(0, 1, 2)
  )(q, k, v)
  for name, a, b in zip("qkv", g_ref, g_got):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=2e-6 * np.abs(a).max(), err_msg=f"d{name}")


def test_kernel_in_bfloat16_is_within_bfloat16_rounding(rng):
  meta = _meta(rng)
  dense = mask_lib.attention_mask(meta, meta, True)
  q = jnp.asarray(rng.standard_normal((3, 40, 4, 16)), jnp.bfloat16)
  k, v = (jnp.asarray(rng.standard_normal((3, 2, 40, 16)), jnp.bfloat16) for _ in range(2))
  ref = np.asarray(attention.attend(*(x.astype(jnp.float32) for x in (q, k, v)), dense, "einsum"))
  got = flash_attention(q, k, v, mask_lib.kernel_spans(meta, meta, True), block_q=8, block_k=8)
  assert got.dtype == jnp.bfloat16
  seen = np.asarray(dense.any(-1))
  np.testing.assert_allclose(np.asarray(got, np.float32)[seen], ref[seen], rtol=0, atol=2**-7 * np.abs(ref).max())


def _mixed_batch(config, rng):
  rows = [
      [image_sample(config, rng, 3, label=1), text_sample(config, rng, 4)],
      [image_sample(config, rng, 2, label=0) + image_sample(config, rng, 2, label=2)[1:]],
      [text_sample(config, rng, 5), image_sample(config, rng, 4, label=2)],
  ]
  return {k: jnp.asarray(v) for k, v in build(config, rows, seq_len=40, slots=2).items()}


@pytest.mark.parametrize("impl, bidirectional", [("pallas", True), ("pallas", False), ("xla", True)])
def test_model_forward_and_gradients_equal_the_einsum(rng, seed, impl, bidirectional):
  base = tiny_config(num_classes=3, bidirectional_image=bidirectional, attention_block=8)
  params = random_params(base, seed)
  batch = _mixed_batch(base, rng)
  timesteps = jnp.asarray(rng.integers(0, 1000, batch["image_mask"].shape))
  norms = batch_normalisers(batch)
  valid = np.asarray(batch["segment_ids"] > 0)
  got = {}
  for name in ("einsum", impl):
    config = base.replace(attention=name)
    out = MonoFormer(config).apply({"params": params}, batch, batch["images"], timesteps)
    loss_fn = make_loss_fn("mixed", config, diffusion.make_objective("gaussian"), 1.0, 0.5)
    grads = jax.grad(lambda p: loss_fn(p, batch, jax.random.key(seed), norms, jnp.arange(3))[0])(params)  # pylint: disable=cell-var-from-loop
    got[name] = (np.asarray(out["logits"])[valid], np.asarray(out["image"]), grads)
  for a, b in zip(got["einsum"][:2], got[impl][:2]):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
  ref = dict(jax.tree_util.tree_leaves_with_path(got["einsum"][2]))
  assert ref.keys() == dict(jax.tree_util.tree_leaves_with_path(got[impl][2])).keys()
  for path, b in jax.tree_util.tree_leaves_with_path(got[impl][2]):
    a = np.asarray(ref[path])
    np.testing.assert_allclose(
        np.asarray(b), a, rtol=0, atol=1e-5 * max(np.abs(a).max(), 1e-6), err_msg=jax.tree_util.keystr(path)
    )


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_cached_decoding_and_sampling_equal_the_einsum(rng, seed, impl):
  base = tiny_config(num_classes=3, attention_block=8)
  params = random_params(base, seed, scale=0.5)
  prompts = [[1, *rng.integers(6, 90, n)] for n in (3, 7)]
  texts, images = {}, {}
  for name in ("einsum", impl):
    config = base.replace(attention=name)
    texts[name] = generate_tokens(params, config, prompts, max_new_tokens=5)
    images[name] = sample_images(
        params,
        config,
        diffusion.make_objective("gaussian"),
        [p + [IMS] for p in prompts],
        uncond_prompt=[1, IMS],
        labels=[0, 2],
        options=ImageSampling(guidance_scale=3.0, num_steps=2),
        rng=jax.random.key(seed),
    )
  assert np.array_equal(np.asarray(texts["einsum"]), np.asarray(texts[impl]))
  np.testing.assert_allclose(images[impl], images["einsum"], rtol=0, atol=1e-5 * np.abs(images["einsum"]).max())


def test_auto_picks_the_kernels_on_tpu_only(monkeypatch):
  assert attention.resolve("auto", jnp.float32, 64, 128, 128) == "einsum"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert attention.resolve("auto", jnp.bfloat16, 64, 128, 128) == "pallas"


@pytest.mark.parametrize("num_rows", [4, 3])  # 3: not divisible by the batch axes (replicated)
def test_sharded_forward_runs_the_kernel_per_device_and_equals_the_einsum(rng, seed, num_rows):
  base = tiny_config(num_classes=3, attention_block=8)
  params = random_params(base, seed)
  rows = [[image_sample(base, rng, 2 + r, label=r % 3), text_sample(base, rng, 3)] for r in range(num_rows)]
  batch = {k: jnp.asarray(v) for k, v in build(base, rows, seq_len=32, slots=2).items()}
  timesteps = jnp.asarray(rng.integers(0, 1000, batch["image_mask"].shape))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  valid = np.asarray(batch["segment_ids"] > 0)
  out = {}
  for impl in ("einsum", "pallas"):
    model = MonoFormer(base.replace(attention=impl))
    with mesh, nn.logical_axis_rules(sharding.DEFAULT_RULES):
      fn = jax.jit(lambda p, b, t: model.apply({"params": p}, b, b["images"], t))  # pylint: disable=cell-var-from-loop
      text = str(fn.lower(params, batch, timesteps).as_text())
      out[impl] = jax.device_get(fn(params, batch, timesteps))
    assert ("manual_computation" in text) == (impl == "pallas")  # the kernel runs per device (shard_map)
  np.testing.assert_allclose(
      out["pallas"]["logits"][valid],
      out["einsum"]["logits"][valid],
      rtol=0,
      atol=1e-5 * np.abs(out["einsum"]["logits"]).max(),
  )
  np.testing.assert_allclose(
      out["pallas"]["image"], out["einsum"]["image"], rtol=0, atol=1e-5 * np.abs(out["einsum"]["image"]).max()
  )
