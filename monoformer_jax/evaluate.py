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
              image folder); with clip_score and no `samples`, of clip_score's samples.
  clip_score  text-to-image samples of a prompts file (PartiPrompts, as the official sampler reads
              it), drawn from the run into sample_dir (images, a manifest of the settings;
              resumable, split over hosts) and scored by the CLIP model `clip_model`.
The language suites load the run's weights (EMA unless use_ema=false) and tokenizer through
`run.open.open_run`; the image suites need no checkpoint. Results go to
DIR/eval/report.json and as TensorBoard scalars (tags "eval/<suite>/...") to DIR/eval/tensorboard,
at the run's latest checkpoint step (0 without checkpoints).

    python -m monoformer_jax.evaluate --workdir runs/mnist_tiny \\
        --config.eval.text_file=held_out.txt --config.eval.samples=runs/mnist_tiny/samples.npz
    python -m monoformer_jax.evaluate --workdir runs/tinyllama \\
        --config.eval.tasks_dir=~/commonsense --config.eval.limit=500
    python -m monoformer_jax.evaluate --suite clip_score,fid --workdir runs/t2i256 \\
        --prompts parti_prompts.json --config.eval.clip_model=clip-vit-large-patch14 \\
        --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth --config.eval.reference=coco_val_images
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import flags, logging
from etils import epath
from jax.experimental import multihost_utils

from monoformer_jax import cli, paths
from monoformer_jax.compilation_cache import enable_compilation_cache
from monoformer_jax.evaluation import clip_score, image_suites, loglikelihood, multiple_choice, perplexity
from monoformer_jax.evaluation import sample_dirs, t2i_samples
from monoformer_jax.host_memory import tune_for_xla_cpu
from monoformer_jax.run import tensorboard
from monoformer_jax.run.checkpoints import step_dirs
from monoformer_jax.run.open import open_run

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "evaluation", "eval_config.py")

SUITES = ("mc", "perplexity", "mnist", "fid", "clip_score")


def latest_step(workdir: str) -> int:
  """The newest checkpoint step (0 if none): the TensorBoard step of the eval scalars."""
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
  epath.Path(eval_dir).mkdir(parents=True, exist_ok=True)
  path = os.path.join(eval_dir, "report.json")
  paths.write_text_atomic(path, json.dumps(report, indent=2, sort_keys=True))
  scalars: dict = {}
  for suite in SUITES:
    if suite in report:
      _scalars(f"eval/{suite}", report[suite], scalars)
  writer = tensorboard.summary_writer(os.path.join(eval_dir, "tensorboard"))
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
    given = {
        "mc": e.tasks_dir,
        "perplexity": e.text_file,
        "fid": e.inception_weights,
        "mnist": e.samples and not e.inception_weights,
        "clip_score": e.prompts,
    }
    suites = [s for s in SUITES if given[s]]
  unknown = sorted(set(suites) - set(SUITES))
  if unknown or not suites:
    raise ValueError(
        f"choose suites from {', '.join(SUITES)} with config.eval.suite (got "
        f"{', '.join(unknown) or 'none'}); by default a suite runs when its input "
        "(config.eval.tasks_dir, text_file, samples, inception_weights, prompts) is given"
    )
  needs = {
      "mc": ("tasks_dir",),
      "perplexity": ("text_file",),
      "mnist": ("samples",),
      "fid": ("inception_weights", "reference") + (() if "clip_score" in suites else ("samples",)),
      "clip_score": ("prompts", "clip_model"),
  }
  for suite in suites:
    for field in needs[suite]:
      if not e[field]:
        raise ValueError(f"suite {suite!r} needs config.eval.{field}")
  return list(dict.fromkeys(suites))  # in the order given, once each


def run_evaluation(workdir: str, config) -> dict:
  """Runs the suites of `config.eval` (a config like eval_config.get_config()) and writes the
  report; returns it. Under jax.distributed every process runs the language suites (each on its
  local devices) and only process 0 the image suites, whose numbers do not depend on the process."""
  if "eval" not in config:
    raise ValueError(
        f"not an evaluation config: no 'eval' section (has {sorted(config)}); see "
        "monoformer_jax/evaluation/eval_config.py"
    )
  e = config.eval
  suites = choose_suites(e)
  start = time.time()
  report = {"workdir": paths.absolute(workdir), "step": latest_step(workdir), "config": e.to_dict()}
  if "mc" in suites or "perplexity" in suites:
    opened = open_run(workdir, use_ema=e.use_ema)
    tokenizer = opened.tokenizer
    scorer = loglikelihood.LoglikelihoodScorer(
        opened.model_config, opened.params, max_len=e.max_len or None, batch_size=e.batch_size, pack_len=e.pack_len
    )
    if "mc" in suites:
      report["mc"] = multiple_choice.evaluate_tasks(
          scorer, tokenizer, _path(e.tasks_dir), _names(e.tasks) or None, e.limit or None, e.add_bos
      )
      print(f"mc: average {report['mc']['average']:.4f} over {len(report['mc']) - 1} tasks", flush=True)
    if "perplexity" in suites:
      report["perplexity"] = perplexity.perplexity_of_file(
          _path(e.text_file),
          tokenizer,
          scorer,
          stride=e.stride or None,
          add_bos=e.add_bos,
          max_chars=e.max_chars or None,
      )
      print(
          f"perplexity: {report['perplexity']['perplexity']:.3f}, "
          f"{report['perplexity']['bits_per_byte']:.4f} bits/byte",
          flush=True,
      )
  samples = _path(e.samples)
  if "clip_score" in suites:
    drawn = _clip_score(workdir, e, report)
    samples = samples or drawn
  if jax.process_index() == 0 and ("mnist" in suites or "fid" in suites):
    images, labels = image_suites.load_images(samples)
    if "mnist" in suites:
      report["mnist"] = image_suites.mnist_suite(
          images, labels, _path(e.digit_reference), _path(e.classifier_cache), name=e.samples
      )
      print(
          f"mnist: digit FID {report['mnist']['digit_fid']:.3f}, class accuracy "
          f"{report['mnist'].get('class_accuracy', float('nan')):.4f}",
          flush=True,
      )
    if "fid" in suites:
      report["fid"] = image_suites.fid_suite(
          images, _path(e.inception_weights), _path(e.reference), batch_size=e.inception_batch_size, splits=e.is_splits
      )
      if epath.Path(samples).is_dir():  # the settings the samples were drawn with, beside the score
        report["fid"]["samples"] = {"path": samples, **(sample_dirs.read_manifest(samples) or {})}
      print(
          f"fid: FID {report['fid']['fid']:.3f}, Inception Score "
          f"{report['fid']['inception_score']:.3f} over {report['fid']['num_samples']} "
          "samples",
          flush=True,
      )
  report["seconds"] = time.time() - start
  if jax.process_index() == 0:
    print(f"report: {write_report(workdir, report, report['step'])}", flush=True)
  return report


def _clip_score(workdir: str, e, report: dict) -> str:
  """Draws the prompts' samples (every process its chunks), then scores them (process 0);
  returns the sample directory."""
  prompts = t2i_samples.read_prompts(_path(e.prompts))[: e.num_prompts or None]
  out_dir = _path(e.sample_dir) or os.path.join(workdir, "eval", "clip_score_samples")
  overrides = {"sampler": e.sampler, "num_steps": e.num_steps, "guidance_scale": e.guidance_scale}
  t2i_samples.generate(
      workdir,
      out_dir,
      prompts,
      samples_per_prompt=e.samples_per_prompt,
      seed=e.seed,
      chunk=e.chunk,
      sampling={k: v for k, v in overrides.items() if v},
      use_ema=e.use_ema,
  )
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("clip_score: every chunk written")
  if jax.process_index() == 0:
    report["clip_score"] = clip_score.clip_score_suite(out_dir, prompts, _path(e.clip_model), e.clip_batch_size)
    print(
        f"clip_score: {report['clip_score']['clip_score']:.3f} over {report['clip_score']['num_samples']} samples "
        f"of {len(prompts)} prompts ({out_dir})",
        flush=True,
    )
  return out_dir


def define_flags(fv, argv=()):
  """`argv`: the command line, where the config flag finds its --config.FIELD overrides."""
  cli.define_config(
      fv,
      argv,
      "Evaluation config file (default: the package's "
      "evaluation/eval_config.py); override fields with --config.eval.FIELD=VALUE.",
      default=DEFAULT_CONFIG,
  )
  flags.DEFINE_string(
      "workdir",
      None,
      "Training run directory (config.json, checkpoints); the report goes to WORKDIR/eval.",
      flag_values=fv,
  )
  flags.DEFINE_string("suite", None, "Comma-separated suites (sets config.eval.suite).", flag_values=fv)
  flags.DEFINE_string("prompts", None, "The clip_score prompts file (sets config.eval.prompts).", flag_values=fv)
  flags.mark_flag_as_required("workdir", flag_values=fv)


def run(fv, args) -> int:
  if args:
    raise cli.UsageError(f"unexpected arguments {args} (fields are set as --config.eval.FIELD=VALUE)")
  tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
  enable_compilation_cache()  # a later run loads what this one compiles (compilation_cache.py)
  logging.set_verbosity(logging.WARNING)  # orbax's INFO lines on restore drown the results
  for name in ("suite", "prompts"):
    if fv[name].value is not None:
      fv.config.eval[name] = fv[name].value
  run_evaluation(fv.workdir, fv.config)
  return 0


main = cli.entry_point(__doc__, define_flags, run)


if __name__ == "__main__":
  cli.run_as_script(main)
