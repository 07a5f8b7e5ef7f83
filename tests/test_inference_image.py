"""Cached-prefix image sampling == the official full recompute; text and images in one call."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax import diffusion
from monoformer_jax.convert import golden_cases as gc
from monoformer_jax.inference import (generate_interleaved, sample_images,
                                      sample_images_full_recompute, span_length)
from monoformer_jax.inference import image as image_lib
from monoformer_jax.model.monoformer import MonoFormer
from tests.helpers import build, random_params, tiny_config

IMS, IME = 95, 96  # stand-ins for <|im_start|>, <|im_end|> in the 97-token tiny vocabulary


@pytest.mark.parametrize("name", ["model_adaln", "model_tok"])
def test_cached_loop_equals_full_recompute_and_the_official_trajectory(name, testdata):
  """The golden model and prompts, the official 20-step CFG loop on its recorded noise."""
  config, params, cases, special = gc.load_golden_dir(str(testdata / name))
  ids, mask = cases["sample_input_ids"], cases["sample_attention_mask"]
  kept = [[int(t) for t, m in zip(r, mr) if m] for r, mr in zip(ids, mask)]
  prompts = [k[:k.index(special["<image>"])] for k in kept]  # <s> ... <|im_start|> [cond; uncond]
  scale = float(cases["cfg_scale"][0])
  chain = diffusion.create_gaussian_diffusion(respacing=str(len(cases["sample_t_index"])))
  noise = jnp.asarray(gc.nchw_to_nhwc(cases["sample_noise"][:, :1]))
  x_t = jnp.asarray(gc.nchw_to_nhwc(cases["sample_z"][:1]))
  p_ids, lengths = image_lib.pad_prompts(prompts)
  labels = jnp.zeros((2, 1), jnp.int32)

  @jax.jit
  def cached_loop(x_t):
    cache = image_lib.prompt_cache(params, config, jnp.asarray(p_ids), jnp.asarray(lengths),
                                   p_ids.shape[1] + span_length(config))
    model_fn = image_lib.cached_model_fn(params, config, cache, p_ids.shape[1],
                                         jnp.asarray(lengths), jnp.zeros((2,), jnp.int32),
                                         jnp.ones((2,), bool), labels=labels)
    return diffusion.ddpm_sample_loop(
        chain, diffusion.cfg_denoise_fn(model_fn, scale, "official_first3"), x_t,
        lambda k, x: noise[k])

  @jax.jit
  def full_loop(x_t):
    batch = jax.tree.map(jnp.asarray, image_lib.full_sequence_batch(config, prompts, [0, 0]))

    def model_fn(x, t):
      out = MonoFormer(config).apply({"params": params}, batch, x[:, None], t[:, None])
      return out["image"][:, 0]
    return diffusion.ddpm_sample_loop(
        chain, diffusion.cfg_denoise_fn(model_fn, scale, "official_first3"), x_t,
        lambda k, x: noise[k])

  cached, full = np.asarray(cached_loop(x_t)), np.asarray(full_loop(x_t))
  ref = gc.nchw_to_nhwc(cases["sample_final"][:1])
  scale_ref = float(np.abs(full).max())
  np.testing.assert_allclose(cached, full, rtol=0, atol=1e-5 * scale_ref)
  np.testing.assert_allclose(cached, ref, rtol=0, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


@pytest.fixture(scope="module", params=["adaln_before_decoder", "add_before_image_tokens"])
def tiny(request):
  config = tiny_config(t_embed=request.param, num_classes=3)
  return config, random_params(config, seed=int(np.random.default_rng().integers(1000)),
                               scale=0.5)


def test_sample_images_equals_full_recompute_with_cfg_and_labels(tiny):
  config, params = tiny
  rng = np.random.default_rng()
  prompts = [[1, *rng.integers(3, 90, n), IMS] for n in (5, 1, 9)]
  kw = dict(uncond_prompt=[1, IMS], labels=[0, 2, 1], guidance_scale=3.0, num_steps=4,
            rng=jax.random.key(int(rng.integers(1 << 30))))
  cached = sample_images(params, config, diffusion.make_objective("gaussian"), prompts, **kw)
  full = sample_images_full_recompute(params, config, diffusion.make_objective("gaussian"),
                                      prompts, **kw)
  np.testing.assert_allclose(cached, full, rtol=0, atol=1e-5 * np.abs(full).max())
  # The same sample drawn alone (its own noise stream, whatever the batch).
  alone = sample_images(params, config, diffusion.make_objective("gaussian"), prompts[2:],
                        **dict(kw, labels=[1]), sample_ids=[2], pad_to=11)
  np.testing.assert_allclose(alone[0], cached[2], rtol=0, atol=1e-5 * np.abs(full).max())
  # Guidance changes the samples; the flow objective runs through the same path.
  flow = sample_images(params, config, diffusion.make_objective("flow", learn_sigma=True),
                       prompts[:1], **dict(kw, labels=[0], guidance_scale=1.0, sampler="heun"))
  assert flow.shape == (1,) + cached.shape[1:] and np.isfinite(flow).all()
  with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
    sample_images(params, config, diffusion.make_objective("gaussian"), prompts,
                  **dict(kw, guidance_scale=0.5))


def test_text_image_text_in_one_call(tiny):
  config, params = tiny
  rng = np.random.default_rng()
  key = jax.random.key(int(rng.integers(1 << 30)))
  objective = diffusion.make_objective("gaussian")
  prompts = [[1, *rng.integers(3, 90, 4), IMS], [1, *rng.integers(3, 90, 7)]]
  res = generate_interleaved(params, config, objective, prompts, image_token=IMS, end_token=IME,
                             uncond_prompt=[1, IMS], max_new_tokens=6, guidance_scale=2.0,
                             num_steps=3, rng=key)
  assert len(res[0]["images"]) == 1 and res[0]["tokens"][0] == IME
  # The image is the one the image sampler draws for that prompt (same noise key).
  ref = sample_images(params, config, objective, prompts[:1], uncond_prompt=[1, IMS],
                      labels=[config.num_classes], guidance_scale=2.0, num_steps=3,
                      rng=jax.random.fold_in(key, 1))
  np.testing.assert_allclose(res[0]["images"][0], ref[0], rtol=0, atol=1e-5 * np.abs(ref).max())
  # The text after it is greedy over the full sequence with the image clean (t = 0).
  x0, tail = res[0]["images"][0], [IME]
  size = len(prompts[0]) + span_length(config) + 6
  step = jax.jit(lambda b: MonoFormer(config).apply({"params": params}, b, b["images"],
                                                    jnp.zeros((1, 1)), return_image=False))
  for _ in range(5):
    pieces = [("text", prompts[0], True), ("image", x0, config.num_classes), ("text", tail, True)]
    batch = jax.tree.map(jnp.asarray, build(config, [[pieces]], size))
    end = len(prompts[0]) + span_length(config) + len(tail) - 1
    tail.append(int(jnp.argmax(step(batch)["logits"][0, end])))
  assert res[0]["tokens"] == tail
  assert res[1]["images"] == [] or res[1]["tokens"].count(IMS) == 1
