"""Small shared helpers for tests: tiny configs, random parameters, random batches, one tiny run."""

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from monoformer_jax import batch as batch_lib
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.monoformer import init_params
from tests.helpers_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def session_shared(tmp_path_factory, name: str, make):
  """A directory `name` made once per test session by `make(path)`, whichever pytest-xdist
  worker asks first; the others wait for it (each worker has its own basetemp inside the
  session's: the directory sits in the session's, behind a lock)."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent
  path, done = base / name, base / f"{name}.done"
  with open(base / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      make(path)
      done.touch()
  return path


def run_module(*args, env=None) -> subprocess.CompletedProcess:
  """`python ARGS` from the repository root (the session's shared compile cache), asserting it
  exits 0; returns the finished process (its stdout / stderr)."""
  proc = subprocess.run(
      [sys.executable, *map(str, args)],
      cwd=ROOT,
      env=env or subprocess_env(),
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc


def launch_local_processes(num: int, args, log_dir, devices_per_process: int = 1, **env) -> list[str]:
  """`launch/local_multiprocess.sh num ARGS` (a multi-host run as local processes), asserting it
  exits 0; returns each process's log (written to `log_dir`)."""
  env = subprocess_env(DEVICES_PER_PROCESS=devices_per_process, LOG_DIR=log_dir, **env)
  proc = subprocess.run(
      ["bash", "launch/local_multiprocess.sh", str(num), *map(str, args)],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  logs = [(Path(log_dir) / f"monoformer_proc_{i}.log").read_text() for i in range(num)]
  assert proc.returncode == 0, proc.stderr + "".join(log[-3000:] for log in logs)
  return logs


def shared_tiny_run(tmp_path_factory):
  """The 6-step `mnist_tiny.py:test` run, trained once per test session for every module that
  only reads it (sampling, the notebook, evaluation)."""
  return session_shared(
      tmp_path_factory,
      "shared_tiny_run",
      lambda work: run_module("-m", "monoformer_jax.main", "--config=configs/mnist_tiny.py:test", f"--workdir={work}"),
  )


# Understand steps 0, 2 and 5 of the 6 (weights 4 : 1 : 4; the variant's 1 in 6 gives one), one
# in each logging window, so the logged loss_understand can be seen to fall.
THREE_UNDERSTAND_STEPS = "--config.schedule.understand=4.0"


def shared_all_in_one_run(tmp_path_factory):
  """The 6-step `mnist_tiny.py:all_in_one,test` run (digits, prose, and reading digits; three
  understand steps: THREE_UNDERSTAND_STEPS), trained
  once per session for every module that reads it; its training's stdout is saved beside it, as
  `shared_all_in_one_run.stdout`."""

  def train(work):
    proc = run_module(
        "-m",
        "monoformer_jax.main",
        "--config=configs/mnist_tiny.py:all_in_one,test",
        f"--workdir={work}",
        THREE_UNDERSTAND_STEPS,
    )
    work.parent.joinpath("shared_all_in_one_run.stdout").write_text(proc.stdout)

  return session_shared(tmp_path_factory, "shared_all_in_one_run", train)


def shared_digit_classifier(tmp_path_factory):
  """The embedded default's digit classifier (evaluation/digit_classifier.py), trained once per
  session into the cache folder returned. Trained with XLA's default flags (its training is
  execution-bound: the compile-saving test flags cost it a third more time)."""
  return str(
      session_shared(
          tmp_path_factory,
          "digit_classifier_cache",
          lambda path: run_module(
              "-c",
              f"from monoformer_jax.evaluation import digit_classifier as dc; dc.load_or_train({str(path)!r})",
              env=dict(subprocess_env(), XLA_FLAGS=""),
          ),
      )
  )


def tiny_config(**kw) -> ModelConfig:
  base = dict(
      vocab_size=97,
      hidden_size=32,
      intermediate_size=64,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      image_height=4,
      image_width=6,
      image_channels=3,
      patch_size=2,
  )
  base.update(kw)
  return ModelConfig(**base)


def random_params(config: ModelConfig, seed: int = 0, scale: float = 0.3) -> dict:
  """Fresh params with every leaf perturbed (the zero-initialised image layers too)."""
  params = jax.device_get(nn.unbox(init_params(config, jax.random.key(seed))))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: (p + scale * rng.standard_normal(p.shape) / np.sqrt(max(p.shape[0], 1) if p.ndim > 1 else 4)).astype(
          np.float32
      ),
      params,
  )


def image_sample(config, rng, prompt_len, tail_len=2, label=0):
  shape = (config.image_height, config.image_width, config.image_channels)
  return [
      ("text", rng.integers(3, config.vocab_size, prompt_len), True),
      ("image", rng.standard_normal(shape).astype(np.float32), label),
      ("text", rng.integers(3, config.vocab_size, tail_len), True),
  ]


def text_sample(config, rng, length):
  return [("text", rng.integers(3, config.vocab_size, length), True)]


def build(config, rows, seq_len, slots=1):
  """rows: list of lists of samples (each a list of pieces) -> batch."""
  shape = (config.image_height, config.image_width, config.image_channels)
  batch = batch_lib.empty_batch(len(rows), seq_len, slots, shape)
  for r, samples in enumerate(rows):
    builder = batch_lib.RowBuilder(batch, r, config.num_patches, config.has_t_token)
    for s in samples:
      builder.add(s)
  return batch


def random_fid_state_dict(seed: int) -> dict:
  """A complete, signal-preserving random state dict (torch tensors) for pytorch-fid's FID
  Inception: He-scaled convolutions and near-identity batch norm, so activations keep their scale
  through the 90-odd layers and the pooled features depend on the input (PLATFORM.md)."""
  import torch  # pylint: disable=import-outside-toplevel  # only the Inception tests need torch
  from pytorch_fid import inception as pytorch_fid_inception  # pylint: disable=import-outside-toplevel

  skeleton = pytorch_fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  gen = torch.Generator().manual_seed(seed)
  normal = lambda shape: torch.randn(shape, generator=gen)
  state = {}
  for name, value in skeleton.state_dict().items():
    if name.endswith("conv.weight"):
      state[name] = normal(value.shape) * (2.0 / value[0].numel()) ** 0.5
    elif name.endswith("bn.weight"):
      state[name] = 1.0 + 0.1 * normal(value.shape)
    elif name.endswith(("bn.bias", "bn.running_mean")):
      state[name] = 0.1 * normal(value.shape)
    elif name.endswith("bn.running_var"):
      state[name] = 1.0 + 0.2 * torch.rand(value.shape, generator=gen)
    elif name == "fc.weight":
      state[name] = normal(value.shape) / value.shape[1] ** 0.5
    elif name == "fc.bias":
      state[name] = 0.1 * normal(value.shape)
    else:  # num_batches_tracked
      state[name] = value.clone()
  return state


def pytorch_fid_outputs(state: dict, images: np.ndarray) -> dict:
  """pytorch-fid's pool features and 1008-way logits of uint8 NHWC images, with `state` as weights.

  pytorch-fid's `InceptionV3` fetches its weights with `load_state_dict_from_url`; it is replaced for
  the call by one returning `state` (nothing is downloaded). The wrapper stops at the pool features;
  the logits are its classifier layer (`fc`) applied to them, as `fid_inception_v3().fc` would.
  """
  import torch  # pylint: disable=import-outside-toplevel
  from pytorch_fid import inception as pytorch_fid_inception  # pylint: disable=import-outside-toplevel

  original = pytorch_fid_inception.load_state_dict_from_url
  pytorch_fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
  try:
    wrapper = pytorch_fid_inception.InceptionV3([3]).eval()  # resize + [-1, 1] + blocks, as in FID
  finally:
    pytorch_fid_inception.load_state_dict_from_url = original
  with torch.no_grad():
    # pytorch-fid feeds NCHW floats in [0, 1] (ToTensor of uint8 images).
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    pool = wrapper(x)[0].flatten(1)
    logits = torch.nn.functional.linear(pool, state["fc.weight"], state["fc.bias"])
  return {"pool": pool.numpy(), "logits": logits.numpy()}


def random_images(rng, shape):
  """uint8 images with per-image structure: coarse random colour blocks plus pixel noise.

  Pure i.i.d. noise images all have the same texture statistics, so their pooled features nearly
  coincide; blocks of different colours make the images (and their features) clearly different.
  """
  n, height, width, _ = shape
  coarse = rng.uniform(0, 255, (n, 6, 5, 3))
  blocks = coarse[:, np.arange(height) * 6 // height][:, :, np.arange(width) * 5 // width]
  noisy = blocks + rng.normal(0, 20, shape)
  return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def tensorboard_scalars(directory) -> dict:
  """{tag: (step, value)} from tensorboardX event files (TFRecord framing, Event protos)."""
  import os  # pylint: disable=import-outside-toplevel
  import struct  # pylint: disable=import-outside-toplevel
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel

  out = {}
  for name in os.listdir(directory):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out[v.tag] = (event.step, v.simple_value)
  return out


def write_tiny_diffusers_vae(path, seed: int, size: int = 16):
  """A random 2-level diffusers AutoencoderKL (size x size x 3 -> size/2 x size/2 x 4, scaling
  factor 0.37) saved by diffusers itself into `path` as safetensors; returns the torch model."""
  import diffusers  # pylint: disable=import-outside-toplevel  # torch: only the tests that need it
  import torch  # pylint: disable=import-outside-toplevel

  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(
      in_channels=3,
      out_channels=3,
      down_block_types=("DownEncoderBlock2D",) * 2,
      up_block_types=("UpDecoderBlock2D",) * 2,
      block_out_channels=(8, 16),
      layers_per_block=1,
      latent_channels=4,
      norm_num_groups=4,
      sample_size=size,
      scaling_factor=0.37,
  )
  model.save_pretrained(path, safe_serialization=True)
  return model
