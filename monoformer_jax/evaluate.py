"""Evaluation entry point: `python -m monoformer_jax.evaluate --workdir DIR [suite inputs]`.

Suites (`--suite mc,perplexity,mnist`; by default every suite whose input is given):
  mc          zero-shot multiple choice (HellaSwag, OBQA, WinoGrande, ARC-e/c, BoolQ, PIQA) from
              TASKS_DIR/<task>.jsonl; see evaluation/multiple_choice.py for the fields expected.
  perplexity  sliding-window perplexity and bits per byte of --text_file.
  mnist       digit FID and class accuracy of conditional samples (--samples FILE.npz with
              `images` uint8 (N, 28, 28, 1) and `labels` (N,), as `monoformer_jax.sample` writes),
              measured by the project's MNIST classifier against MNIST-5k (or --reference).
The language suites load the run's weights (EMA unless --nouse_ema) and tokenizer through
`train.checkpointing.load_for_inference`. Results go to DIR/eval/report.json and as TensorBoard
scalars (tags "eval/<suite>/...") to DIR/eval/tensorboard, at the run's latest checkpoint step.

    python -m monoformer_jax.evaluate --workdir runs/mnist_tiny --text_file held_out.txt \\
        --samples runs/mnist_tiny/samples.npz
    python -m monoformer_jax.evaluate --workdir runs/tinyllama --tasks_dir ~/commonsense --limit 500
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (config.json, checkpoints).")
_SUITE = flags.DEFINE_list("suite", [], "Suites to run: mc, perplexity, mnist (default: those "
                           "whose inputs are given).")
_TASKS_DIR = flags.DEFINE_string("tasks_dir", None, "Directory of <task>.jsonl files (mc).")
_TASKS = flags.DEFINE_list("tasks", [], "Tasks to run (default: every task file in tasks_dir).")
_LIMIT = flags.DEFINE_integer("limit", None, "At most this many examples per task.")
_TEXT_FILE = flags.DEFINE_string("text_file", None, "UTF-8 text for the perplexity suite.")
_STRIDE = flags.DEFINE_integer("stride", None, "Perplexity window stride (default: max_len).")
_MAX_CHARS = flags.DEFINE_integer("max_chars", None, "Score only the text's first characters.")
_SAMPLES = flags.DEFINE_string("samples", None, ".npz of generated digits (mnist suite).")
_REFERENCE = flags.DEFINE_string("reference", None, ".npz with `images` of real digits for the "
                                 "digit FID (default: the 5,000 MNIST-5k digits).")
_CLASSIFIER_CACHE = flags.DEFINE_string("classifier_cache", None, "Where the digit classifier "
                                        "is cached (default: ~/.cache/monoformer_jax).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Rows per scoring batch.")
_MAX_LEN = flags.DEFINE_integer("max_len", None, "Most positions per request (default: the "
                                "model's max_position_embeddings).")
_PACK_LEN = flags.DEFINE_integer("pack_len", 256, "Row length short requests are packed into.")
_ADD_BOS = flags.DEFINE_bool("add_bos", True, "Start every context with the BOS token.")
_USE_EMA = flags.DEFINE_bool("use_ema", True, "Evaluate the EMA weights.")

SUITES = ("mc", "perplexity", "mnist")


def latest_step(workdir: str) -> int:
  """The newest checkpoint step (0 if none): the TensorBoard step of the eval scalars."""
  directory = os.path.join(workdir, "checkpoints")
  steps = [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
  return max(steps, default=0)


def load_digits(path: str, need_labels: bool):
  """(images uint8 (N, 28, 28, 1), labels int (N,) or None) from an .npz; errors name the file."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such samples file {path}")
  try:
    with np.load(path) as f:
      arrays = {k: f[k] for k in f.files}
  except Exception as e:  # pylint: disable=broad-except  # zip / pickle errors of all kinds
    raise ValueError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
  images = arrays.get("images", arrays.get("arr_0"))
  if images is None:
    raise ValueError(f"{path}: no 'images' array (has {sorted(arrays)})")
  if images.ndim == 3:
    images = images[..., None]
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (28, 28, 1):
    raise ValueError(f"{path}: 'images' must be uint8 (N, 28, 28, 1), got {images.dtype} "
                     f"{images.shape}")
  labels = arrays.get("labels")
  if labels is None:
    if need_labels:
      raise ValueError(f"{path}: no 'labels' array (has {sorted(arrays)})")
    return images, None
  labels = labels.reshape(-1)
  if len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{path}: 'labels' must be {len(images)} integers, got {labels.dtype} "
                     f"{labels.shape}")
  return images, labels.astype(np.int32)


def mnist_suite(samples_path: str, reference_path: str | None, cache_dir: str | None) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from monoformer_jax.data import mnist  # pylint: disable=import-outside-toplevel
  from monoformer_jax.evaluation import digit_classifier as dc  # pylint: disable=import-outside-toplevel
  images, labels = load_digits(samples_path, need_labels=False)
  reference = (load_digits(reference_path, need_labels=False)[0] if reference_path
               else mnist.load_mnist5k()[0])
  classifier = dc.load_or_train(cache_dir)
  # FID from few samples is biased upwards; the same number of real digits calibrates it.
  real = reference[np.random.default_rng(0).permutation(len(reference))[:len(images)]]
  out = {"digit_fid": dc.digit_fid(images, reference, classifier),
         "digit_fid_real_same_size": dc.digit_fid(real, reference, classifier),
         "num_samples": int(len(images)), "num_reference": int(len(reference)),
         "classifier_heldout_accuracy": classifier.heldout_accuracy,
         "samples": samples_path}
  if labels is not None:
    predicted = classifier.classify(images)
    out["class_accuracy"] = float((predicted == labels).mean())
    out["class_accuracy_per_class"] = {
        str(c): float((predicted[labels == c] == c).mean()) for c in sorted(set(labels.tolist()))}
  return out


def _scalars(prefix: str, value, out: dict) -> None:
  """Flattens the numeric leaves of a report into {"eval/suite/...": float}."""
  if isinstance(value, dict):
    for k, v in value.items():
      _scalars(f"{prefix}/{k}", v, out)
  elif isinstance(value, (int, float)) and not isinstance(value, bool):
    out[prefix] = float(value)


def write_report(workdir: str, report: dict, step: int) -> str:
  eval_dir = os.path.join(workdir, "eval")
  os.makedirs(eval_dir, exist_ok=True)
  path = os.path.join(eval_dir, "report.json")
  with open(path + ".tmp", "w") as f:
    json.dump(report, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)
  scalars: dict = {}
  for suite in SUITES:
    if suite in report:
      _scalars(f"eval/{suite}", report[suite], scalars)
  from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  writer = SummaryWriter(os.path.join(eval_dir, "tensorboard"))
  for tag, value in sorted(scalars.items()):
    writer.add_scalar(tag, value, step)
  writer.close()
  return path


def run_evaluation(workdir: str, suites, *, tasks_dir=None, tasks=None, limit=None,
                   text_file=None, stride=None, max_chars=None, samples=None, reference=None,
                   classifier_cache=None, batch_size=16, max_len=None, pack_len=256,
                   add_bos=True, use_ema=True) -> dict:
  """Runs the suites and writes the report; returns it."""
  suites = list(suites) or [s for s, given in zip(SUITES, (tasks_dir, text_file, samples)) if given]
  unknown = sorted(set(suites) - set(SUITES))
  if unknown or not suites:
    raise ValueError(f"choose suites from {SUITES} (got {unknown or 'none'}); a suite runs by "
                     "default when its input (--tasks_dir, --text_file, --samples) is given")
  needs = {"mc": ("--tasks_dir", tasks_dir), "perplexity": ("--text_file", text_file),
           "mnist": ("--samples", samples)}
  for suite in suites:
    if not needs[suite][1]:
      raise ValueError(f"suite {suite!r} needs {needs[suite][0]}")
  start = time.time()
  report = {"workdir": os.path.abspath(workdir), "step": latest_step(workdir)}
  if "mc" in suites or "perplexity" in suites:
    # pylint: disable=import-outside-toplevel  # jax and the model load only for these suites
    from monoformer_jax.evaluation import loglikelihood, multiple_choice, perplexity
    from monoformer_jax.train.checkpointing import load_for_inference
    _, model_config, params, tokenizer = load_for_inference(workdir, use_ema=use_ema)
    scorer = loglikelihood.LoglikelihoodScorer(model_config, params, max_len=max_len,
                                               batch_size=batch_size, pack_len=pack_len)
    if "mc" in suites:
      report["mc"] = multiple_choice.evaluate_tasks(scorer, tokenizer, tasks_dir, tasks or None,
                                                    limit, add_bos)
      print(f"mc: average {report['mc']['average']:.4f} over "
            f"{len(report['mc']) - 1} tasks", flush=True)
    if "perplexity" in suites:
      report["perplexity"] = perplexity.perplexity_of_file(
          text_file, tokenizer, scorer, stride=stride, add_bos=add_bos, max_chars=max_chars)
      print(f"perplexity: {report['perplexity']['perplexity']:.3f}, "
            f"{report['perplexity']['bits_per_byte']:.4f} bits/byte", flush=True)
  if "mnist" in suites:
    report["mnist"] = mnist_suite(samples, reference, classifier_cache)
    print(f"mnist: digit FID {report['mnist']['digit_fid']:.3f}, class accuracy "
          f"{report['mnist'].get('class_accuracy', float('nan')):.4f}", flush=True)
  report["seconds"] = time.time() - start
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    print(f"report: {write_report(workdir, report, report['step'])}", flush=True)
  return report


def main(argv):
  from monoformer_jax.host_memory import tune_for_xla_cpu  # pylint: disable=import-outside-toplevel
  tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # orbax's INFO lines on restore drown the results
  try:
    run_evaluation(_WORKDIR.value, _SUITE.value, tasks_dir=_TASKS_DIR.value, tasks=_TASKS.value,
                   limit=_LIMIT.value, text_file=_TEXT_FILE.value, stride=_STRIDE.value,
                   max_chars=_MAX_CHARS.value, samples=_SAMPLES.value,
                   reference=_REFERENCE.value, classifier_cache=_CLASSIFIER_CACHE.value,
                   batch_size=_BATCH_SIZE.value, max_len=_MAX_LEN.value,
                   pack_len=_PACK_LEN.value, add_bos=_ADD_BOS.value, use_ema=_USE_EMA.value)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
