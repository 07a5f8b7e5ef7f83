"""Our AR train step vs transformers' LlamaForCausalLM (PyTorch) on the same CPU, same batch.

    python benchmarks/train_step.py [--layers 6 --width 256 --seq 256 --batch 8 --rounds 5]

Both train the same-sized LLaMA (AdamW, fp32) on the same random tokens. Timing alternates between
the two frameworks round by round so machine noise hits both alike; compile / warm-up steps are
timed separately. Prints a JSON line with tokens/s of each and the ratio.
"""

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from monoformer_jax import batch as batch_lib  # noqa: E402
from monoformer_jax.model.config import ModelConfig  # noqa: E402
from monoformer_jax.run import sharding, state as state_lib  # noqa: E402
from monoformer_jax.train import steps  # noqa: E402


def build_ours(args, tokens):
  cfg = ModelConfig(
      vocab_size=args.vocab,
      hidden_size=args.width,
      intermediate_size=args.width * 4,
      num_layers=args.layers,
      num_heads=args.width // 64,
      num_kv_heads=args.width // 64,
      image_height=4,
      image_width=4,
      image_channels=1,
      patch_size=2,
  )
  opt_cfg = ml_collections.ConfigDict(
      dict(
          learning_rate=1e-4,
          schedule="constant",
          warmup_steps=0,
          decay_steps=0,
          final_lr_fraction=0.0,
          b1=0.9,
          b2=0.999,
          eps=1e-8,
          weight_decay=0.0,
          grad_clip=0.0,
          grad_accum_steps=1,
      )
  )
  opt = state_lib.make_optimizer(opt_cfg)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  rules = sharding.DEFAULT_RULES
  st, _, shardings = state_lib.create_train_state(cfg, opt, jax.random.key(0), mesh, rules)
  rows = [[[("text", tokens[r], True)]] for r in range(tokens.shape[0])]
  batch = batch_lib.empty_batch(len(rows), tokens.shape[1], 1, (4, 4, 1))
  for r, samples in enumerate(rows):
    builder = batch_lib.RowBuilder(batch, r, cfg.num_patches, cfg.has_t_token)
    for sample in samples:
      builder.add(sample)
  fn = steps.make_train_step("ar", cfg, None, opt)
  step = steps.compile_step(fn, shardings, mesh, rules, batch)
  gb = sharding.global_batch(batch, mesh)
  holder = {"state": st}

  def run():
    holder["state"], m = step(holder["state"], gb, jax.random.key(1))
    jax.block_until_ready(m["loss"])
    return float(m["loss"])

  return run


def build_torch(args, tokens):
  import torch
  import transformers

  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=args.vocab,
      hidden_size=args.width,
      intermediate_size=args.width * 4,
      num_hidden_layers=args.layers,
      num_attention_heads=args.width // 64,
      num_key_value_heads=args.width // 64,
      tie_word_embeddings=False,
      attn_implementation="sdpa",
  )
  model = transformers.LlamaForCausalLM(cfg)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  ids = torch.tensor(tokens, dtype=torch.long)

  def run():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return float(loss)

  return run


def main():
  from monoformer_jax.host_memory import tune_for_xla_cpu  # pylint: disable=import-outside-toplevel

  tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
  p = argparse.ArgumentParser()
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--width", type=int, default=256)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps_per_round", type=int, default=5)
  args = p.parse_args()
  tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq))
  t0 = time.perf_counter()
  ours = build_ours(args, tokens)
  ours()
  compile_ours = time.perf_counter() - t0
  t0 = time.perf_counter()
  theirs = build_torch(args, tokens)
  theirs()
  warm_torch = time.perf_counter() - t0
  times = {"jax": [], "torch": []}
  for _ in range(args.rounds):
    for name, fn in (("jax", ours), ("torch", theirs)):
      t = time.perf_counter()
      for _ in range(args.steps_per_round):
        fn()
      times[name].append((time.perf_counter() - t) / args.steps_per_round)
  tok = args.batch * args.seq
  res = {
      name: {"median_step_s": float(np.median(v)), "tokens_per_s": tok / float(np.median(v))}
      for name, v in times.items()
  }
  res["jax"]["first_step_incl_compile_s"] = compile_ours
  res["torch"]["first_step_incl_build_s"] = warm_torch
  res["speedup_jax_over_torch"] = res["jax"]["tokens_per_s"] / res["torch"]["tokens_per_s"]
  res["config"] = vars(args)
  res["threads"] = {"torch": __import__("torch").get_num_threads(), "cpus": os.cpu_count()}
  print(json.dumps(res))


if __name__ == "__main__":
  main()
