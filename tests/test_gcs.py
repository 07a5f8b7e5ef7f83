"""gs:// paths against a local GCS emulator (tests/gcs_emulator.py): a run killed and resumed in a
bucket, sampled from the bucket, and the file helpers the package writes buckets with.

Every subprocess gets the emulator through the standard variables alone and runs in an empty
folder, which must stay empty: nothing of a gs:// run may land on the local disk (a stray
`open("gs://...")` would make a folder named `gs:` there).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.gcs_emulator import BUCKET, gcs  # noqa: F401  pylint: disable=unused-import  # the fixture
from tests.helpers import shared_tiny_run
from tests.helpers_env import subprocess_env
from tests.test_train_system import TIMING_KEYS, _tb_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = f"--config={os.path.join(ROOT, 'configs', 'mnist_tiny.py')}:test"
RUN = f"gs://{BUCKET}/run"


def _python(cwd, emulator, *args, check=True):
  env = subprocess_env(**emulator.env, PYTHONPATH=ROOT)  # `-m tests...` from outside the repository
  proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  # gcsfs's gRPC bucket probe (which would wait 60 s on an emulator) must never have run.
  assert "Could not determine bucket type" not in proc.stderr
  return proc


def _assert_nothing_local(cwd):
  assert not os.listdir(cwd), os.listdir(cwd)
  assert not os.path.exists(os.path.join(ROOT, "gs:"))


def _rows(path):
  with open(path) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


@pytest.mark.slow
def test_a_bucket_run_killed_and_resumed_is_exact_and_samples(gcs, tmp_path, tmp_path_factory):  # noqa: F811
  local = shared_tiny_run(tmp_path_factory)  # the same 6 steps, uninterrupted, in a local folder
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  # Killed after step 5: after checkpoint 3, with the row of step 4 already logged.
  killed = _python(cwd, gcs, "-m", "tests.fault_main", "--kill_after_step=5", CONFIG, f"--workdir={RUN}", check=False)
  assert killed.returncode == -9, killed.stderr[-3000:]
  objects = gcs.list("run/")
  assert "run/checkpoints/3/commit_success.txt" in objects and not any("checkpoints/6/" in o for o in objects)
  assert [r["step"] for r in _rows(gcs.local(f"{RUN}/metrics.jsonl"))] == [2, 4]

  resumed = _python(cwd, gcs, "-m", "monoformer_jax.main", CONFIG, f"--workdir={RUN}")
  assert "resumed from checkpoint step 3" in resumed.stdout
  assert "dropped 1 metrics.jsonl rows past step 3" in resumed.stdout
  # Laid out like a local run, in the bucket.
  objects = gcs.list("run/")
  for name in ("config.json", "metrics.jsonl", "tokenizer/tokenizer.model", "checkpoints/6/commit_success.txt"):
    assert f"run/{name}" in objects, objects
  assert not any(".orbax-checkpoint-tmp" in o for o in objects)
  # The losses (every logged value but the timings) of the uninterrupted local run, bit for bit.
  assert _rows(gcs.local(f"{RUN}/metrics.jsonl")) == _rows(local / "metrics.jsonl")
  # Two TensorBoard files; the resumed one hides the killed run's events from step 4 on.
  files = list(_tb_events(gcs.local(RUN)).values())
  assert len(files) == 2 and all(files)
  assert [e.step for e in files[1] if e.HasField("session_log")] == [4]

  # The same weights (and EMA weights) as the local run, read back from the bucket.
  compare = textwrap.dedent(f"""
      import numpy as np, jax
      from monoformer_jax.run.open import open_run
      for ema in (False, True):
        a, b = open_run({RUN!r}, use_ema=ema), open_run({str(local)!r}, use_ema=ema)
        assert a.step == b.step == 6
        assert jax.tree.structure(a.params) == jax.tree.structure(b.params)
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
          np.testing.assert_array_equal(x, y)
      """)
  _python(cwd, gcs, "-c", compare)
  # The sample command reads the run from the bucket and writes there.
  out = f"{RUN}/samples/classes.npz"
  _python(
      cwd, gcs, "-m", "monoformer_jax.sample", f"--workdir={RUN}", "--classes=0,7", "--num_per_class=1", f"--out={out}"
  )
  assert {"run/samples/classes.npz", "run/samples/classes.png"} <= set(gcs.list("run/samples/"))
  _assert_nothing_local(cwd)


_HELPERS = """
import io, json, time
import numpy as np
from etils import epath
from PIL import Image
from monoformer_jax import paths
from monoformer_jax.data import image_sources, sources, tokenizer
from monoformer_jax.evaluation import sample_dirs
from monoformer_jax.train.metrics import MetricWriter

base = epath.Path("gs://BUCKET/helpers")
# Atomic writes and .npz archives.
paths.write_text_atomic(base / "a.txt", "one")
paths.write_text_atomic(base / "a.txt", "two")
assert (base / "a.txt").read_text() == "two" and [p.name for p in base.iterdir()] == ["a.txt"]
paths.save_npz(base / "x.npz", x=np.arange(5))
with paths.load_npz(base / "x.npz") as z:
  np.testing.assert_array_equal(z["x"], np.arange(5))

# Metrics: rows past the resume step dropped, TensorBoard events written as objects.
w = MetricWriter(str(base / "run"))
for step in (1, 2, 3, 4):
  w.write_scalars(step, {"loss": float(step)})
w.close()
time.sleep(1.1)  # event file names hold the second they were made in: two in one second collide
w = MetricWriter(str(base / "run"), resume_step=2)
w.write_scalars(3, {"loss": 30.0})
w.close()
rows = [json.loads(l) for l in (base / "run" / "metrics.jsonl").read_text().splitlines()]
assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)], rows
assert len([p for p in (base / "run" / "tensorboard").iterdir() if p.name.startswith("events.")]) == 2

# A tokenizer trained into the bucket, then found there (not retrained).
texts = ["the quick brown fox jumps over the lazy dog %d" % i for i in range(200)]
tok = tokenizer.train_sentencepiece(texts, 320, str(base / "tok"))
assert tokenizer.train_sentencepiece(texts, 320, str(base / "tok")).encode("the fox") == tok.encode("the fox")

# Text and image-folder sources reading objects.
(base / "text.txt").write_text("first paragraph\\n\\nsecond one\\n")
assert [sources.TextFileSource(str(base / "text.txt"))[i]["text"] for i in range(2)] == ["first paragraph", "second one"]
for label, name in enumerate(["cat", "dog"]):
  for k in range(2):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 40 * label + k, np.uint8)).save(buf, format="PNG")
    (base / "images" / name / f"{k}.png").write_bytes(buf.getvalue())
folder = image_sources.ImageFolderSource(str(base / "images"), channels=3)
assert len(folder) == 4 and folder.class_names == ["cat", "dog"] and folder[3]["image"][0, 0, 0] == 41

# A fid_samples directory: manifest, chunks, read back whole.
out = str(base / "fid")
sample_dirs.check_and_write_manifest(out, {"scheme": 2, "seed": 0, "chunk": 2, "use_ema": True, "step": 1, "num_samples": 3})
for start in (0, 2):
  idx = sample_dirs.chunk_indices(start, 2, 3)
  paths.save_npz(sample_dirs.chunk_path(out, start), images=np.zeros((len(idx), 2, 2, 1), np.uint8), labels=idx, indices=idx)
assert sample_dirs.chunk_is_complete(sample_dirs.chunk_path(out, 2), np.array([2]))
images, labels = sample_dirs.load_samples(out)
assert images.shape == (3, 2, 2, 1) and labels.tolist() == [0, 1, 2]

# extract_latents from the image folder through a VAE folder, both in the bucket, into the
# bucket (ArrayRecord writes local files only: built aside, copied up), read back from there.
import jax
from monoformer_jax.data import tfds_latents
from monoformer_jax.tools import extract_latents
from monoformer_jax.vae import autoencoder_kl, export
vae = autoencoder_kl.VAEConfig(block_out_channels=(4, 4), layers_per_block=1, norm_num_groups=2)
export.save_diffusers_vae(str(base / "vae"), vae, autoencoder_kl.init_params(vae, jax.random.key(0), 8), 8)
args = ["--vae", str(base / "vae"), "--source", "image_folder", "--input", str(base / "images")]
assert extract_latents.main(args + ["--out", str(base / "latents"), "--no_progress"]) == 0
latents = tfds_latents.latent_source(str(base / "latents"))
assert len(latents) == 4 and latents[0]["mean"].shape == (4, 4, 4)
assert not (base / "latents" / extract_latents.PARTIAL).exists()
print("OK")
"""


def test_file_helpers_metrics_tokenizer_and_sources_on_a_bucket(gcs, tmp_path):  # noqa: F811
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  proc = _python(cwd, gcs, "-c", _HELPERS.replace("BUCKET", BUCKET))
  assert proc.stdout.strip().endswith("OK")
  assert not any(".tmp" in name for name in gcs.list("helpers/"))  # bucket writes use no temporary objects
  _assert_nothing_local(cwd)
