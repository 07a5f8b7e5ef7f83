"""Cached inference vs full recomputation (the official way): per-token decode time and images/s.

    python -m benchmarks.generate [--steps 20] [--batch 8]

Model: the embedded default's shape (configs/mnist_tiny.py: d=128, 4 layers, 4/2 heads, vocab
1028, 28x28x1 in 4x4 patches = 49 image tokens), random weights, float32.

Cached decode is timed the way generation runs: inside the compiled `lax.while_loop` of
`decode.decode_until` (state donated, cache updated in place), from a prefilled prompt of `pos`
tokens. The time for n1 and for n2 tokens are taken and differenced, so prefill, dispatch and
the loop's entry cost cancel: (t(n2) - t(n1)) / (n2 - n1) is the cost of one token at positions
pos .. pos + n2. Full recomputation is one forward over all pos + 1 tokens (no cache), which is
what producing the token at `pos` costs the official way.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax import diffusion
from monoformer_jax.sampling import decode
from monoformer_jax.sampling import image as image_lib
from monoformer_jax.sampling.decode import text_batch
from monoformer_jax.sampling.tokens import TokenSampling
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.monoformer import MonoFormer, init_params


def best_time(fn, repeats):
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def cached_decode_seconds(params, config, batch, pos, cache_slots, repeats, n1=8, n2=40):
  """Seconds per token at positions pos..pos+n2 inside the compiled decode loop (differenced)."""
  rng = np.random.default_rng(pos)
  ids = jnp.asarray(rng.integers(3, config.vocab_size, (batch, pos + 1)), jnp.int32)
  lengths = jnp.full((batch,), pos + 1, jnp.int32)

  def loop_seconds(n):
    def once():
      state = jax.block_until_ready(
          decode.prefill(
              params, ids, lengths, jnp.arange(batch), config=config, cache_size=cache_slots, max_new_tokens=n
          )
      )
      t = time.perf_counter()
      out = decode.decode_until(params, state, jax.random.key(0), config=config, sampling=TokenSampling())
      jax.block_until_ready(out)
      assert int(out["num_generated"].min()) == n  # no stop token: n steps ran
      return time.perf_counter() - t

    once()  # compile
    return min(once() for _ in range(repeats))

  return (loop_seconds(n2) - loop_seconds(n1)) / (n2 - n1)


def recompute_seconds(params, config, batch, pos, repeats):
  """One forward over pos + 1 tokens (the token at `pos` the official way)."""
  model = MonoFormer(config)
  toks = jnp.ones((batch, pos + 1), jnp.int32)
  full = jax.jit(
      lambda p: model.apply(
          {"params": p},
          text_batch(toks, jnp.ones_like(toks), jnp.broadcast_to(jnp.arange(pos + 1), (batch, pos + 1))),
          return_image=False,
      )["logits"][:, -1]
  )
  return best_time(lambda: full(params), repeats)


def image_rates(params, config, batch, steps, repeats):
  rng = np.random.default_rng(0)
  prompts = [[1, *rng.integers(3, 1000, 10), 1026] for _ in range(batch)]
  obj = diffusion.make_objective("gaussian")
  kw = dict(uncond_prompt=[1, 1026], options=diffusion.ImageSampling(guidance_scale=4.0, num_steps=steps))
  cached = lambda: image_lib.sample_images(params, config, obj, prompts, **kw)  # noqa: E731
  full = lambda: image_lib.sample_images_full_recompute(params, config, obj, prompts, **kw)  # noqa: E731
  official = lambda: image_lib.sample_images_full_recompute(  # noqa: E731
      params, config, obj, prompts, with_lm_head=True, **kw
  )
  return {
      name: batch / best_time(fn, repeats)
      for name, fn in (
          ("cached prefix", cached),
          ("full recompute, no LM head", full),
          ("full recompute + LM head (official)", official),
      )
  }


def main():
  from monoformer_jax.host_memory import tune_for_xla_cpu  # pylint: disable=import-outside-toplevel

  tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--skip_images", action="store_true")
  args = ap.parse_args()
  config = ModelConfig(
      vocab_size=1028,
      hidden_size=128,
      intermediate_size=352,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      image_height=28,
      image_width=28,
      image_channels=1,
      patch_size=4,
      max_position_embeddings=1024,
  )
  params = jax.device_get(nn.unbox(init_params(config, jax.random.key(0))))
  whole = config.max_position_embeddings
  print(f"device: {jax.devices()[0].device_kind}, batch {args.batch}")
  print(
      "| position | cached, growing cache (ms/token) | its buffer | cached, one "
      f"{whole}-slot buffer (ms/token) | full recompute (ms/token) | recompute / cached |"
  )
  print("|---|---|---|---|---|---|")
  for pos in (32, 512):
    slots = decode.cache_size_for(pos + 41, whole)  # the bucket generation uses there
    grown = cached_decode_seconds(params, config, args.batch, pos, slots, args.repeats)
    fixed = cached_decode_seconds(params, config, args.batch, pos, whole, args.repeats)
    full = recompute_seconds(params, config, args.batch, pos, args.repeats)
    print(
        f"| {pos} | {grown * 1e3:.2f} | {slots} | {fixed * 1e3:.2f} | {full * 1e3:.2f} | {full / grown:.1f}x |",
        flush=True,
    )
  if args.skip_images:
    return
  rates = image_rates(params, config, args.batch, args.steps, max(2, args.repeats - 1))
  print(f"\n| {args.steps}-step DDPM + CFG 4, batch {args.batch} | images/s | vs cached |")
  print("|---|---|---|")
  base = rates["cached prefix"]
  for name, r in rates.items():
    print(f"| {name} | {r:.2f} | {base / r:.2f}x slower |" if name != "cached prefix" else f"| {name} | {r:.2f} | 1 |")


if __name__ == "__main__":
  main()
