"""launch/tpu_pod.sh --dry_run: the commands it would run, and every argument reaching the workers'
python exactly as given (config overrides with spaces, quotes, shell characters, gs:// paths)."""

import os
import subprocess

from tests.helpers import ROOT

ARGS = [
    "--config=configs/imagenet256.py",
    "--workdir=gs://bucket/runs/my run",
    "--config.init_from=hf:/models/Tiny 'Llama'",
    "--config.data.image_path=gs://bucket/latents",
    "--config.optimizer.learning_rate=1e-4",
    "--config.data.tokenizer=$HOME/tok;rm -rf /tmp/x",
]


def _words(shell_line: str) -> list[str]:
  """The words bash makes of one line (quoting as `printf %q` writes it)."""
  out = subprocess.run(
      ["bash", "-c", 'eval "words=($1)"; printf "%s\\0" "${words[@]}"', "_", shell_line],
      capture_output=True,
      text=True,
      check=True,
      timeout=60,
  ).stdout
  return out.split("\0")[:-1]


def _dry_run(tmp_path, **extra_env):
  env = {k: v for k, v in os.environ.items() if k not in ("PROJECT", "MONOFORMER_COMPILATION_CACHE")}
  env.update(TPU_NAME="my-v5e", ZONE="us-west4-a", ARCHIVE=str(tmp_path / "repo.tgz"), PATH="/usr/bin:/bin")
  env.update(extra_env)
  proc = subprocess.run(
      ["bash", "launch/tpu_pod.sh", "--dry_run", *ARGS],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=60,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr
  assert not (tmp_path / "repo.tgz").exists()  # a dry run runs nothing
  return [_words(line) for line in proc.stdout.strip().splitlines()]


def _main_line(ssh: list[str]) -> list[str]:
  remote = next(w for w in ssh if w.startswith("--command="))[len("--command=") :]
  return _words(remote.strip().splitlines()[-1])


def test_tpu_pod_dry_run_quotes_every_argument_once_per_shell(tmp_path):
  tar, scp, ssh = _dry_run(tmp_path)
  assert tar[:3] == ["tar", "czf", str(tmp_path / "repo.tgz")]
  assert scp[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and scp[4:7] == [
      "scp",
      str(tmp_path / "repo.tgz"),
      "my-v5e:~/",
  ]
  assert "--worker=all" in scp and "--zone=us-west4-a" in scp
  assert ssh[4:6] == ["ssh", "my-v5e"] and "--worker=all" in ssh
  remote = next(w for w in ssh if w.startswith("--command="))[len("--command=") :]
  assert "pip install -q 'jax[tpu]==0.10.2' -e ." in remote  # the project's pinned jax
  words = _main_line(ssh)
  assert words[:4] == ["MONOFORMER_DISTRIBUTED=1", "python", "-m", "monoformer_jax.main"]
  assert words[4:] == ARGS


def test_tpu_pod_passes_the_compilation_cache_to_the_workers(tmp_path):
  *_, ssh = _dry_run(tmp_path, MONOFORMER_COMPILATION_CACHE="gs://bucket/xla cache;x")
  words = _main_line(ssh)
  assert words[:2] == ["MONOFORMER_COMPILATION_CACHE=gs://bucket/xla cache;x", "MONOFORMER_DISTRIBUTED=1"]
  assert words[2:5] == ["python", "-m", "monoformer_jax.main"] and words[5:] == ARGS


def test_tpu_pod_needs_its_slice_named():
  env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE")}
  proc = subprocess.run(
      ["bash", "launch/tpu_pod.sh", "--dry_run", "--config=x"],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=60,
      check=False,
  )
  assert proc.returncode != 0 and "TPU_NAME" in proc.stderr
