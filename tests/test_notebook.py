"""notebooks/sampling_demo.ipynb: its install cell in every situation, and the whole notebook run the
way a fresh Colab runtime runs it (package not installed, another working directory, the
repository cloned from a URL, here the local clone; no checkpoint, so it trains a tiny one)."""

import json
import os
import subprocess
import sys
import sysconfig

import nbclient
import nbformat
import pytest

from tests.helpers import ROOT
from tests.helpers_env import subprocess_env

NOTEBOOK = os.path.join(ROOT, "notebooks", "sampling_demo.ipynb")

# Runs the install cell with `python -S` (no site-packages: this checkout is not importable, nor
# is anything but the standard library, which is all the cell may need), git and pip replaced by
# a recorder so that nothing is cloned or installed. Prints what the cell did.
_RUN_CELL = """
import importlib.util, json, subprocess, sys
calls = []
subprocess.check_call = lambda cmd, **kw: calls.append(list(cmd)) or 0
before = importlib.util.find_spec("monoformer_jax")
scope = {}
exec(compile(sys.argv[1], "install_cell", "exec"), scope)
after = importlib.util.find_spec("monoformer_jax")
print(json.dumps({"importable_before": before is not None, "calls": calls, "repo": scope["REPO"],
                  "origin": after.origin if after else None}))
"""


def _install_cell() -> str:
  nb = nbformat.read(NOTEBOOK, as_version=4)
  return next(c.source for c in nb.cells if c.cell_type == "code")


def _run_install_cell(cwd, isolated=True, **env):
  env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **env}
  flags = ["-S"] if isolated else []
  proc = subprocess.run(
      [sys.executable, *flags, "-c", _RUN_CELL, _install_cell()],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.splitlines()[-1])


def test_install_cell_in_a_checkout_on_a_fresh_runtime_and_installed(tmp_path):
  pip = [sys.executable, "-m", "pip", "install", "-q", "-e"]
  # Opened from a checkout's notebooks/ folder: installs that checkout.
  got = _run_install_cell(os.path.join(ROOT, "notebooks"))
  assert not got["importable_before"] and got["repo"] == ROOT
  assert got["calls"] == [pip + [ROOT]]
  assert got["origin"] == os.path.join(ROOT, "monoformer_jax", "__init__.py")
  # A fresh runtime (no checkout around): clones REPO_URL, installs the clone.
  url, clone = "file:///somewhere/monoformer_jax.git", str(tmp_path / "clone")
  got = _run_install_cell(str(tmp_path), MONOFORMER_REPO_URL=url, MONOFORMER_REPO_DIR=clone)
  assert got["calls"] == [["git", "clone", "--quiet", "--depth=1", url, clone], pip + [clone]]
  assert got["repo"] == clone
  # Already importable (an installed environment): nothing is cloned or installed.
  got = _run_install_cell(os.path.join(ROOT, "notebooks"), isolated=False)
  assert got["importable_before"] and got["calls"] == [] and got["repo"] == ROOT


def _fresh_runtime(path):
  """A Python environment where the libraries are importable but monoformer_jax is not (what a
  Colab runtime is to this repository): a venv whose only site entry is this environment's
  site-packages as a plain path, so its editable-install hook is not run. A Jupyter kernel spec
  `fresh` starts kernels in it."""
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path / "venv")], check=True, timeout=120)
  python = path / "venv" / "bin" / "python"
  site = subprocess.run(
      [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      capture_output=True,
      text=True,
      check=True,
      timeout=60,
  ).stdout.strip()
  with open(os.path.join(site, "libraries.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  kernel = path / "jupyter" / "kernels" / "fresh"
  kernel.mkdir(parents=True)
  spec = {
      "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "fresh",
      "language": "python",
  }
  (kernel / "kernel.json").write_text(json.dumps(spec))
  return python


@pytest.mark.slow
def test_sampling_demo_notebook_runs_on_a_fresh_runtime(tmp_path):
  python = _fresh_runtime(tmp_path)
  found = subprocess.run(
      [str(python), "-c", "import importlib.util as u; print(u.find_spec('monoformer_jax'))"],
      capture_output=True,
      text=True,
      check=True,
      timeout=60,
      cwd=tmp_path,
  )
  assert found.stdout.strip() == "None"
  work = tmp_path / "content"  # Colab's working directory, away from any checkout
  work.mkdir()
  env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
  env.update(
      {
          "JUPYTER_PATH": str(tmp_path / "jupyter"),
          "MONOFORMER_REPO_URL": f"file://{ROOT}",  # this clone's committed HEAD
          "MONOFORMER_WORKDIR": str(work / "run"),  # empty: the notebook trains there
          # Generation, text and reading in one tiny run: every cell has something to show.
          "MONOFORMER_TRAIN_CONFIG": "configs/mnist_tiny.py:all_in_one,test",
          "MONOFORMER_TRAIN_STEPS": "6",
          "MONOFORMER_NUM_STEPS": "2",
          "MONOFORMER_NUM_PER_CLASS": "1",
      }
  )
  old = dict(os.environ)
  os.environ.clear()
  os.environ.update(env)  # the kernel inherits the environment
  try:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="fresh", resources={"metadata": {"path": str(work)}}).execute()
  finally:
    os.environ.clear()
    os.environ.update(old)
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 4  # class grid, text-to-image, the interleaved image, the digits asked about
  printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert "your drawing: Which digit is this? -> '" in printed
  assert "the model's three: Which digit is this? -> '" in printed
  # What ran is the clone the notebook made, installed into the fresh environment.
  assert (work / "monoformer_jax_repo" / "configs" / "mnist_tiny.py").is_file()
  origin = subprocess.run(
      [str(python), "-c", "import monoformer_jax; print(monoformer_jax.__file__)"],
      capture_output=True,
      text=True,
      check=True,
      timeout=60,
      cwd=tmp_path,
  ).stdout.strip()
  assert origin == str(work / "monoformer_jax_repo" / "monoformer_jax" / "__init__.py")
  assert sorted(os.listdir(work / "run" / "checkpoints")) == ["3", "6"]
