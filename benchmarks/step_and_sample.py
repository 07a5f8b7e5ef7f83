"""One shape, three timings: the image train step, the text train step, guided sampling.

    python benchmarks/step_and_sample.py --layers 6 --hidden 256 --heads 8 --kv_heads 4 --ffn 704 \
        --vocab 1024 --latent 8 --in_channels 4 --patch 2 --batch 16 --prompt_len 12 --steps 20 \
        --cfg_scale 4 [--attention auto --dtype float32 --sampler ddpm --pad_to 1]

prints one JSON line: `train_img_s`, `train_text_s`, `sample_s` (medians after warm-up), the first
calls apart in `compile_s`, `n_params`, the tokens per row and, with --peak_tflops, the image
step's model FLOP utilisation. Rows are the official layout `<s> P <|im_start|> img <|im_end|> \\n
</s>` (the image step: learned-sigma mse + vb, AdamW lr 1e-4, no clipping, our EMA); the text step
trains an LM on rows of the same length; sampling runs `--steps` respaced DDPM steps with guidance
on the first three channels (`official_first3`) for `--batch` prompts, the prompt prefix cached.
The same flags run on any backend (CPU, GPU: see RESULTS.md for both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from monoformer_jax import batch as batch_lib  # noqa: E402
from monoformer_jax import diffusion  # noqa: E402
from monoformer_jax.host_memory import tune_for_xla_cpu  # noqa: E402
from monoformer_jax.model.config import ModelConfig  # noqa: E402
from monoformer_jax.run import sharding, state as state_lib  # noqa: E402
from monoformer_jax.sampling.image import sample_images  # noqa: E402
from monoformer_jax.diffusion.options import ImageSampling  # noqa: E402
from monoformer_jax.train import steps  # noqa: E402

BOS, EOS, IMS, IME, NEWLINE = 1, 2, 3, 4, 5  # any ids of a random model's vocabulary


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  for name, default in (
      ("layers", 6),
      ("hidden", 256),
      ("heads", 8),
      ("kv_heads", 4),
      ("ffn", 704),
      ("vocab", 1024),
      ("latent", 8),
      ("in_channels", 4),
      ("patch", 2),
      ("batch", 16),
      ("prompt_len", 12),
      ("steps", 20),
      ("repeats", 10),
      ("warmup", 2),
      ("pad_to", 1),
  ):
    p.add_argument(f"--{name}", type=int, default=default)
  p.add_argument("--cfg_scale", type=float, default=4.0)
  p.add_argument("--attention", default="auto", help="model.attention: auto | einsum | xla | cudnn")
  p.add_argument("--dtype", default="float32", help="compute dtype (parameters stay float32)")
  p.add_argument("--sampler", default="ddpm")
  p.add_argument("--remat", default="none")
  p.add_argument("--skip", default="", help="comma list of parts not to time: img,text,sample")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="the chip's peak, for MFU")
  return p.parse_args(argv)


def model_config(args) -> ModelConfig:
  return ModelConfig(
      vocab_size=args.vocab,
      hidden_size=args.hidden,
      intermediate_size=args.ffn,
      num_layers=args.layers,
      num_heads=args.heads,
      num_kv_heads=args.kv_heads,
      image_height=args.latent,
      image_width=args.latent,
      image_channels=args.in_channels,
      patch_size=args.patch,
      max_position_embeddings=max(2048, 4 * (args.prompt_len + 8 + (args.latent // args.patch) ** 2)),
      dtype=args.dtype,
      attention=args.attention,
      remat=args.remat,
  )


def row_length(args, cfg: ModelConfig) -> int:
  length = 1 + args.prompt_len + 1 + cfg.num_patches + 3
  return -(-length // args.pad_to) * args.pad_to


def make_batches(args, cfg: ModelConfig, rng) -> tuple[dict, dict]:
  """(image batch, text batch), both (batch, row_length) tokens."""
  seq = row_length(args, cfg)
  shape = (cfg.image_height, cfg.image_width, cfg.image_channels)
  image = batch_lib.empty_batch(args.batch, seq, 1, shape)
  text = batch_lib.empty_batch(args.batch, seq, 1, shape)
  for r in range(args.batch):
    prompt = rng.integers(8, args.vocab, args.prompt_len)
    builder = batch_lib.RowBuilder(image, r, cfg.num_patches, cfg.has_t_token)
    builder.add(
        [
            ("text", np.concatenate([[BOS], prompt, [IMS]]), False),
            ("image", rng.standard_normal(shape).astype(np.float32), None),
            ("text", np.asarray([IME, NEWLINE, EOS]), True),
        ]
    )
    builder = batch_lib.RowBuilder(text, r, cfg.num_patches, cfg.has_t_token)
    builder.add([("text", rng.integers(8, args.vocab, seq), True)])
  return image, text


def timed(fn, warmup: int, repeats: int) -> tuple[float, float]:
  """(first call's seconds, median of `repeats` calls after `warmup` more)."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return first, float(np.median(times))


def image_step_flops(cfg: ModelConfig, n_params: int, batch: int, seq: int) -> float:
  """Model FLOPs of one image train step (forward + backward): 6 x parameters x tokens for the
  matmuls (not the embedding table, a gather, nor the LM head, which the image step skips) + the
  attention scores and mixing, 12 x layers x heads x head_dim x seq^2 per row (the whole square:
  the dense kernels compute it)."""
  matmul_params = n_params - 2 * cfg.vocab_size * cfg.hidden_size
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * seq * seq
  return float(6 * matmul_params * batch * seq + attention * batch)


def our_train_steps(cfg: ModelConfig, batches: dict) -> tuple[dict, dict, int]:
  """({kind: one blocking step on its batch}, holder of the shared state, parameter count) for
  kinds 'img' / 'text' in `batches`: the official image step, an LM step, AdamW lr 1e-4, our EMA."""
  opt = state_lib.make_optimizer(
      types.SimpleNamespace(
          learning_rate=1e-4,
          schedule="constant",
          warmup_steps=0,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          weight_decay=0.0,
          grad_clip=0.0,
      )
  )
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  objective = diffusion.make_objective("gaussian", learn_sigma=True)
  state, _, shardings = state_lib.create_train_state(cfg, opt, jax.random.key(0), mesh, rules)
  n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
  holder = {"state": state}
  calls = {}
  for kind, batch in batches.items():
    fn = steps.make_train_step("diffusion" if kind == "img" else "ar", cfg, objective, opt, lm_weight=1.0)
    step = steps.compile_step(fn, shardings, mesh, rules, batch)
    gb = sharding.global_batch(batch, mesh)

    def one(step=step, gb=gb):
      holder["state"], metrics = step(holder["state"], gb, jax.random.key(1))
      jax.block_until_ready(metrics["loss"])

    calls[kind] = one
  return calls, holder, n_params


def run(args) -> dict:
  skip = set(filter(None, args.skip.split(",")))
  cfg = model_config(args)
  rng = np.random.default_rng(0)
  image_batch, text_batch = make_batches(args, cfg, rng)
  batches = {k: b for k, b in (("img", image_batch), ("text", text_batch)) if k not in skip}
  calls, holder, n_params = our_train_steps(cfg, batches)
  objective = diffusion.make_objective("gaussian", learn_sigma=True)
  result = {"n_params": n_params, "row_tokens": row_length(args, cfg), "compile_s": {}}
  for kind, one in calls.items():
    result["compile_s"][kind], result[f"train_{kind}_s"] = timed(one, args.warmup, args.repeats)

  if "sample" not in skip:
    params = holder["state"].params
    prompts = [[BOS, *rng.integers(8, args.vocab, args.prompt_len), IMS] for _ in range(args.batch)]

    def draw():
      sample_images(
          params,
          cfg,
          objective,
          prompts,
          uncond_prompt=[BOS, IMS],
          options=ImageSampling(
              guidance_scale=args.cfg_scale, cfg_mode="official_first3", sampler=args.sampler, num_steps=args.steps
          ),
          rng=jax.random.key(2),
      )

    result["compile_s"]["sample"], result["sample_s"] = timed(draw, 1, max(3, args.repeats // 3))

  if args.peak_tflops and "train_img_s" in result:
    flops = image_step_flops(cfg, n_params, args.batch, result["row_tokens"])
    result["img_step_tflops"] = flops / result["train_img_s"] / 1e12
    result["img_step_mfu"] = result["img_step_tflops"] / args.peak_tflops
  result["config"] = vars(args)
  result["backend"] = {
      "platform": jax.default_backend(),
      "device": jax.devices()[0].device_kind,
      "jax": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  return result


def main(argv=None):
  args = parse_args(argv)
  tune_for_xla_cpu()  # CPU only, before the first computation (see host_memory.py)
  print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
  main()
