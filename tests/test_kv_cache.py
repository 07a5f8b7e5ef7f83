"""The model's key/value cache: prefill + step-by-step decode == full recomputation.

Also the cached-prefix image path: the prompt's K/V computed once, then only the image tokens run
(attending to the cached prefix and to each other) give the full sequence's denoiser output.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from monoformer_jax.sampling.cache import init_cache as empty_cache
from monoformer_jax import batch as batch_lib
from monoformer_jax.model.monoformer import MonoFormer
from tests.helpers import build, random_params, tiny_config


def _slice(batch, lo, hi):
  return {k: (v[:, lo:hi] if k in batch_lib.SEQUENCE_KEYS else v) for k, v in batch.items()}


# Every layer writes its slice of the stacked cache in place: unrolled layers get their index as
# a constant, scanned ones through the carry, rematerialised ones as a traced value.
@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "none"), (False, "full")])
def test_decode_with_cache_equals_full_recompute(scan, remat, seed, rng):
  from monoformer_jax.convert.monoformer_weights import stack_layers

  config = tiny_config(scan_layers=scan, remat=remat)
  params = random_params(tiny_config(), seed=seed)
  if scan:
    params = stack_layers(params, config.num_layers)
  lengths = [9, 5]
  batch = build(config, [[[("text", rng.integers(3, 97, n), True)]] for n in lengths], 12)
  batch = jax.tree.map(jnp.asarray, batch)
  model = MonoFormer(config)
  full = model.apply({"params": params}, batch, return_image=False)["logits"]
  cache = empty_cache(config, 2, 12)
  out = model.apply({"params": params}, _slice(batch, 0, 4), cache=cache, cache_index=0, return_image=False)
  np.testing.assert_allclose(out["logits"], full[:, :4], atol=1e-5)
  cache = out["cache"]
  for i in range(4, 12):
    out = model.apply({"params": params}, _slice(batch, i, i + 1), cache=cache, cache_index=i, return_image=False)
    cache = out["cache"]
    valid = np.asarray(batch["segment_ids"][:, i]) > 0
    np.testing.assert_allclose(np.asarray(out["logits"][:, 0])[valid], np.asarray(full[:, i])[valid], atol=1e-5)


@pytest.mark.parametrize("t_embed", ["adaln_before_decoder", "add_before_image_tokens"])
def test_cached_prefix_image_tokens_equal_the_full_sequence(t_embed, seed, rng):
  config = tiny_config(t_embed=t_embed)
  params = random_params(config, seed=seed)
  shape = (config.image_height, config.image_width, config.image_channels)
  prompt = rng.integers(3, 97, 6)
  batch = build(
      config,
      [[[("text", prompt, False), ("image", np.zeros(shape, np.float32), 0)]]],
      6 + config.num_patches + int(config.has_t_token),
  )
  batch = jax.tree.map(jnp.asarray, batch)
  images = jnp.asarray(rng.standard_normal((1, 1) + shape), jnp.float32)
  t = jnp.full((1, 1), 321.0)
  model = MonoFormer(config)
  full = model.apply({"params": params}, batch, images, t, return_logits=False)["image"]
  size = batch["tokens"].shape[1]
  prefix = model.apply(
      {"params": params}, _slice(batch, 0, 6), cache=empty_cache(config, 1, size), cache_index=0, return_logits=False
  )["cache"]
  for _ in range(2):  # every denoising step reuses the same prefix cache
    out = model.apply(
        {"params": params}, _slice(batch, 6, size), images, t, cache=prefix, cache_index=6, return_logits=False
    )
    np.testing.assert_allclose(out["image"], full, atol=1e-5 * max(1.0, float(jnp.abs(full).max())))


@pytest.mark.parametrize("scan", [False, True])
def test_the_decode_loop_writes_the_cache_in_place(scan, rng):
  """The compiled decode loop neither copies, transposes nor restacks the key/value cache.

  Per token it should only read each layer's slots and write one slot per layer: a copy of the
  whole cache per step made the per-token time ~3x slower at 1,024 slots (benchmarks/RESULTS.md).
  """
  import re
  from monoformer_jax.sampling import decode
  from monoformer_jax.sampling.tokens import TokenSampling

  config = tiny_config(num_layers=3, scan_layers=scan)  # cache (3, 5, 2, 48, 8): dims distinct
  params = random_params(tiny_config(num_layers=3))
  if scan:
    from monoformer_jax.convert.monoformer_weights import stack_layers

    params = stack_layers(params, config.num_layers)
  b, p, size = 5, 7, 48
  ids = jnp.asarray(rng.integers(3, 90, (b, p)), jnp.int32)
  state = decode.prefill(
      params, ids, jnp.full((b,), p, jnp.int32), jnp.arange(b), config=config, cache_size=size, max_new_tokens=8
  )
  full = tuple(state["cache"]["layers"]["k"].shape)
  assert sorted(full) == [2, 3, 5, 8, 48], full
  hlo = (
      decode.decode_until.lower(params, state, jax.random.key(0), config=config, sampling=TokenSampling())
      .compile()
      .as_text()
  )
  cache_like = {tuple(sorted(full)), tuple(sorted(full[1:])), tuple(sorted((1,) + full[1:]))}
  ops = []
  for line in hlo.splitlines():
    m = re.search(r"= f32\[([0-9,]+)\]\S* ([\w-]+)\(", line)
    if m and tuple(sorted(int(d) for d in m.group(1).split(","))) in cache_like:
      ops.append(m.group(2))
  assert "dynamic-update-slice" in ops  # the check sees the cache ops at all
  moved = sorted(op for op in ops if op in ("copy", "transpose", "concatenate"))
  assert not moved, moved
