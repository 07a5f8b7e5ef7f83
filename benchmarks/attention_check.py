"""Does an attention implementation compute our mask? Forward and gradients against float32 einsum.

    python benchmarks/attention_check.py [--impls einsum,xla,cudnn --dtype bfloat16]

Builds rows with every mask feature (packed samples, two images in a row, a text-only sample,
padding), runs the model forward (logits, image output) and the mixed loss's gradients with each
implementation in `--dtype`, and prints one JSON line: per implementation the largest error
relative to the largest reference value, beside the same for the einsum in `--dtype` (the rounding
floor of that dtype). On a GPU this is how cuDNN's fused attention is checked; the CPU tests check
`xla` against `einsum` in float32 (tests/test_attention_impl.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from monoformer_jax import batch as batch_lib  # noqa: E402
from monoformer_jax import diffusion  # noqa: E402
from monoformer_jax.model.config import ModelConfig  # noqa: E402
from monoformer_jax.model.monoformer import MonoFormer, init_params  # noqa: E402
from monoformer_jax.train.steps import batch_normalisers, make_loss_fn  # noqa: E402


def mixed_batch(cfg: ModelConfig, rng, seq_len: int) -> dict:
  shape = (cfg.image_height, cfg.image_width, cfg.image_channels)

  def text(n, trained=True):
    return ("text", rng.integers(8, cfg.vocab_size, n), trained)

  def image(label):
    return ("image", rng.standard_normal(shape).astype(np.float32), label)

  rows = [
      [[text(5, False), image(1), text(3)], [text(9)]],  # packed: an image sample, a text sample
      [[text(4, False), image(0), text(4), image(2), text(2)]],  # two images in one row
      [[text(12)], [text(3, False), image(2), text(2)]],
  ]
  batch = batch_lib.empty_batch(len(rows), seq_len, 2, shape)
  for r, samples in enumerate(rows):
    builder = batch_lib.RowBuilder(batch, r, cfg.num_patches, cfg.has_t_token)
    for s in samples:
      builder.add(s)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def outputs(cfg: ModelConfig, params, batch, timesteps) -> dict:
  out = MonoFormer(cfg).apply({"params": params}, batch, batch["images"], timesteps)
  loss_fn = make_loss_fn("mixed", cfg, diffusion.make_objective("gaussian"), 1.0, 0.5)
  norms = batch_normalisers(batch)
  rows = jnp.arange(batch["tokens"].shape[0])
  grads = jax.grad(lambda p: loss_fn(p, batch, jax.random.key(3), norms, rows)[0])(params)
  # Padding positions read no key in our mask; what an implementation puts there is never read.
  real = batch["segment_ids"] > 0
  return {
      "logits": out["logits"],
      "logits_real": out["logits"] * real[..., None],
      "image": out["image"],
      "grads": grads,
  }


def relative_error(a, ref) -> float:
  la, lr = jax.tree.leaves(a), jax.tree.leaves(ref)
  return max(
      float(jnp.abs(x.astype(jnp.float32) - y).max() / jnp.maximum(jnp.abs(y).max(), 1e-12)) for x, y in zip(la, lr)
  )


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--impls", default="einsum,xla,cudnn")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--seq_len", type=int, default=64)
  p.add_argument("--bidirectional_image", type=int, default=1)
  args = p.parse_args(argv)
  cfg = ModelConfig(
      vocab_size=512,
      hidden_size=256,
      intermediate_size=512,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      image_height=8,
      image_width=8,
      image_channels=4,
      patch_size=2,
      num_classes=3,
      bidirectional_image=bool(args.bidirectional_image),
  )
  rng = np.random.default_rng(0)
  batch = mixed_batch(cfg, rng, args.seq_len)
  # Every leaf moved off its initial value (the zero-initialised image layers too).
  params = nn.unbox(init_params(cfg, jax.random.key(0)))
  params = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape), params)
  timesteps = jnp.asarray(rng.integers(0, 1000, batch["image_mask"].shape))
  ref = outputs(cfg.replace(attention="einsum"), params, batch, timesteps)
  result = {"backend": jax.default_backend(), "dtype": args.dtype, "seq_len": args.seq_len, "errors": {}}
  for impl in args.impls.split(","):
    try:
      got = outputs(cfg.replace(attention=impl, dtype=args.dtype), params, batch, timesteps)
      result["errors"][impl] = {k: relative_error(got[k], ref[k]) for k in ref}
    except Exception as e:  # pylint: disable=broad-except  # one implementation's refusal is a result
      result["errors"][impl] = f"{type(e).__name__}: {str(e)[:300]}"
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
