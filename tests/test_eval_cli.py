"""`python -m monoformer_jax.evaluate` end to end on a tiny trained run of the embedded default."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from monoformer_jax import evaluate
from monoformer_jax.data import mnist
from monoformer_jax.evaluation import eval_config, image_suites
from monoformer_jax.evaluation import multiple_choice as mc
from monoformer_jax.evaluation.loglikelihood import LoglikelihoodScorer
from monoformer_jax.run.open import open_run
from tests.helpers import shared_digit_classifier, shared_tiny_run, tensorboard_scalars
from tests.helpers_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = subprocess_env()
pytestmark = pytest.mark.slow  # reads the shared tiny run and uses the digit classifier


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return str(shared_tiny_run(tmp_path_factory))  # the report goes to its eval/, read by no other test


def eval_fields(**fields):
  """The default eval config with some config.eval fields set (locked: a misspelt one fails)."""
  config = eval_config.get_config()
  config.lock()
  config.eval.update(fields)
  return config


def test_all_suites_report_and_tensorboard(run_dir, tmp_path, tmp_path_factory, rng):
  shutil.rmtree(os.path.join(run_dir, "eval"), ignore_errors=True)  # one report's scalars (--seed-sweep)
  tasks = tmp_path / "tasks"
  tasks.mkdir()
  piqa = [
      {"goal": f"How do I open a {w}?", "sol1": "Twist the lid.", "sol2": "Sing to it.", "label": int(rng.integers(2))}
      for w in ("jar", "door", "box")
  ]
  wino = [
      {
          "sentence": "The cup fell off the table because _ was wobbly.",
          "option1": "the cup",
          "option2": "the table",
          "answer": "2",
      }
  ]
  (tasks / "piqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in piqa))
  (tasks / "winogrande.jsonl").write_text(json.dumps(wino[0]) + "\n")
  text = tmp_path / "text.txt"
  text.write_text("The for statement is used to iterate over the elements of a sequence. " * 8)
  images, labels = mnist.load_mnist5k()
  pick = rng.choice(len(images), 64, replace=False)
  np.savez(tmp_path / "samples.npz", images=images[pick], labels=labels[pick])
  cache = shared_digit_classifier(tmp_path_factory)
  report = evaluate.run_evaluation(
      run_dir,
      eval_fields(
          tasks_dir=str(tasks),
          text_file=str(text),
          samples=str(tmp_path / "samples.npz"),
          classifier_cache=cache,
          batch_size=3,
          pack_len=64,
      ),
  )
  with open(os.path.join(run_dir, "eval", "report.json")) as f:
    assert json.load(f) == json.loads(json.dumps(report))
  assert report["step"] == 6 and report["config"]["batch_size"] == 3
  assert set(report["mc"]) == {"piqa", "winogrande", "average"}
  assert report["mc"]["piqa"]["num_examples"] == 3
  assert report["perplexity"]["num_tokens"] > 50 and report["perplexity"]["perplexity"] > 1
  assert report["mnist"]["class_accuracy"] >= 0.9  # real digits as "samples"
  assert report["mnist"]["digit_fid"] < 5 * report["mnist"]["digit_fid_real_same_size"] + 1
  # The same numbers as the library called directly on one device.
  opened = open_run(run_dir)
  scorer = LoglikelihoodScorer(opened.model_config, opened.params, devices=jax.local_devices()[:1])
  direct = mc.evaluate_tasks(scorer, opened.tokenizer, str(tasks))
  assert direct["piqa"]["acc"] == report["mc"]["piqa"]["acc"]
  scalars = tensorboard_scalars(os.path.join(run_dir, "eval", "tensorboard"))
  assert scalars["eval/mc/piqa/acc_norm"] == (6, pytest.approx(report["mc"]["piqa"]["acc_norm"]))
  assert scalars["eval/perplexity/bits_per_byte"][1] == pytest.approx(report["perplexity"]["bits_per_byte"])
  assert "eval/mnist/digit_fid" in scalars


def test_errors_name_the_input(run_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="nothere.npz"):
    evaluate.run_evaluation(run_dir, eval_fields(suite="mnist", samples=str(tmp_path / "nothere.npz")))
  np.savez(tmp_path / "bad.npz", images=np.ones((3, 28, 28, 1), np.float32))
  with pytest.raises(ValueError, match=r"bad.npz: images must be uint8"):
    image_suites.load_images(str(tmp_path / "bad.npz"))
  np.savez(tmp_path / "rgb.npz", images=np.full((3, 32, 32, 3), 7, np.uint8))
  with pytest.raises(ValueError, match=r"rgb.npz: the mnist suite needs 28x28 grayscale digits"):
    evaluate.run_evaluation(run_dir, eval_fields(samples=str(tmp_path / "rgb.npz")))
  with pytest.raises(ValueError, match="needs config.eval.text_file"):
    evaluate.run_evaluation(run_dir, eval_fields(suite="perplexity"))
  with pytest.raises(ValueError, match="got typo"):
    evaluate.run_evaluation(run_dir, eval_fields(suite="mc,typo", tasks_dir=str(tmp_path)))
  (tmp_path / "boolq.jsonl").write_text('{"passage": "p", "question": "q", "label": 1}\n{oops\n')
  with pytest.raises(ValueError, match=r"boolq.jsonl:2: not valid JSON"):
    evaluate.run_evaluation(run_dir, eval_fields(suite="mc", tasks_dir=str(tmp_path)))
  # The command line: exit status 2 and the message, no traceback.
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "monoformer_jax.evaluate",
          f"--workdir={run_dir}",
          f"--config.eval.samples={tmp_path / 'missing.npz'}",
      ],
      cwd=ROOT,
      env=ENV,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 2 and "missing.npz" in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "--config.eval.sample=x.npz",
            "the config has no field 'sample' (--config.eval.sample); " 'Did you mean "samples"',
        ),
        ("--config.eval.limit=many", "--config.eval.limit=many: invalid literal for int()"),
    ],
)
def test_command_line_refuses_unknown_fields_and_bad_values(tmp_path, override, message, capsys):
  """Flag parsing fails before anything is loaded (no run directory needed). In-process: the
  command's main, its exit status and stderr (test_errors_name_the_input runs the command)."""
  assert evaluate.main([f"--workdir={tmp_path}", override]) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err, err
  assert not (tmp_path / "eval").exists()
