"""Do generated digits follow the attribute a caption asks for? (configs/mnist_tiny.py:captions)

    python benchmarks/caption_following.py --workdir RUN [--per_class 10 --seed 0]

For each class and each of `--per_class` noise seeds it draws matched pairs, the same noise under
two prompts that differ in one attribute: "thin seven" / "bold seven" and "seven leaning left" /
"seven leaning right". A pair follows its caption when the measured attribute of the two samples
(data/captions.py: ink mass, slant from the second moments) differs in the asked direction. Prints
one JSON line: the fraction of pairs that do per attribute (and per class), the mean measured
difference beside the training digits' spread, and the fraction of all samples the project's digit
classifier reads as the class asked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from monoformer_jax.host_memory import tune_for_xla_cpu  # noqa: E402

tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)

import numpy as np  # noqa: E402

from monoformer_jax.data import captions, mnist  # noqa: E402
from monoformer_jax.evaluation import digit_classifier  # noqa: E402
from monoformer_jax.inference.api import InferenceModel  # noqa: E402
from monoformer_jax.run import images as images_lib  # noqa: E402

# attribute -> (measure, the two prompts' words (kwargs of captions.prompt), low first)
ATTRIBUTES = {
    "weight": (captions.ink_mass, ({"weight": "thin"}, {"weight": "bold"})),
    "slant": (captions.slant, ({"side": "leaning left"}, {"side": "leaning right"})),
}


def draw(model: InferenceModel, prompts: list[str], seed: int, guidance_scale=None) -> np.ndarray:
  """uint8 (N, H, W, C) digits; prompt i's noise is fold_in(seed, i) whatever the prompt."""
  images = model.decode(model.text_to_image(prompts, seed=seed, guidance_scale=guidance_scale))
  return images_lib.to_uint8(images)


def follow(model: InferenceModel, per_class: int, seed: int, classifier, guidance_scale=None) -> dict:
  labels = np.repeat(np.arange(10), per_class)
  names = [mnist.CLASS_NAMES[c] for c in labels]
  result, read = {}, []
  for attribute, (measure, (low, high)) in ATTRIBUTES.items():
    lo_images = draw(model, [captions.prompt(n, **low) for n in names], seed, guidance_scale)
    hi_images = draw(model, [captions.prompt(n, **high) for n in names], seed, guidance_scale)
    diff = measure(hi_images) - measure(lo_images)
    read += [classifier.classify(lo_images) == labels, classifier.classify(hi_images) == labels]
    result[attribute] = {
        "pairs_following": float((diff > 0).mean()),
        "pairs_following_per_class": [float((diff[labels == c] > 0).mean()) for c in range(10)],
        "mean_difference": float(diff.mean()),
        "pairs": int(len(diff)),
    }
  # The scale of those differences: what separates the training digits' first and last thirds.
  images, digit_labels = mnist.load_mnist5k()
  train, _ = mnist.split_indices(len(digit_labels))
  for attribute, (measure, _) in ATTRIBUTES.items():
    values = measure(images[train])
    result[attribute]["training_tercile_gap"] = float(np.quantile(values, 5 / 6) - np.quantile(values, 1 / 6))
  result["class_accuracy"] = float(np.concatenate(read).mean())
  return result


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--per_class", type=int, default=10)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--guidance_scale", type=float, default=None, help="default: the run's sampling.guidance_scale")
  args = p.parse_args(argv)
  model = InferenceModel.from_workdir(args.workdir)
  report = follow(model, args.per_class, args.seed, digit_classifier.load_or_train(), args.guidance_scale)
  report["workdir"], report["per_class"], report["seed"] = args.workdir, args.per_class, args.seed
  report["guidance_scale"] = args.guidance_scale or model.image_sampling.guidance_scale
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  main()
