"""Quality of the embedded default run: digit accuracy of guided samples, digit-FID, text perplexity.

    python -m monoformer_jax.main --config=configs/mnist_tiny.py --workdir=runs/mnist_tiny
    python benchmarks/mnist_quality.py --workdir=runs/mnist_tiny [--num_per_class 20]

Samples `num_per_class` digits per class with the run's EMA weights and its config's default
sampler, steps and guidance (what `python -m monoformer_jax.sample` uses), classifies them with the
project's digit classifier (trained on MNIST-5k by monoformer_jax.evaluation.digit_classifier,
cached), and reports the fraction labelled as the class asked for and the Frechet distance in the
classifier's feature space against held-out MNIST digits. Text: held-out pydoc perplexity of the
model against unigram and bigram models fitted with the same tokenizer on the training passages.
Reading digits (runs with `understand` steps, e.g. mnist_tiny.py:all_in_one): the run's question
about every held-out digit, answered greedily through the KV cache; an answer counts as right when
it names the digit's class and no other (as a word or a numeral). Writes WORKDIR/quality.json (`--out`).
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from monoformer_jax.host_memory import tune_for_xla_cpu  # noqa: E402

tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import text_baselines  # noqa: E402
from monoformer_jax.data import mnist  # noqa: E402
from monoformer_jax.data.sources import PydocSource  # noqa: E402
from monoformer_jax.evaluation import digit_classifier  # noqa: E402
from monoformer_jax.run import images as images_lib  # noqa: E402
from monoformer_jax.run.input_encoder import build_input_encoder  # noqa: E402
from monoformer_jax.run.open import open_run  # noqa: E402
from monoformer_jax.sampling import classes  # noqa: E402
from monoformer_jax.sampling import describe  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--num_per_class", type=int, default=20)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--guidance_scale", type=float, default=None, help="default: the run's config.sampling")
  p.add_argument("--out", default="quality.json", help="written in --workdir")
  args = p.parse_args()
  run = open_run(args.workdir)
  config, model_config, params, tok = run.config, run.model_config, run.params, run.tokenizer
  options = run.image_sampling.replace(guidance_scale=args.guidance_scale)
  labels = np.repeat(np.arange(10), args.num_per_class)
  t0 = time.perf_counter()
  images = classes.sample_classes(
      params, model_config, run.objective, tok, list(mnist.CLASS_NAMES), labels, options=options, seed=args.seed
  )
  sample_s = time.perf_counter() - t0
  images = images_lib.to_uint8(images_lib.decode_images(images, config.vae.path, config.vae.scale))
  clf = digit_classifier.load_or_train()
  mnist_images, mnist_labels = mnist.load_mnist5k()
  _, held = mnist.split_indices(len(mnist_images))
  scores = digit_classifier.digit_scores(images, labels, mnist_images[held], clf)
  report = {
      "sampling": {**dataclasses.asdict(options), "num_samples": int(len(labels)), "seconds": sample_s},
      "digit_accuracy": scores["accuracy"],
      "digit_accuracy_per_class": scores["per_class"],
      "classifier_heldout_accuracy": float(getattr(clf, "heldout_accuracy", float("nan"))),
      "digit_fid_vs_heldout": scores["fid"],
  }
  train = PydocSource(split="train")
  train_texts = [train[i]["text"] for i in range(len(train))]
  hold = PydocSource(split="holdout")
  test_texts = [hold[i]["text"] for i in range(len(hold))]
  seq_len = config.data.text_seq_len
  train_ids = text_baselines.passages_ids(tok, train_texts, seq_len)
  test_ids = text_baselines.passages_ids(tok, test_texts, seq_len)
  uni, bi, n = text_baselines.unigram_bigram_nll(train_ids, test_ids, tok.vocab_size)
  model_nll, n_model = text_baselines.model_nll(model_config, params, test_ids, seq_len)
  assert n_model == n, (n_model, n)
  report["text"] = {
      "heldout_tokens": n,
      "model_ppl": math.exp(model_nll),
      "unigram_ppl": math.exp(uni),
      "bigram_ppl": math.exp(bi),
  }
  if model_config.input_feature_dim:
    report["reading"] = reading_accuracy(run, mnist_images[held], mnist_labels[held])
  summary = os.path.join(args.workdir, "train_summary.json")
  if os.path.exists(summary):
    report["train_wall_clock_s"] = json.load(open(summary))["wall_clock_s"]
  report["device"] = jax.devices()[0].device_kind
  with open(os.path.join(args.workdir, args.out), "w") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report, indent=2))


def reading_accuracy(run, images: np.ndarray, labels: np.ndarray, chunk: int = 128) -> dict:
  """Answers to the run's question about `images`, scored against `labels`."""
  encoder = build_input_encoder(run.config, run.model_config)
  question = run.config.data.understand_question
  t0 = time.perf_counter()
  answers = []
  for start in range(0, len(images), chunk):
    answers += describe.describe_images(
        run.params, run.model_config, run.tokenizer, encoder, images[start : start + chunk], question
    )
  seconds = time.perf_counter() - t0
  named = np.asarray(describe.answer_names(answers, list(mnist.CLASS_NAMES)))
  return {
      "question": question,
      "num_images": int(len(images)),
      "answer_accuracy": float((named == labels).mean()),
      "answer_accuracy_per_class": [float((named[labels == c] == c).mean()) for c in range(10)],
      "answers_naming_no_single_class": int((named < 0).sum()),
      "examples": answers[:10],
      "seconds": seconds,
  }


if __name__ == "__main__":
  main()
