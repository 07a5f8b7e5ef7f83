"""Our image and text train steps against the same model in plain PyTorch, alternating, on this CPU.

    python benchmarks/cpu_vs_torch.py --layers 6 --hidden 256 --heads 8 --kv_heads 4 --ffn 704 \
        --vocab 1024 --latent 8 --in_channels 4 --patch 2 --batch 16 --prompt_len 12 [--rounds 6]

The shape flags are step_and_sample.py's; the PyTorch side is benchmarks/torch_monoformer.py (its
losses and gradients equal ours: tests/test_torch_monoformer.py). Each round times
`--steps_per_round` steps of each framework in turn (ours, then PyTorch, per step kind), so drift of
this machine's speed hits both alike; the first steps (compile, allocator warm-up) are timed apart.
Prints one JSON line: median seconds per step of each, and ours / theirs as a speed ratio (> 1: ours
faster), with the spread of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import step_and_sample, torch_monoformer  # noqa: E402
from monoformer_jax.host_memory import tune_for_xla_cpu  # noqa: E402


def torch_steps(args, cfg, batches: dict, params) -> dict:
  """{kind: one PyTorch step on its batch} of the same model, started from our `params`."""
  model = torch_monoformer.from_model_config(cfg)
  torch_monoformer.load_flax_params(model, params)
  trainer = torch_monoformer.TorchTrainer(model)
  generator = torch.Generator().manual_seed(0)
  start = 1 + args.prompt_len + 1
  as_long = lambda b, k: torch.tensor(b[k], dtype=torch.long)  # noqa: E731
  calls = {}
  if "img" in batches:
    b = batches["img"]
    tokens, images = as_long(b, "tokens"), torch.tensor(b["images"][:, 0])
    calls["img"] = lambda: trainer.image_step(tokens, images, start, generator)
  if "text" in batches:
    b = batches["text"]
    tokens, targets, mask = as_long(b, "tokens"), as_long(b, "targets"), torch.tensor(b["loss_mask"])
    calls["text"] = lambda: trainer.text_step(tokens, targets, mask)
  return calls


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--steps_per_round", type=int, default=5)
  own, rest = p.parse_known_args(argv)
  args = step_and_sample.parse_args(rest)
  tune_for_xla_cpu()
  cfg = step_and_sample.model_config(args)
  image_batch, text_batch = step_and_sample.make_batches(args, cfg, np.random.default_rng(0))
  skip = set(filter(None, args.skip.split(",")))
  batches = {k: b for k, b in (("img", image_batch), ("text", text_batch)) if k not in skip}
  ours, holder, n_params = step_and_sample.our_train_steps(cfg, batches)
  theirs = torch_steps(args, cfg, batches, nn.unbox(holder["state"].params))
  result = {"n_params": n_params, "row_tokens": step_and_sample.row_length(args, cfg), "first_step_s": {}}
  for kind in batches:
    for name, fn in (("jax", ours[kind]), ("torch", theirs[kind])):
      t0 = time.perf_counter()
      fn()
      fn()
      result["first_step_s"][f"{kind}_{name}"] = time.perf_counter() - t0
  for kind in batches:
    times = {"jax": [], "torch": []}
    for _ in range(own.rounds):
      for name, fn in (("jax", ours[kind]), ("torch", theirs[kind])):
        t0 = time.perf_counter()
        for _ in range(own.steps_per_round):
          fn()
        times[name].append((time.perf_counter() - t0) / own.steps_per_round)
    ratios = np.asarray(times["torch"]) / np.asarray(times["jax"])
    result[kind] = {
        "jax_s": float(np.median(times["jax"])),
        "torch_s": float(np.median(times["torch"])),
        "speed_jax_over_torch": float(np.median(times["torch"]) / np.median(times["jax"])),
        "round_ratio_min_max": [float(ratios.min()), float(ratios.max())],
    }
  result["config"] = {**vars(args), **vars(own)}
  result["threads"] = {"torch": torch.get_num_threads(), "cpus": os.cpu_count(), "jax": jax.__version__}
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
