"""Opening a run to read it (sampling, evaluation, `init_from=run:`, `InferenceModel`).

    run = open_run("runs/mnist_tiny")                              # EMA weights, float32, 1 device
    run = open_run("gs://b/runs/in256", dtype="bfloat16", mesh=mesh_from_spec("fsdp=4,tensor=2"))
    run = open_run("exported/")                                    # a weights-only folder (tools.export)

A run is a training workdir (config.json, tokenizer/, checkpoints/) or a weights-only folder that
`tools.export` wrote from one (config.json, tokenizer/, weights.safetensors, export.json). Opening
reads, top to bottom: the config, the run's own tokenizer file, its class names and the weights
alone, each straight into the dtype asked and onto its final sharding (the optimizer's arrays are
never read). Nothing is trained, built or written.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from etils import epath

from monoformer_jax.data import registry
from monoformer_jax.data.tokenizer import load_sentencepiece
from monoformer_jax.diffusion.options import ImageSampling
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.monoformer import init_params
from monoformer_jax.run import sharding as sharding_lib
from monoformer_jax.run import weights_file
from monoformer_jax.run.checkpoints import Checkpointer, CheckpointMismatchError, step_dirs
from monoformer_jax.run.config import (
    CLASS_NAMES_FILE,
    build_objective,
    image_sampling,
    model_config_from,
    read_run_config,
)

TOKENIZER_FILE = "tokenizer/tokenizer.model"
WEIGHTS_FILE = "weights.safetensors"
EXPORT_FILE = "export.json"  # written last: a folder without it is an export cut short
DTYPES = ("float32", "bfloat16", "float16")
# Trained weights shipped inside the package (weights-only exports), opened as `pretrained:NAME`.
PRETRAINED_PREFIX = "pretrained:"
PRETRAINED_DIR = epath.Path(__file__).parent.parent / "pretrained"


class RunError(FileNotFoundError):
  """A workdir that cannot be opened as asked (no config.json, no loadable weights, no EMA...)."""


@dataclasses.dataclass
class Run:
  workdir: str
  config: Any  # the resolved ml_collections.ConfigDict of WORKDIR/config.json
  model_config: ModelConfig
  tokenizer: Any
  objective: Any
  class_names: Optional[Sequence[str]]
  params: Any  # device arrays on `mesh`, in the dtype asked
  step: int
  mesh: Any
  rules: tuple
  weights: str  # "ema" or "raw"

  @property
  def image_sampling(self) -> ImageSampling:
    """The run's image-sampling defaults (`config.sampling`)."""
    return image_sampling(self.config)


def open_run(
    workdir: str,
    *,
    use_ema: Optional[bool] = None,
    dtype: Optional[str] = None,
    mesh=None,
    step: Optional[int] = None,
) -> Run:
  """Opens `workdir` for reading: its newest loadable checkpoint (or the one of `step`), or the
  weights of an exported folder.

  use_ema: None takes the EMA weights where the run has them (a checkpoint always does; an
  export holds the one set it was written with); True / False insist on EMA / raw weights.
  dtype: the weights' dtype in memory ("bfloat16" halves it), None = as stored (float32).
  mesh: where the weights go, sharded by the run's logical axis rules (default: this process's
  first device; under multi-host every process loads its own copy).
  """
  workdir = resolve_workdir(workdir)
  config = read_run_config(workdir)
  tokenizer = load_run_tokenizer(workdir)
  model_config = model_config_from(config, tokenizer)
  mesh = one_device_mesh() if mesh is None else mesh
  rules = sharding_lib.rules_from_config(config.logical_axis_rules)
  check_mesh_fits(model_config, mesh)
  abstract = abstract_params(model_config, mesh, rules, dtype)
  if is_export(workdir):
    got_step, weights, params = _exported_weights(workdir, abstract, use_ema, step)
  else:
    got_step, weights, params = _checkpoint_weights(workdir, abstract, use_ema, step)
  return Run(
      workdir=str(workdir),
      config=config,
      model_config=model_config,
      tokenizer=tokenizer,
      objective=build_objective(config),
      class_names=read_class_names(workdir, config),
      params=params,
      step=got_step,
      mesh=mesh,
      rules=rules,
      weights=weights,
  )


def pretrained_names() -> list[str]:
  """The names `pretrained:NAME` opens (the shipped exports)."""
  if not PRETRAINED_DIR.is_dir():
    return []
  return sorted(d.name for d in PRETRAINED_DIR.iterdir() if (d / EXPORT_FILE).is_file())


def resolve_workdir(workdir: str) -> str:
  """`pretrained:NAME` -> the shipped folder of that name; any other path as it is."""
  workdir = str(workdir)
  if not workdir.startswith(PRETRAINED_PREFIX):
    return workdir
  name = workdir[len(PRETRAINED_PREFIX) :]
  if name not in pretrained_names():
    raise RunError(f"no shipped weights named {name!r} (pretrained: {', '.join(pretrained_names()) or 'none'})")
  return str(PRETRAINED_DIR / name)


def load_run_tokenizer(workdir: str):
  """The tokenizer a run trained with: its own copy, WORKDIR/tokenizer/tokenizer.model."""
  path = epath.Path(workdir) / TOKENIZER_FILE
  if not path.is_file():
    raise RunError(f"{workdir} has no {TOKENIZER_FILE} (every run keeps the tokenizer it trained with there)")
  return load_sentencepiece(str(path))


def read_class_names(workdir: str, config) -> Optional[list[str]]:
  """WORKDIR/class_names.json (what the run trained with), else what its data config names."""
  path = epath.Path(workdir) / CLASS_NAMES_FILE
  if path.is_file():
    return registry.names_from_json(json.loads(path.read_text()), str(path))
  return registry.class_names(config.data)


def one_device_mesh(devices=None):
  """A 1x1x1 mesh on this process's first local device."""
  return sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, list(devices or jax.local_devices())[:1])


def mesh_from_spec(spec: str, devices=None):
  """'fsdp=4,tensor=2' -> a mesh over this process's local devices: an axis not named is 1, but
  data takes the devices left over unless every axis is given (then the first devices that
  make up the mesh are used). ValueError names a malformed or impossible spec."""
  given = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, _, value = (x.strip() for x in part.partition("="))
    if name not in sharding_lib.MESH_AXES or not value.lstrip("-").isdigit():
      raise ValueError(f"mesh {spec!r}: give axis=size pairs over {sharding_lib.MESH_AXES}, e.g. 'fsdp=4,tensor=2'")
    given[name] = int(value)
  devices = list(devices or jax.local_devices())
  sizes = {"data": 1 if -1 in given.values() else -1, "fsdp": 1, "tensor": 1, **given}
  if -1 not in sizes.values():
    devices = devices[: max(1, math.prod(sizes.values()))]
  return sharding_lib.make_mesh(sizes, devices)


def check_mesh_fits(model_config: ModelConfig, mesh) -> None:
  """ValueError when the mesh cannot shard this model: tensor must divide the attention heads
  and fsdp the model width (a weight it did not divide would stay whole on every device)."""
  tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
  if model_config.num_heads % tensor:
    raise ValueError(f"mesh tensor={tensor} does not divide the model's {model_config.num_heads} attention heads")
  if model_config.hidden_size % fsdp:
    raise ValueError(f"mesh fsdp={fsdp} does not divide the model width {model_config.hidden_size}")


def abstract_params(model_config: ModelConfig, mesh, rules, dtype: Optional[str] = None):
  """The model's parameters as jax.ShapeDtypeStructs in `dtype` (None: float32) with the
  shardings the logical axis rules give on `mesh`; nothing is allocated."""
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}: use one of {DTYPES}")
  boxed = jax.eval_shape(lambda: init_params(model_config, jax.random.key(0)))
  shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype) if dtype else a.dtype, sharding=s),
      nn.unbox(boxed),
      shardings,
  )


def is_export(workdir: str) -> bool:
  """Whether `workdir` is a weights-only folder written by tools.export."""
  return (epath.Path(workdir) / WEIGHTS_FILE).exists()


def read_export_info(workdir: str) -> dict:
  path = epath.Path(workdir) / EXPORT_FILE
  if not path.is_file():
    raise RunError(f"{workdir} holds {WEIGHTS_FILE} but no {EXPORT_FILE}: an export that was cut short")
  return json.loads(path.read_text())


def _exported_weights(workdir, abstract, use_ema, step):
  info = read_export_info(workdir)
  weights = info["weights"]
  if use_ema is not None and use_ema != (weights == "ema"):
    raise RunError(
        f"{workdir} holds the {weights} weights only, not the {'EMA' if use_ema else 'raw'} ones "
        "(export the run again with the other choice, or open it without asking)"
    )
  if step is not None and step != info["step"]:
    raise RunError(f"{workdir} holds the weights of step {info['step']}, not {step}")
  try:
    params = weights_file.load_weights(epath.Path(workdir) / WEIGHTS_FILE, abstract)
  except ValueError as e:
    raise CheckpointMismatchError(str(e)) from None
  return int(info["step"]), weights, params


def _checkpoint_weights(workdir, abstract, use_ema, step):
  ckpt = Checkpointer(workdir, async_save=False, read_only=True)
  try:
    got = ckpt.restore_weights(abstract, ema=use_ema is not False, at_most=step)
  finally:
    ckpt.close()
  if step is not None and got is not None and got[0] != step:
    raise RunError(f"no loadable checkpoint of step {step} in {workdir}/checkpoints (steps: {step_dirs(workdir)})")
  if got is None:
    steps = step_dirs(workdir)
    raise RunError(
        f"no loadable checkpoint in {workdir}/checkpoints"
        + (f" (steps {steps} could not be read: see the warnings above)" if steps else "")
    )
  return int(got[0]), "raw" if use_ema is False else "ema", got[1]
