"""Every entry point, given bad input (a missing file, an unknown or mistyped override, a negative
count, an empty prompt, a class id out of range, a flag that does not exist): one line on
stderr that names the problem, exit code 2, no traceback. In-process through each `main(argv)`
(what `python -m ...` runs), one table."""

import numpy as np
import pytest

from monoformer_jax import evaluate, main, sample
from monoformer_jax.evaluation import fid_samples
from monoformer_jax.tools import (
    check_diffusion,
    check_official,
    compile_for,
    extract_latents,
    inception_features,
    vae_roundtrip,
)
from monoformer_jax.vae import train_vae
from tests.helpers import shared_tiny_run

MISSING = "/nonexistent/monoformer"
TINY = "--config=configs/mnist_tiny.py:test"

# (entry point, argv, what the one line must name); "RUN" is replaced by the shared tiny run,
# "OUT" by a file in the test's own folder (never written: each case fails first), "NPZ" by an
# .npz of two uint8 digits.
CASES = [
    (main, ["--config=configs/nope.py", "--workdir=/tmp/x"], "configs/nope.py"),
    (main, [TINY, "--workdir=/tmp/x", "--config.nope=1"], "nope"),
    (main, [TINY, "--workdir=/tmp/x", "--config.num_train_steps=many"], "num_train_steps"),
    (main, [TINY, "--workdir=/tmp/x", "--config.num_train_steps=-1"], "num_train_steps"),
    (main, [TINY, "--workdir=/tmp/x", f"--config.data.class_names_file={MISSING}.json"], "class_names_file"),
    (main, [TINY, "--workdir=/tmp/x", f"--config.init_from=hf:{MISSING}"], "init_from"),
    (main, [TINY], "workdir"),
    (
        main,
        [
            "--config=configs/mnist_tiny.py:all_in_one,test",
            "--workdir=/tmp/x",
            "--config.model.input_embedder=x_embedder",
            "--config.input_images.patch_size=4",
        ],
        "input_images.patch_size=7",  # the input encoder's patch must be the model's
    ),
    (main, [TINY, "--workdir=/tmp/x", "--no_such_flag"], "no_such_flag"),
    (sample, [f"--workdir={MISSING}", "--classes=1", "--out=OUT"], MISSING),
    (sample, ["--workdir=RUN", "--classes=12", "--out=OUT"], "12"),
    (sample, ["--workdir=RUN", "--classes=1", "--num_per_class=-3", "--out=OUT"], "num_per_class"),
    (sample, ["--workdir=RUN", "--prompt="], "prompt"),
    (sample, ["--workdir=RUN", "--classes=1", "--sampler=nope", "--out=OUT"], "nope"),
    (sample, ["--workdir=RUN", f"--describe={MISSING}.npz", "--out=OUT.json"], MISSING),
    (sample, ["--workdir=RUN", "--describe=NPZ", "--out=OUT"], "answers.json"),
    (sample, ["--workdir=RUN", "--describe=RUN/config.json", "--out=OUT.json"], "cannot read"),
    (sample, ["--workdir=RUN", "--describe=NPZ", "--question= ", "--out=OUT.json"], "question"),
    (sample, ["--workdir=RUN", "--describe=NPZ", "--out=OUT.json"], "does not read images"),
    (sample, ["--workdir=RUN", "--read_images=NPZ", "--prompt=<image> x", "--out=OUT"], "--interleaved"),
    (sample, ["--workdir=RUN", "--interleaved", "--read_images=NPZ", "--prompt=<image> x", "--out=OUT"], "2 images"),
    (
        sample,
        ["--workdir=RUN", "--interleaved", "--read_images=NPZ", "--prompt=<image><image>", "--out=OUT"],
        "does not read",
    ),
    (evaluate, [f"--workdir={MISSING}", f"--config.eval.text_file={MISSING}.txt"], MISSING),
    (evaluate, ["--workdir=RUN", "--config.eval.nope=1"], "nope"),
    (fid_samples, [f"--workdir={MISSING}", "--out_dir=/tmp/x"], MISSING),
    (fid_samples, ["--workdir=RUN", "--out_dir=/tmp/x", "--num_samples=-5"], "num_samples"),
    (extract_latents, [f"--vae={MISSING}", "--source=mnist", "--out=/tmp/x"], MISSING),
    (extract_latents, [f"--vae={MISSING}", "--source=bogus", "--out=/tmp/x"], "source"),
    (compile_for, [TINY, "--topology=v9:1x1"], "v9:1x1"),
    (train_vae, ["--config=configs/mnist_vae.py", "--workdir=/tmp/x", "--config.nope=1"], "nope"),
    (inception_features, [f"--weights={MISSING}.pth", f"--images={MISSING}.npz", "--out=/tmp/x.npz"], MISSING),
    (vae_roundtrip, [f"--vae={MISSING}", f"--images={MISSING}.npz", "--out=/tmp/x.npz"], MISSING),
    (check_diffusion, [MISSING], MISSING),
    (check_official, [MISSING], MISSING),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return str(shared_tiny_run(tmp_path_factory))


@pytest.mark.parametrize(
    "entry, argv, named", CASES, ids=[f"{e.__name__.rsplit('.', 1)[-1]}-{i}" for i, (e, _, _) in enumerate(CASES)]
)
def test_bad_input_is_one_line_and_exit_2(entry, argv, named, run_dir, tmp_path, capsys):
  digits = tmp_path / "digits.npz"  # what --describe reads: two uint8 digits
  np.savez(digits, images=np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8))
  argv = [a.replace("RUN", run_dir).replace("OUT", str(tmp_path / "out.npz")).replace("NPZ", str(digits)) for a in argv]
  code = entry.main(argv)
  out, err = capsys.readouterr()
  lines = [line for line in err.splitlines() if line.strip() and not _library_noise(line)]
  assert code == 2, (code, out[-1500:], err[-1500:])
  assert len(lines) == 1, err[-3000:]
  assert named in lines[0], lines[0]
  assert "Traceback" not in out + err
  assert not (tmp_path / "out.npz").exists() and not (tmp_path / "out.npz.json").exists()


def _library_noise(line: str) -> bool:
  """Lines libraries print on their own (absl's pre-init logging, libtpu probing a CPU host)."""
  return line.startswith(("WARNING: Logging before", "E0000", "W0000", "I0000", "=== Source", "learning/")) or (
      "TPU" in line and "WARNING" in line
  )
