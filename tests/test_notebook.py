"""notebooks/sampling_demo.ipynb runs end to end (nbclient) on a tiny checkpoint the test trains,
and its Colab install cell installs the package from the repository the notebook sits in."""

import json
import os
import subprocess
import sys

import nbclient
import nbformat
import pytest

from tests.helpers import ROOT, shared_tiny_run
from tests.helpers_env import subprocess_env

NOTEBOOK = os.path.join(ROOT, "notebooks", "sampling_demo.ipynb")

# Runs the install cell with `python -S` (no site-packages: this checkout is not importable, nor
# is anything but the standard library, which is all the cell may need), pip replaced by a
# recorder so that no environment is touched. Prints what the cell did.
_RUN_CELL = """
import importlib.util, json, subprocess, sys
calls = []
subprocess.check_call = lambda cmd, **kw: calls.append(list(cmd)) or 0
before = importlib.util.find_spec("monoformer_jax")
try:
  exec(compile(sys.argv[1], "install_cell", "exec"), {})
  error = None
except RuntimeError as e:
  error = str(e)
after = importlib.util.find_spec("monoformer_jax")
if after is not None:
  import monoformer_jax
print(json.dumps({"importable_before": before is not None, "pip": calls, "error": error,
                  "origin": after.origin if after else None}))
"""


def _install_cell() -> str:
  nb = nbformat.read(NOTEBOOK, as_version=4)
  return next(c.source for c in nb.cells if c.cell_type == "code")


def _run_install_cell(cwd, isolated=True):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
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


def test_install_cell_installs_from_the_repository_it_sits_in(tmp_path):
  pip = [sys.executable, "-m", "pip", "install", "-q", "-e", ROOT]
  got = _run_install_cell(os.path.join(ROOT, "notebooks"))  # where Jupyter / Colab run it
  assert not got["importable_before"]
  assert got["pip"] == [pip] and got["error"] is None
  assert got["origin"] == os.path.join(ROOT, "monoformer_jax", "__init__.py")
  # Outside a checkout: one clear error, nothing installed.
  got = _run_install_cell(str(tmp_path))
  assert got["pip"] == [] and "is not its repository" in got["error"]
  # Already importable (an installed environment): the cell does nothing.
  got = _run_install_cell(os.path.join(ROOT, "notebooks"), isolated=False)
  assert got["importable_before"] and got["pip"] == [] and got["error"] is None


@pytest.mark.slow
def test_sampling_demo_notebook_runs(tmp_path_factory):
  run = shared_tiny_run(tmp_path_factory)
  env = {
      "MONOFORMER_WORKDIR": str(run),
      "MONOFORMER_NUM_STEPS": "2",
      "MONOFORMER_NUM_PER_CLASS": "1",
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": subprocess_env()["XLA_FLAGS"],
      "PYTHONPATH": ROOT,
  }  # this checkout, whatever the environment has installed
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits the environment
  try:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}
    ).execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 3  # class grid, text-to-image, the interleaved image
