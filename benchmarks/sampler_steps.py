"""Digit quality against sampling steps, per sampler, on a trained run (the embedded default).

    python -m monoformer_jax.main --config=configs/mnist_tiny.py --workdir=runs/mnist_tiny
    python benchmarks/sampler_steps.py --workdir=runs/mnist_tiny \
        [--samplers ddpm,ddim,dpmpp_2m] [--steps 5,10,20,50] [--num_per_class 20]

For each sampler and step count: guided class samples through the one sampler every caller uses
(`sampling/classes.py`, the run's guidance scale and CFG mode), the fraction the project's digit
classifier labels as the class asked for (and the worst class), the digit-FID against held-out
MNIST digits, and the seconds per image of a second, already compiled call. The same seed and
sample ids everywhere: every cell starts from the same noise. Writes WORKDIR/sampler_steps.json
and prints a Markdown table.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from monoformer_jax.host_memory import tune_for_xla_cpu  # noqa: E402

tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)

import numpy as np  # noqa: E402

from monoformer_jax.data import mnist  # noqa: E402
from monoformer_jax.evaluation import digit_classifier  # noqa: E402
from monoformer_jax.run import images as images_lib  # noqa: E402
from monoformer_jax.run.open import open_run  # noqa: E402
from monoformer_jax.sampling import classes  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--samplers", default="ddpm,ddim,dpmpp_2m")
  p.add_argument("--steps", default="5,10,20,50")
  p.add_argument("--num_per_class", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  run = open_run(args.workdir)
  config = run.config
  clf = digit_classifier.load_or_train()
  mnist_images, _ = mnist.load_mnist5k()
  _, held = mnist.split_indices(len(mnist_images))
  labels = np.repeat(np.arange(10), args.num_per_class)
  rows = []
  for sampler in args.samplers.split(","):
    for steps in (int(s) for s in args.steps.split(",")):
      options = run.image_sampling.replace(sampler=sampler, num_steps=steps)
      draw = lambda: classes.sample_classes(  # noqa: E731
          run.params,
          run.model_config,
          run.objective,
          run.tokenizer,
          list(mnist.CLASS_NAMES),
          labels,
          options=options,
          seed=args.seed,
          batch_size=len(labels),
      )
      draw()  # compile
      t0 = time.perf_counter()
      images = draw()
      seconds = time.perf_counter() - t0
      images = images_lib.to_uint8(images_lib.decode_images(images, config.vae.path, config.vae.scale))
      scores = digit_classifier.digit_scores(images, labels, mnist_images[held], clf)
      rows.append(
          {
              "sampler": sampler,
              "steps": steps,
              "digit_accuracy": scores["accuracy"],
              "worst_class": min(scores["per_class"]),
              "digit_fid": scores["fid"],
              "seconds_per_image": seconds / len(labels),
          }
      )
      print(json.dumps(rows[-1]), flush=True)
  with open(os.path.join(args.workdir, "sampler_steps.json"), "w") as f:
    json.dump(
        {"guidance_scale": config.sampling.guidance_scale, "cfg_mode": config.sampling.cfg_mode, "rows": rows},
        f,
        indent=2,
    )
  print("| sampler | steps | digits recognised | worst class | digit-FID | ms / image |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(
        f"| {r['sampler']} | {r['steps']} | {100 * r['digit_accuracy']:.1f}% | {100 * r['worst_class']:.0f}% "
        f"| {r['digit_fid']:.1f} | {1000 * r['seconds_per_image']:.1f} |"
    )


if __name__ == "__main__":
  main()
