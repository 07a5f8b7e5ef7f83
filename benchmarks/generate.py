"""Cached inference vs full recomputation (the official way): per-token decode time and images/s.

    python -m benchmarks.generate [--steps 20] [--batch 8]

Model: the embedded default's shape (configs/mnist_tiny.py: d=128, 4 layers, 4/2 heads, vocab
1028, 28x28x1 in 4x4 patches = 49 image tokens), random weights, float32.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax import diffusion
from monoformer_jax.inference import image as image_lib
from monoformer_jax.inference.cache import init_cache
from monoformer_jax.inference.decode import text_batch
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.monoformer import MonoFormer, init_params
import flax.linen as nn


def best_time(fn, repeats):
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def decode_times(params, config, batch, positions, repeats):
  model = MonoFormer(config)
  rows = []
  for pos in positions:
    size = pos + 1
    cache = init_cache(config, batch, size)
    cache["meta"]["segment_ids"] = cache["meta"]["segment_ids"].at[:, :pos].set(1)
    tok = jnp.ones((batch, 1), jnp.int32)
    cached = jax.jit(lambda p, c: model.apply(
        {"params": p}, text_batch(tok, jnp.ones_like(tok), jnp.full((batch, 1), pos)),
        cache=c, cache_index=pos, return_image=False)["logits"][:, -1])
    toks = jnp.ones((batch, size), jnp.int32)
    full = jax.jit(lambda p: model.apply(
        {"params": p}, text_batch(toks, jnp.ones_like(toks),
                                  jnp.broadcast_to(jnp.arange(size), (batch, size))),
        return_image=False)["logits"][:, -1])
    rows.append((pos, best_time(lambda: cached(params, cache), repeats),
                 best_time(lambda: full(params), repeats)))
  return rows


def image_rates(params, config, batch, steps, repeats):
  rng = np.random.default_rng(0)
  prompts = [[1, *rng.integers(3, 1000, 10), 1026] for _ in range(batch)]
  obj = diffusion.make_objective("gaussian")
  kw = dict(uncond_prompt=[1, 1026], guidance_scale=4.0, num_steps=steps)
  cached = lambda: image_lib.sample_images(params, config, obj, prompts, **kw)  # noqa: E731
  full = lambda: image_lib.sample_images_full_recompute(params, config, obj, prompts, **kw)  # noqa: E731
  official = lambda: image_lib.sample_images_full_recompute(  # noqa: E731
      params, config, obj, prompts, with_lm_head=True, **kw)
  return {name: batch / best_time(fn, repeats) for name, fn in
          (("cached prefix", cached), ("full recompute, no LM head", full),
           ("full recompute + LM head (official)", official))}


def main():
  from monoformer_jax.host_memory import tune_for_xla_cpu  # pylint: disable=import-outside-toplevel
  tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()
  config = ModelConfig(vocab_size=1028, hidden_size=128, intermediate_size=352, num_layers=4,
                       num_heads=4, num_kv_heads=2, image_height=28, image_width=28,
                       image_channels=1, patch_size=4, max_position_embeddings=1024)
  params = jax.device_get(nn.unbox(init_params(config, jax.random.key(0))))
  print(f"device: {jax.devices()[0].device_kind}, batch {args.batch}")
  print("| position | cached decode (ms/token) | full recompute (ms/token) | ratio |")
  print("|---|---|---|---|")
  for pos, c, f in decode_times(params, config, args.batch, (32, 512), args.repeats):
    print(f"| {pos} | {c * 1e3:.2f} | {f * 1e3:.2f} | {f / c:.1f}x |")
  rates = image_rates(params, config, args.batch, args.steps, max(2, args.repeats // 2))
  print(f"\n| {args.steps}-step DDPM + CFG 4, batch {args.batch} | images/s | vs cached |")
  print("|---|---|---|")
  base = rates["cached prefix"]
  for name, r in rates.items():
    print(f"| {name} | {r:.2f} | {base / r:.2f}x slower |" if name != "cached prefix"
          else f"| {name} | {r:.2f} | 1 |")


if __name__ == "__main__":
  main()
