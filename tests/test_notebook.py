"""notebooks/sampling_demo.ipynb: its one setting, its install cell in every situation (a checkout, a
fresh runtime, an installed package; CPU, GPU and TPU runtimes), and the whole notebook run the way
a fresh Colab runtime runs it (package not installed, another working directory, the repository
cloned from REPO_URL, here the local clone) on the shipped weights, with the training off."""

import ast
import base64
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request

import nbclient
import nbformat
import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT
from tests.helpers_env import subprocess_env

NOTEBOOK = os.path.join(ROOT, "notebooks", "sampling_demo.ipynb")
PARAM = re.compile(r"^(?P<name>[A-Z_][A-Z0-9_]*) = (?P<value>.+?)  # @param\b.*$", re.M)

# Runs the install cell with `python -S` (no site-packages: this checkout is not importable, nor
# is anything but the standard library, which is all the cell may need), git and pip replaced by
# a recorder so that nothing is cloned or installed, and /dev/accel* (a TPU VM's chips) as
# argv[2] says. Prints what the cell did.
_RUN_CELL = """
import glob, importlib.util, json, subprocess, sys
calls = []
subprocess.check_call = lambda cmd, **kw: calls.append(list(cmd)) or 0
_glob = glob.glob
glob.glob = lambda pattern, **kw: json.loads(sys.argv[2]) if pattern.startswith("/dev/") else _glob(pattern, **kw)
before = importlib.util.find_spec("monoformer_jax")
scope = {}
exec(compile(sys.argv[1], "install_cell", "exec"), scope)
after = importlib.util.find_spec("monoformer_jax")
print(json.dumps({"importable_before": before is not None, "calls": calls, "repo": scope["REPO"],
                  "origin": after.origin if after else None}))
"""


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def _set_params(nb, **values):
  """Sets form fields (`NAME = value  # @param ...`) as Colab's form does: each name once."""
  for name, value in values.items():
    hits = [c for c in _code_cells(nb) for m in PARAM.finditer(c.source) if m["name"] == name]
    assert len(hits) == 1, f"{name}: {len(hits)} form fields"
    hits[0].source = re.sub(
        rf"^{name} = .+?(  # @param\b.*)$", lambda m: f"{name} = {value!r}{m[1]}", hits[0].source, flags=re.M
    )


def _params(nb) -> dict:
  return {m["name"]: ast.literal_eval(m["value"]) for c in _code_cells(nb) for m in PARAM.finditer(c.source)}


def test_the_first_cell_has_one_setting_the_repository_url_and_settings_are_form_fields():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  first = _code_cells(nb)[0].source
  assert [m["name"] for m in PARAM.finditer(first)] == ["REPO_URL"]
  # Said plainly at the top: the cell's first line of code (after its title).
  assert next(line for line in first.splitlines() if line and not line.startswith("#")).startswith("REPO_URL = ")
  # No setting hides elsewhere: every other cell's settings are form fields too.
  for cell in _code_cells(nb):
    assert "MONOFORMER_" not in cell.source, cell.source[:200]  # no setting through an environment variable
    for node in ast.parse(cell.source).body:
      if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.isupper():
        assert node.targets[0].id in _params(nb) or node.targets[0].id in ("REPO", "EXTRA"), node.targets[0].id
  params = _params(nb)
  assert params["TRAIN"] is False  # training is an option, off unless ticked
  assert _code_cells(nb).index(next(c for c in _code_cells(nb) if "TRAIN = " in c.source)) == len(_code_cells(nb)) - 1


def _install_cell(**params) -> str:
  nb = nbformat.read(NOTEBOOK, as_version=4)
  _set_params(nb, **params)
  return _code_cells(nb)[0].source


def _run_install_cell(cwd, tmp_path, isolated=True, accel=(), params=None, ok=True, **env):
  """The install cell in `cwd`; PATH holds git but no nvidia-smi unless `env` gives another PATH."""
  base = {
      k: v
      for k, v in os.environ.items()
      if k not in ("PYTHONPATH", "COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE")
  }
  no_gpu = tmp_path / "bin_without_nvidia_smi"
  no_gpu.mkdir(exist_ok=True)
  base["PATH"] = str(no_gpu)  # git and pip are recorded, never run
  proc = subprocess.run(
      [
          sys.executable,
          *(["-S"] if isolated else []),
          "-c",
          _RUN_CELL,
          _install_cell(**(params or {})),
          json.dumps(list(accel)),
      ],
      cwd=cwd,
      env={**base, **env},
      capture_output=True,
      text=True,
      timeout=120,
  )
  if not ok:
    assert proc.returncode != 0
    return proc.stderr
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.splitlines()[-1])


def test_install_cell_in_a_checkout_on_a_fresh_runtime_and_installed(tmp_path):
  pip = [sys.executable, "-m", "pip", "install", "-q", "-e"]
  notebooks = os.path.join(ROOT, "notebooks")
  # Opened from a checkout's notebooks/ folder on a CPU runtime: installs that checkout, CPU jaxlib.
  got = _run_install_cell(notebooks, tmp_path)
  assert not got["importable_before"] and got["repo"] == ROOT
  assert got["calls"] == [pip + [ROOT]]
  assert got["origin"] == os.path.join(ROOT, "monoformer_jax", "__init__.py")
  # A GPU runtime (nvidia-smi on the PATH): the [cuda] extra, the jax plugin of the pinned version.
  gpu = tmp_path / "bin_with_nvidia_smi"
  gpu.mkdir()
  (gpu / "nvidia-smi").write_text("#!/bin/sh\n")
  (gpu / "nvidia-smi").chmod(0o755)
  assert _run_install_cell(notebooks, tmp_path, PATH=str(gpu))["calls"] == [pip + [ROOT + "[cuda]"]]
  # A TPU runtime: Colab's TPU address, or a TPU VM's chips.
  assert _run_install_cell(notebooks, tmp_path, COLAB_TPU_ADDR="10.0.0.2:8470")["calls"] == [pip + [ROOT + "[tpu]"]]
  assert _run_install_cell(notebooks, tmp_path, accel=["/dev/accel0"])["calls"] == [pip + [ROOT + "[tpu]"]]
  # A fresh runtime (no checkout around): clones REPO_URL (the form field), installs the clone;
  # left at its placeholder, it says to set it.
  assert "set REPO_URL" in _run_install_cell(str(tmp_path), tmp_path, ok=False)
  url, clone = "file:///somewhere/monoformer_jax.git", str(tmp_path / "monoformer_jax_repo")
  got = _run_install_cell(str(tmp_path), tmp_path, params={"REPO_URL": url})
  assert got["calls"] == [["git", "clone", "--quiet", "--depth=1", url, clone], pip + [clone]]
  assert got["repo"] == clone
  # Already importable (an installed environment): nothing is cloned or installed.
  got = _run_install_cell(notebooks, tmp_path, isolated=False, PYTHONPATH=ROOT)
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


def _pictures(outputs) -> list[np.ndarray]:
  return [
      np.asarray(Image.open(io.BytesIO(base64.b64decode(o["data"]["image/png"]))).convert("L"))
      for o in outputs
      if "image/png" in o.get("data", {})
  ]


def _is_digit_picture(picture: np.ndarray) -> bool:
  """Ink on a dark ground, as MNIST: some bright strokes, mostly dark, not one flat value."""
  bright = (picture > 128).mean()
  return 0.03 < bright < 0.5 and picture.std() > 30


def _check_saved_outputs(nb):
  """The committed notebook shows its pictures on GitHub: its outputs are saved, without errors."""
  outputs = [o for c in _code_cells(nb) for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  pictures = _pictures(outputs)
  assert len(pictures) == 4 and all(_is_digit_picture(p) for p in pictures), [p.shape for p in pictures]


def test_the_saved_notebook_shows_its_pictures():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  _check_saved_outputs(nb)
  assert os.path.getsize(NOTEBOOK) < 400_000


@pytest.mark.slow
def test_sampling_demo_notebook_runs_on_a_fresh_runtime(tmp_path):
  python = _fresh_runtime(tmp_path)
  # The environment of the kernel and what it starts (no PYTHONPATH: nothing finds this checkout).
  env = {k: v for k, v in subprocess_env().items() if k != "PYTHONPATH"}
  env["JUPYTER_PATH"] = str(tmp_path / "jupyter")
  found = subprocess.run(
      [str(python), "-c", "import importlib.util as u; print(u.find_spec('monoformer_jax'))"],
      capture_output=True,
      text=True,
      check=True,
      timeout=60,
      cwd=tmp_path,
      env=env,
  )
  assert found.stdout.strip() == "None"
  work = tmp_path / "content"  # Colab's working directory, away from any checkout
  work.mkdir()
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in _code_cells(nb):
    cell.outputs = []
  # This clone's committed HEAD; the demo on any free port. The rest as shipped (TRAIN off).
  _set_params(nb, REPO_URL=f"file://{ROOT}", DEMO_PORT=0)
  params = _params(nb)
  old = dict(os.environ)
  os.environ.clear()
  os.environ.update(env)  # the kernel inherits the environment
  try:
    nbclient.NotebookClient(nb, timeout=600, kernel_name="fresh", resources={"metadata": {"path": str(work)}}).execute()
  finally:
    os.environ.clear()
    os.environ.update(old)
  _check_saved_outputs(nb)
  outputs = [o for c in _code_cells(nb) for o in c.get("outputs", [])]
  grid = _pictures(outputs)[0]  # a row per class, NUM_PER_CLASS digits each, 3x zoomed
  assert grid.shape == (10 * 28 * 3, params["NUM_PER_CLASS"] * 28 * 3)
  printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert "cloning file://" in printed and "installed, with the cpu jax" in printed
  # The reader names the digits it is shown (the shipped weights read 96% of held-out digits).
  right = [int(n) for n in re.findall(r"(\d+) of 10 read right", printed)]
  assert len(right) == 2 and right[0] >= 8 and right[1] >= 7, printed
  assert re.search(r"your strokes: +'", printed)
  assert len(re.findall(rf"^['\"]{re.escape(params['TEXT_PROMPT'])}", printed, re.M)) == 3  # three continuations
  # The demo served the page and stopped with the kernel.
  url = re.search(r"the demo of pretrained:all_in_one is at (http://localhost:\d+/)", printed)
  assert url and "read on" in printed, printed
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(url[1], timeout=5)
    except urllib.error.URLError:
      break
    assert time.time() < deadline, "the demo outlived its kernel"
    time.sleep(1)
  assert "TRAIN is off" in printed
  # What ran is the clone the notebook made, installed into the fresh environment.
  assert (work / "monoformer_jax_repo" / "configs" / "mnist_tiny.py").is_file()
  origin = subprocess.run(
      [str(python), "-c", "import monoformer_jax; print(monoformer_jax.__file__)"],
      capture_output=True,
      text=True,
      check=True,
      timeout=60,
      cwd=tmp_path,
      env=env,
  ).stdout.strip()
  assert origin == str(work / "monoformer_jax_repo" / "monoformer_jax" / "__init__.py")
