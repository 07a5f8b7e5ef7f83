"""benchmarks/ablations.py end to end on configs/mnist_ablations.py's `test` shrinks: one seed, the
text pretraining and every arm for a few steps, two evaluation points each, then the table, JSON
and plot; a second invocation finds everything done, and other settings in the same workdir are
refused."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, run_module, shared_digit_classifier
from tests.helpers_env import subprocess_env

pytestmark = pytest.mark.slow  # five tiny trainings and their evaluations (~1 min on two cores)

ARMS = ["scratch", "llm_init", "causal_image", "no_lm_loss"]


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def test_ablations_end_to_end(tmp_path, tmp_path_factory):
  cache = shared_digit_classifier(tmp_path_factory)
  runs, out = tmp_path / "runs", tmp_path / "out"
  args = ["benchmarks/ablations.py", "--test", "--seeds", "0", "--steps", "4", "--pretrain_steps", "4"]
  args += ["--eval_every", "2", "--jobs", "2", "--num_per_class", "2", "--classifier_cache", cache]
  args += ["--workdir", runs, "--out", out]
  run_module(*args)

  summary = json.loads((out / "ablations.json").read_text())
  assert list(summary["arms"]) == ARMS and summary["seeds"] == [0]
  assert summary["same_tokenizer_everywhere"]
  for arm, r in summary["arms"].items():
    # Checkpoints every 2 steps of 4; no_lm_loss, with no text steps, takes the others' 3 image
    # steps (the 5:1 schedule's 4th step is a text step), its checkpoints at the same image steps.
    assert [p["step"] for p in r["points"]] == ([2, 3] if arm == "no_lm_loss" else [2, 4]), arm
    assert [p["image_steps"] for p in r["points"]] == [2, 3], arm
    for p in r["points"]:
      for key in ("digit_accuracy", "worst_class_accuracy", "digit_fid"):
        assert all(_finite(v) for v in p[key].values()), (arm, key, p[key])
      assert 0 <= p["worst_class_accuracy"]["mean"] <= p["digit_accuracy"]["mean"] <= 1
      assert p["digit_fid"]["mean"] > 0
    assert _finite(r["text_ppl"]["mean"]) and r["text_ppl"]["mean"] > 1
  ref = summary["reference"]
  assert all(_finite(v) for d in ref.values() for v in d.values()), ref
  # The n-gram references of the pretraining run's evaluation: a bigram table beats a unigram one.
  assert ref["bigram_ppl"]["mean"] < ref["unigram_ppl"]["mean"]
  assert {e["effect"][:3] for e in summary["effects"]} >= {"(a)", "(b)", "(c)"}
  assert all(_finite(e["difference_mean"]) and _finite(e["difference_std"]) for e in summary["effects"])

  # The arms are what they claim: the init arms start from this seed's pretraining run.
  for arm in ARMS:
    config = json.loads((runs / "seed_0" / arm / "config.json").read_text())
    log = (runs / "logs" / f"train_{arm}_seed0.log").read_text()
    pretrain = f"run:{runs / 'seed_0' / 'text_pretrain'}"
    assert (config["init_from"] == pretrain) == (arm != "scratch"), (arm, config["init_from"])
    assert (f"initialised from {pretrain}" in log) == (arm != "scratch"), arm
    assert config["model"]["bidirectional_image"] == (arm != "causal_image"), arm
    assert (config["schedule"]["ar"] > 0) == (arm != "no_lm_loss"), arm

  table = (out / "ablations.md").read_text()
  for arm in ARMS:
    assert sum(line.startswith(f"| {arm} |") for line in table.splitlines()) == 2, arm
  assert "(c) bidirectional beats causal image mask" in table and "nan" not in table
  png = np.asarray(Image.open(out / "ablations.png").convert("L"))
  assert png.shape[0] > 300 and png.shape[1] > 1000
  assert png.std() > 10  # drawn, not blank

  # Run again: every job is found done, the report is rewritten the same.
  (out / "ablations.json").unlink()
  again = run_module(*args).stdout
  assert again.count("already done:") == 10, again
  assert json.loads((out / "ablations.json").read_text())["arms"] == summary["arms"]
  # Other settings in the same workdir would mix runs: refused before anything starts.
  refused = subprocess.run(
      [sys.executable, *map(str, args[:5]), "5", *map(str, args[6:])],
      cwd=ROOT,
      env=subprocess_env(),
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )
  assert refused.returncode != 0 and "other settings" in refused.stderr, refused.stderr[-2000:]
