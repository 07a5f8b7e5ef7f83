"""The diffusion module against golden vectors of the official code (tests/testdata/diffusion)."""

import shutil
import subprocess
import sys

import numpy as np
import pytest

from monoformer_jax.tools import check_diffusion


@pytest.fixture(scope="module")
def golden(testdata):
  return check_diffusion.load_cases(testdata / "diffusion")


def test_every_golden_array_within_tolerance(golden):
  ours = check_diffusion.compute_all(golden)
  rows = check_diffusion.compare(ours, golden)
  inputs = {
      "loop_noise",
      "loop_seed",
      "loop_z",
      "qs_x0",
      "qs_noise",
      "qs_t",
      "loss_x0",
      "loss_noise",
      "loss_t",
      "loss_model_output",
  }
  inputs |= {f"{p}_{k}" for p in ("pmv", "pmv20") for k in ("x", "t", "model_output")}
  assert {r[0] for r in rows} == set(golden) - inputs  # nothing left unchecked
  bad = [r for r in rows if not r[3]]
  assert not bad, bad
  # Far inside the tolerance, not just under it: the loop tracks the official float32 run.
  assert max(err / tol for _, err, tol, _ in rows) < 0.05


def test_cli_ok_and_dump(testdata, tmp_path):
  dump = tmp_path / "ours.npz"
  proc = subprocess.run(
      [sys.executable, "-m", "monoformer_jax.tools.check_diffusion", str(testdata / "diffusion"), "--dump", str(dump)],
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "loop_final" in proc.stdout and "FAIL" not in proc.stdout
  with np.load(dump) as ours, np.load(testdata / "diffusion" / "cases.npz") as ref:
    assert set(ours.files) <= set(ref.files)
    assert ours["loop_sample"].shape == ref["loop_sample"].shape  # NCHW, like the golden
    np.testing.assert_allclose(ours["loss_vb"], ref["loss_vb"], rtol=1e-5)


def test_cli_fails_on_a_perturbed_array(testdata, tmp_path):
  with np.load(testdata / "diffusion" / "cases.npz") as ref:
    cases = {k: ref[k] for k in ref.files}
  cases["pmv20_mean"] = cases["pmv20_mean"] + np.float32(1e-2)
  np.savez(tmp_path / "cases.npz", **cases)
  assert check_diffusion.main([str(tmp_path)]) == 1


def test_cli_missing_directory_or_array(testdata, tmp_path, capsys):
  assert check_diffusion.main([str(tmp_path / "nope")]) == 2
  assert "not a directory" in capsys.readouterr().err
  with np.load(testdata / "diffusion" / "cases.npz") as ref:
    cases = {k: ref[k] for k in ref.files if k != "loop_noise"}
  np.savez(tmp_path / "cases.npz", **cases)
  assert check_diffusion.main([str(tmp_path)]) == 2
  assert "loop_noise" in capsys.readouterr().err


def test_cli_other_directory_of_the_same_format(testdata, tmp_path):
  """Nothing is tied to the golden sizes: a smaller batch with fewer arrays still checks."""
  with np.load(testdata / "diffusion" / "cases.npz") as ref:
    cases = {k: ref[k] for k in ref.files}
  for k in list(cases):
    if k.startswith("loss_"):
      cases[k] = cases[k][:2]
    elif k.startswith("pmv"):
      del cases[k]
  shutil.rmtree(tmp_path, ignore_errors=True)
  tmp_path.mkdir()
  np.savez(tmp_path / "cases.npz", **cases)
  assert check_diffusion.main([str(tmp_path)]) == 0
