"""notebooks/sampling_demo.ipynb runs end to end (nbclient) on a tiny checkpoint the test trains."""
import os

import pytest

from tests.test_sample_cli import ROOT, tiny_run


@pytest.mark.slow
def test_sampling_demo_notebook_runs(tmp_path_factory):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  run = tiny_run(tmp_path_factory)
  env = {"MONOFORMER_WORKDIR": str(run), "MONOFORMER_NUM_STEPS": "2",
         "MONOFORMER_NUM_PER_CLASS": "1", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
         "PYTHONPATH": ROOT}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits the environment
  try:
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "sampling_demo.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}
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
