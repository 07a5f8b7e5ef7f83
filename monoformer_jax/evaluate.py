"""Evaluation entry point: `python -m monoformer_jax.evaluate --workdir DIR --config.eval.FIELD=...`.

What to evaluate is `config.eval` (defaults and every field: monoformer_jax/evaluation/eval_config.py;
`--config=FILE.py` loads another config of that shape). Suites (`--config.eval.suite=mc,perplexity`;
by default every suite whose input is given):
  mc          zero-shot multiple choice (HellaSwag, OBQA, WinoGrande, ARC-e/c, BoolQ, PIQA) from
              tasks_dir/<task>.jsonl; see evaluation/multiple_choice.py for the fields expected.
  perplexity  sliding-window perplexity and bits per byte of text_file.
  mnist       digit FID and class accuracy of conditional samples (`samples`: an .npz with
              `images` uint8 (N, 28, 28, 1) and `labels` (N,), as `monoformer_jax.sample` writes, or
              a `fid_samples` directory), measured by the project's MNIST classifier against
              MNIST-5k (or digit_reference).
  fid         FID and Inception Score of `samples` (uint8 (N, H, W, 3 or 1)) with the FID Inception
              from inception_weights against `reference` (ADM .npz with mu/sigma or arr_0, or an
              image folder).
The language suites load the run's weights (EMA unless use_ema=false) and tokenizer through
`train.checkpointing.load_for_inference`; the image suites need no checkpoint. Results go to
DIR/eval/report.json and as TensorBoard scalars (tags "eval/<suite>/...") to DIR/eval/tensorboard,
at the run's latest checkpoint step (0 without checkpoints).

    python -m monoformer_jax.evaluate --workdir runs/mnist_tiny \\
        --config.eval.text_file=held_out.txt --config.eval.samples=runs/mnist_tiny/samples.npz
    python -m monoformer_jax.evaluate --workdir runs/tinyllama \\
        --config.eval.tasks_dir=~/commonsense --config.eval.limit=500
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaluation",
                               "eval_config.py")
# The default file is put on the command line by `_with_default_config` rather than given as the
# flag's default: absl parses a default when the flag is defined, at import, where a misspelt
# --config.eval.FIELD would raise a traceback instead of a flags error naming the field.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Evaluation config file (default: the package's evaluation/eval_config.py); "
    "override fields with --config.eval.FIELD=VALUE.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (config.json, checkpoints); "
                               "the report goes to WORKDIR/eval.")

SUITES = ("mc", "perplexity", "mnist", "fid")


def latest_step(workdir: str) -> int:
  """The newest checkpoint step (0 if none): the TensorBoard step of the eval scalars."""
  from monoformer_jax.train.checkpointing import step_dirs  # pylint: disable=import-outside-toplevel
  return max(step_dirs(workdir), default=0)


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


def _names(value: str) -> list[str]:
  return [v.strip() for v in value.split(",") if v.strip()]


def _path(value: str) -> str:
  # `--config.eval.tasks_dir=~/x` reaches us unexpanded: the shell expands ~ only at a word's start.
  return os.path.expanduser(value) if value else ""


def choose_suites(e) -> list[str]:
  """The suites to run for config.eval `e`; errors name the field that is missing."""
  suites = _names(e.suite)
  if not suites:
    given = {"mc": e.tasks_dir, "perplexity": e.text_file, "fid": e.inception_weights,
             "mnist": e.samples and not e.inception_weights}
    suites = [s for s in SUITES if given[s]]
  unknown = sorted(set(suites) - set(SUITES))
  if unknown or not suites:
    raise ValueError(f"choose suites from {', '.join(SUITES)} with config.eval.suite (got "
                     f"{', '.join(unknown) or 'none'}); by default a suite runs when its input "
                     "(config.eval.tasks_dir, text_file, samples, inception_weights) is given")
  needs = {"mc": ("tasks_dir",), "perplexity": ("text_file",), "mnist": ("samples",),
           "fid": ("samples", "inception_weights", "reference")}
  for suite in suites:
    for field in needs[suite]:
      if not e[field]:
        raise ValueError(f"suite {suite!r} needs config.eval.{field}")
  return list(dict.fromkeys(suites))  # in the order given, once each


def run_evaluation(workdir: str, config) -> dict:
  """Runs the suites of `config.eval` (a config like eval_config.get_config()) and writes the
  report; returns it. Under jax.distributed every process runs the language suites (each on its
  local devices) and only process 0 the image suites, whose numbers do not depend on the process."""
  import jax  # pylint: disable=import-outside-toplevel
  if "eval" not in config:
    raise ValueError(f"not an evaluation config: no 'eval' section (has {sorted(config)}); see "
                     "monoformer_jax/evaluation/eval_config.py")
  e = config.eval
  suites = choose_suites(e)
  start = time.time()
  report = {"workdir": os.path.abspath(workdir), "step": latest_step(workdir),
            "config": e.to_dict()}
  if "mc" in suites or "perplexity" in suites:
    # pylint: disable=import-outside-toplevel  # the model loads only for these suites
    from monoformer_jax.evaluation import loglikelihood, multiple_choice, perplexity
    from monoformer_jax.train.checkpointing import load_for_inference
    _, model_config, params, tokenizer = load_for_inference(workdir, use_ema=e.use_ema)
    scorer = loglikelihood.LoglikelihoodScorer(model_config, params, max_len=e.max_len or None,
                                               batch_size=e.batch_size, pack_len=e.pack_len)
    if "mc" in suites:
      report["mc"] = multiple_choice.evaluate_tasks(
          scorer, tokenizer, _path(e.tasks_dir), _names(e.tasks) or None, e.limit or None,
          e.add_bos)
      print(f"mc: average {report['mc']['average']:.4f} over "
            f"{len(report['mc']) - 1} tasks", flush=True)
    if "perplexity" in suites:
      report["perplexity"] = perplexity.perplexity_of_file(
          _path(e.text_file), tokenizer, scorer, stride=e.stride or None, add_bos=e.add_bos,
          max_chars=e.max_chars or None)
      print(f"perplexity: {report['perplexity']['perplexity']:.3f}, "
            f"{report['perplexity']['bits_per_byte']:.4f} bits/byte", flush=True)
  if jax.process_index() == 0 and ("mnist" in suites or "fid" in suites):
    from monoformer_jax.evaluation import image_suites  # pylint: disable=import-outside-toplevel
    images, labels = image_suites.load_images(_path(e.samples))
    if "mnist" in suites:
      report["mnist"] = image_suites.mnist_suite(images, labels, _path(e.digit_reference),
                                                 _path(e.classifier_cache), name=e.samples)
      print(f"mnist: digit FID {report['mnist']['digit_fid']:.3f}, class accuracy "
            f"{report['mnist'].get('class_accuracy', float('nan')):.4f}", flush=True)
    if "fid" in suites:
      report["fid"] = image_suites.fid_suite(
          images, _path(e.inception_weights), _path(e.reference),
          batch_size=e.inception_batch_size, splits=e.is_splits)
      print(f"fid: FID {report['fid']['fid']:.3f}, Inception Score "
            f"{report['fid']['inception_score']:.3f} over {report['fid']['num_samples']} "
            "samples", flush=True)
  report["seconds"] = time.time() - start
  if jax.process_index() == 0:
    print(f"report: {write_report(workdir, report, report['step'])}", flush=True)
  return report


def main(argv):
  from monoformer_jax.host_memory import tune_for_xla_cpu  # pylint: disable=import-outside-toplevel
  tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]} (fields are set as "
                         "--config.eval.FIELD=VALUE)")
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.WARNING)  # orbax's INFO lines on restore drown the results
  try:
    run_evaluation(_WORKDIR.value, _CONFIG.value)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _with_default_config(argv: list[str]) -> list[str]:
  if any(a in ("--config", "-config") or a.startswith(("--config=", "-config=")) for a in argv):
    return argv
  return argv[:1] + [f"--config={_DEFAULT_CONFIG}"] + argv[1:]


def _parse_flags(argv: list[str]):
  """absl's parsing, plus one line instead of a traceback for a field the locked config lacks
  (config_flags raises AttributeError / KeyError there, which absl does not catch)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    message = e
    while isinstance(message, BaseException) and message.args:  # AttributeError(KeyError(str))
      message = message.args[0]
    field, _, hint = str(message).partition("\n")
    field = field.strip("\"'")
    given = [a.split("=", 1)[0] for a in argv
             if a.startswith("--config.") and field in a.split("=", 1)[0].split(".")]
    print(f"error: the config has no field {field!r} ({', '.join(given) or 'from --config'}); "
          f"{hint + ' ' if hint else ''}the fields are listed in "
          "monoformer_jax/evaluation/eval_config.py", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main, argv=_with_default_config(sys.argv), flags_parser=_parse_flags)
