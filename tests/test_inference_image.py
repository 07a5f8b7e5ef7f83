"""Cached-prefix image sampling == the official full recompute (every sampler); the LM head is
never applied; text -> image -> text in one call when the model itself opens the image."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax import diffusion
from monoformer_jax.diffusion.options import ImageSampling
from monoformer_jax.convert import golden_cases as gc
from monoformer_jax.sampling import (
    decode,
    generate_interleaved,
    init_cache,
    run_interleaved,
    sample_images,
    sample_images_full_recompute,
    span_length,
)
from monoformer_jax.sampling import image as image_lib
from monoformer_jax.sampling import interleaved as interleaved_lib
from monoformer_jax.model.monoformer import MonoFormer
from tests.helpers import build, random_params, tiny_config

IMS, IME = 95, 96  # stand-ins for <|im_start|>, <|im_end|> in the 97-token tiny vocabulary


@pytest.mark.parametrize("name", ["model_adaln", "model_tok"])
def test_cached_loop_equals_full_recompute_and_the_official_trajectory(name, testdata):
  """The golden model and prompts, the official 20-step CFG loop on its recorded noise."""
  config, params, cases, special = gc.load_golden_dir(str(testdata / name))
  ids, mask = cases["sample_input_ids"], cases["sample_attention_mask"]
  kept = [[int(t) for t, m in zip(r, mr) if m] for r, mr in zip(ids, mask)]
  prompts = [k[: k.index(special["<image>"])] for k in kept]  # <s> ... <|im_start|> [cond; uncond]
  scale = float(cases["cfg_scale"][0])
  chain = diffusion.create_gaussian_diffusion(respacing=str(len(cases["sample_t_index"])))
  noise = jnp.asarray(gc.nchw_to_nhwc(cases["sample_noise"][:, :1]))
  x_t = jnp.asarray(gc.nchw_to_nhwc(cases["sample_z"][:1]))
  p_ids, lengths = image_lib.pad_prompts(prompts)
  labels = jnp.zeros((2, 1), jnp.int32)

  @jax.jit
  def cached_loop(x_t):
    cache = image_lib.prompt_cache(
        params, config, jnp.asarray(p_ids), jnp.asarray(lengths), p_ids.shape[1] + span_length(config)
    )
    model_fn = image_lib.cached_model_fn(
        params,
        config,
        cache,
        p_ids.shape[1],
        jnp.asarray(lengths),
        jnp.zeros((2,), jnp.int32),
        jnp.ones((2,), bool),
        labels=labels,
    )
    return diffusion.ddpm_sample_loop(
        chain, diffusion.cfg_denoise_fn(model_fn, scale, "official_first3"), x_t, lambda k, x: noise[k]
    )

  @jax.jit
  def full_loop(x_t):
    batch = jax.tree.map(jnp.asarray, image_lib.full_sequence_batch(config, prompts, [0, 0]))

    def model_fn(x, t):
      out = MonoFormer(config).apply({"params": params}, batch, x[:, None], t[:, None])
      return out["image"][:, 0]

    return diffusion.ddpm_sample_loop(
        chain, diffusion.cfg_denoise_fn(model_fn, scale, "official_first3"), x_t, lambda k, x: noise[k]
    )

  cached, full = np.asarray(cached_loop(x_t)), np.asarray(full_loop(x_t))
  ref = gc.nchw_to_nhwc(cases["sample_final"][:1])
  scale_ref = float(np.abs(full).max())
  np.testing.assert_allclose(cached, full, rtol=0, atol=1e-5 * scale_ref)
  np.testing.assert_allclose(cached, ref, rtol=0, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


@pytest.fixture(scope="module")
def tiny_models(module_seed):
  """tiny_models(t_embed): one random tiny model per variant (its params are read-only)."""

  @functools.lru_cache(maxsize=None)
  def get(t_embed: str):
    config = tiny_config(t_embed=t_embed, num_classes=3)
    return config, random_params(config, seed=module_seed(f"params {t_embed}"), scale=0.5)

  return get


@pytest.fixture(scope="module", params=["adaln_before_decoder", "add_before_image_tokens"])
def tiny(request, tiny_models):
  return tiny_models(request.param)


def test_sample_images_equals_full_recompute_with_cfg_and_labels(tiny, rng):
  config, params = tiny
  prompts = [[1, *rng.integers(3, 90, n), IMS] for n in (5, 1, 9)]
  kw = dict(
      uncond_prompt=[1, IMS],
      labels=[0, 2, 1],
      options=ImageSampling(guidance_scale=3.0, num_steps=4),
      rng=jax.random.key(int(rng.integers(1 << 30))),
  )
  cached = sample_images(params, config, diffusion.make_objective("gaussian"), prompts, **kw)
  full = sample_images_full_recompute(params, config, diffusion.make_objective("gaussian"), prompts, **kw)
  np.testing.assert_allclose(cached, full, rtol=0, atol=1e-5 * np.abs(full).max())
  # The same sample drawn alone (its own noise stream, whatever the batch).
  alone = sample_images(
      params,
      config,
      diffusion.make_objective("gaussian"),
      prompts[2:],
      **dict(kw, labels=[1]),
      sample_ids=[2],
      pad_to=11,
  )
  np.testing.assert_allclose(alone[0], cached[2], rtol=0, atol=1e-5 * np.abs(full).max())
  with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
    ImageSampling(guidance_scale=0.5)
  with pytest.raises(ValueError, match="does not sample a 'gaussian' objective"):
    sample_images(
        params, config, diffusion.make_objective("gaussian"), prompts, **dict(kw, options=ImageSampling(sampler="heun"))
    )


@pytest.fixture(scope="module")
def t_token_model(tiny_models):
  return tiny_models("add_before_image_tokens")


@pytest.mark.parametrize(
    "kind,sampler,eta,clip",
    [
        ("gaussian", "ddim", 0.0, True),
        ("gaussian", "ddim", 0.8, False),
        ("flow", "euler", 0.0, False),
        ("flow", "heun", 0.0, False),
    ],
)
def test_every_sampler_cached_equals_full_recompute(t_token_model, kind, sampler, eta, clip, rng):
  config, params = t_token_model
  objective = diffusion.make_objective(kind, learn_sigma=config.learn_sigma)
  prompts = [[1, *rng.integers(3, 90, n), IMS] for n in (6, 2)]
  kw = dict(
      uncond_prompt=[1, IMS],
      labels=[2, 0],
      options=ImageSampling(guidance_scale=2.5, sampler=sampler, num_steps=3, eta=eta, clip_denoised=clip),
      rng=jax.random.key(int(rng.integers(1 << 30))),
  )
  cached = sample_images(params, config, objective, prompts, **kw)
  full = sample_images_full_recompute(params, config, objective, prompts, **kw)
  assert np.abs(full).max() > 0.1
  # float32 rounding is relative to the largest values the chain computes with. Clamped, those
  # are not in the output: the x0 predicted from near-pure noise is hundreds here (eps times
  # sqrt(1 - abar) / sqrt(abar), ~150 at t = 999), and the clamp keeps only [-1, 1] of it, so
  # the scale is the unclamped chain's (seed sweep: worst 1.7e-7 of it, 1e-4 of the output).
  scale = np.abs(full).max()
  if clip:
    unclipped = sample_images(
        params, config, objective, prompts, **dict(kw, options=kw["options"].replace(clip_denoised=False))
    )
    scale = max(scale, np.abs(unclipped).max())
  np.testing.assert_allclose(cached, full, rtol=0, atol=1e-5 * scale)
  if eta:  # eta > 0 draws fresh noise at every step: another sample than eta = 0
    deterministic = sample_images(
        params, config, objective, prompts, **dict(kw, options=kw["options"].replace(eta=0.0))
    )
    assert np.abs(deterministic - cached).max() > 1e-3 * np.abs(full).max()
  if clip:  # DDIM's last step returns the clamped x0 itself; unclamped, the chain differs
    assert np.abs(cached).max() <= 1.0 + 1e-6
    assert np.abs(unclipped - cached).max() > 1e-2


def _vocab_dots(jaxpr, vocab: int) -> list:
  """dot_generals (in `jaxpr` and every jaxpr nested in it) with a vocabulary-sized operand."""
  found = []
  for eqn in jaxpr.eqns:
    shapes = [v.aval.shape for v in (*eqn.invars, *eqn.outvars) if hasattr(v.aval, "shape")]
    if eqn.primitive.name == "dot_general" and any(vocab in s for s in shapes):
      found.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          found += _vocab_dots(sub, vocab)
  return found


def test_the_lm_head_is_never_applied_while_drawing(t_token_model):
  """Traced without the lm_head parameters (flax raises if the head is called), and no matmul in
  the compiled sampler, the image phase of text+image decoding included, has a vocab-sized side.
  The official full recompute, traced the same way, has one: the check can see a head."""
  config, params = t_token_model
  assert config.vocab_size not in (config.hidden_size, config.intermediate_size)
  headless = {k: v for k, v in params.items() if k != "lm_head"}
  objective = diffusion.make_objective("gaussian")
  opts = dict(options=ImageSampling(guidance_scale=2.0, cfg_mode="eps", sampler="ddpm", num_steps=2))
  ids, lengths = image_lib.pad_prompts([[1, 5, 7, IMS], [1, IMS]])
  cached = jax.make_jaxpr(
      lambda p: image_lib._sample_cached(  # pylint: disable=protected-access
          p,
          jnp.asarray(ids),
          jnp.asarray(lengths),
          jnp.full((2,), 3, jnp.int32),
          jax.random.key(0),
          jnp.arange(1),
          objective,
          config=config,
          **opts,
      )
  )(headless)
  assert not _vocab_dots(cached.jaxpr, config.vocab_size)
  state = jax.eval_shape(
      lambda p: decode.prefill(
          p, jnp.asarray(ids), jnp.asarray(lengths), jnp.arange(2), config=config, cache_size=32, max_new_tokens=4
      ),
      params,
  )
  state["images"] = jax.ShapeDtypeStruct((2, 1) + image_lib.image_shape(config), jnp.float32)
  phase = jax.make_jaxpr(
      lambda p, s: interleaved_lib.draw_pending(
          p,
          s,
          jnp.asarray([1, IMS]),
          jax.random.key(0),
          objective,
          config=config,
          image_token=IMS,
          end_token=IME,
          max_images=1,
          **opts,
      )
  )(headless, state)
  assert not _vocab_dots(phase.jaxpr, config.vocab_size)
  batch = jax.tree.map(jnp.asarray, image_lib.full_sequence_batch(config, [[1, 5, 7, IMS]] * 2, [3, 3]))
  official = jax.make_jaxpr(
      lambda p: image_lib._sample_full(  # pylint: disable=protected-access
          p, batch, jax.random.key(0), jnp.arange(1), objective, config=config, with_lm_head=True, **opts
      )
  )(params)
  assert _vocab_dots(official.jaxpr, config.vocab_size)


def _image_trigger(params, trigger: int, gain: float = 6.0, peak: float = 20.0):
  """Params whose greedy text picks <|im_start|> right after `trigger`, and never elsewhere.

  Hidden unit 0 of every token embedding is -gain, +gain for `trigger`; it dominates the
  residual stream at that unit, so after the final norm its sign says whether the token fed
  was `trigger`. The LM head reads unit 0 as +w for <|im_start|> and -w for every other token:
  a shift shared by all of them, so their order is that of the rest of the head (scaled by
  `peak` so that greedy choices have no near-ties). Tokens 0, 1 and <|im_end|> get no shift, so
  they are never chosen: some random models otherwise write only token 0, leaving no trigger.
  """
  p = jax.tree.map(np.array, params)
  emb, head = p["embed_tokens"]["embedding"], p["lm_head"]["kernel"]
  emb[:, 0] = -gain
  if trigger >= 0:
    emb[trigger, 0] = gain
  head *= peak
  w = 4.0 * np.abs(head[1:]).sum(axis=0).max()
  head[0, :] = -w
  head[:, IMS] = 0.0
  head[0, IMS] = w
  head[0, [0, 1, IME]] = 0.0
  p["norm"]["scale"][0] = 1.0
  return p


def _full_forward(params, config, rows, size):
  """Logits and K/V of whole sequences [(text, clean image, text)], one row each (no cache)."""
  batch = jax.tree.map(jnp.asarray, build(config, [[r] for r in rows], size))
  out = jax.jit(
      lambda p, b: MonoFormer(config).apply(
          {"params": p},
          b,
          b["images"],
          jnp.zeros(b["images"].shape[:2]),
          cache=init_cache(config, len(rows), size),
          cache_index=0,
      )
  )(params, batch)
  return batch, out["logits"], out["cache"]


def test_model_opens_an_image_mid_text_and_writes_on_after_it(tiny, monkeypatch, rng):
  """Row 0: plain text until the model itself writes <|im_start|> after a chosen token; row 1:
  a prompt ending with <|im_start|>. Both rows in one call, drawing at different steps."""
  config, base = tiny
  # The cache starts at 8 slots and grows twice: before row 1's image, and in row 0's text.
  monkeypatch.setattr(decode, "MIN_CACHE_SLOTS", 8)
  key = jax.random.key(int(rng.integers(1 << 30)))
  objective = diffusion.make_objective("gaussian")
  m, span = 8, span_length(config)
  kw = dict(
      image_token=IMS,
      end_token=IME,
      uncond_prompt=[1, IMS],
      max_new_tokens=m,
      options=ImageSampling(guidance_scale=2.0, num_steps=3),
      rng=key,
  )
  # Without a trigger row 0 writes text only; its first new token not in its prompt becomes
  # the trigger (tiny random models repeat themselves: a few prompts may be needed).
  for _ in range(8):
    prompts = [[1, *rng.integers(3, 90, 6)], [1, *rng.integers(3, 90, 3), IMS]]
    plain = generate_interleaved(_image_trigger(base, -1), config, objective, prompts, **kw)[0]
    assert IMS not in plain["tokens"] and not plain["images"]
    k = next(
        (i for i, t in enumerate(plain["tokens"]) if t not in set(prompts[0]) | set(plain["tokens"][:i]) | {0, 1, IME}),
        None,
    )
    if k is not None:
      break
  assert k is not None, plain
  params = _image_trigger(base, plain["tokens"][k])
  state = run_interleaved(params, config, objective, prompts, **kw)
  assert decode.cache_slots(state) > 16
  generated, counts, images, drawn = jax.device_get(
      (state["generated"], state["num_generated"], state["images"], state["images_drawn"])
  )
  assert counts.tolist() == [m, m]  # no stop token: every row wrote max_new_tokens
  tokens = [list(map(int, g)) for g in generated]
  # Row 0: the same text up to the trigger, then its own <|im_start|>, the image, <|im_end|>.
  assert tokens[0][: k + 1] == plain["tokens"][: k + 1]
  assert tokens[0][k + 1 : k + 3] == [IMS, IME] and tokens[0].count(IMS) == 1
  assert tokens[1][0] == IME and IMS not in tokens[1]
  assert drawn.tolist() == [1, 1]
  # Each image is what the cached image sampler draws for that exact prefix, noise and guidance.
  prefixes = [prompts[0] + tokens[0][: k + 2], prompts[1]]
  ref = sample_images(
      params,
      config,
      objective,
      prefixes,
      uncond_prompt=[1, IMS],
      labels=[config.num_classes] * 2,
      options=ImageSampling(guidance_scale=2.0, num_steps=3),
      rng=jax.random.fold_in(key, 1),
  )
  np.testing.assert_allclose(images[:, 0], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
  # The whole sequences, recomputed: text, the clean image (t = 0), text after <|im_end|>.
  rows = []
  for prompt, new, x0 in zip(prompts, tokens, images[:, 0]):
    fed = prompt + new[:-1]  # the last chosen token is never fed
    cut = fed.index(IMS) + 1
    rows.append([("text", fed[:cut], True), ("image", x0, config.num_classes), ("text", fed[cut:], True)])
  size = max(len(p) + m - 1 + span for p in prompts)
  batch, logits, full_cache = _full_forward(params, config, rows, size)
  seg = np.asarray(batch["segment_ids"])
  for r, (prompt, new) in enumerate(zip(prompts, tokens)):
    # The decode cache holds exactly these tokens' keys/values, the image as clean tokens.
    ours = np.asarray(state["cache"]["meta"]["segment_ids"][r]) > 0
    assert ours.sum() == (seg[r] > 0).sum() == len(prompt) + m - 1 + span
    for name in ("k", "v"):
      want = np.asarray(full_cache["layers"][name][:, r])[:, :, seg[r] > 0]  # (L, KVH, S, D)
      got = np.asarray(state["cache"]["layers"][name][:, r])[:, :, ours]
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(
        np.asarray(state["cache"]["meta"]["image_id"][r])[ours],
        np.asarray(full_cache["meta"]["image_id"][r])[seg[r] > 0],
    )
    # Every token the model chose is the full recompute's greedy choice (<|im_start|> masked
    # once the row has drawn its max_images = 1 image); <|im_end|> is written, not chosen.
    kinds = np.asarray(batch["kinds"][r])
    text_at = np.nonzero((seg[r] > 0) & (kinds == 0))[0]  # text slots, in sequence order
    chosen = text_at[len(prompt) - 1 :]  # the logits there chose new[0], new[1], ...
    opened = False
    for slot, tok, prev in zip(chosen, new, [prompt[-1]] + new[:-1]):
      if prev == IMS:
        assert tok == IME
        opened = True
        continue
      row_logits = np.array(logits[r, slot])
      if opened:
        row_logits[IMS] = -np.inf
      assert int(np.argmax(row_logits)) == tok, (r, slot)
