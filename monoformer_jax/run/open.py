"""Opening a finished (or running) training run for sampling and evaluation: its resolved config,
model, tokenizer, objective, class names and the weights of its newest good checkpoint."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax

from monoformer_jax.data import registry
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.run import sharding as sharding_lib
from monoformer_jax.run import state as state_lib
from monoformer_jax.run.checkpoints import Checkpointer, abstract_with_shardings, step_dirs
from monoformer_jax.run.config import build_objective, model_config_from, read_run_config
from monoformer_jax.run.tokenizer import build_tokenizer


class RunError(FileNotFoundError):
  """A workdir without a usable run (no config.json, no loadable checkpoint)."""


@dataclasses.dataclass
class Run:
  workdir: str
  config: Any  # the resolved ml_collections.ConfigDict of WORKDIR/config.json
  model_config: ModelConfig
  tokenizer: Any
  objective: Any
  class_names: Optional[Sequence[str]]
  params: Any  # host arrays (EMA weights unless use_ema=False)
  step: int


def open_run(workdir: str, *, use_ema: bool = True, devices=None, step: Optional[int] = None) -> Run:
  """Restores the newest loadable checkpoint of `workdir` (or the one of `step`) onto one local
  device.

  One local device: under multi-host every process loads its own copy (jax.devices()[:1] would
  name process 0's device, which other processes cannot address).
  """
  config = read_run_config(workdir)
  model_config = model_config_from(config)
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, (devices or jax.local_devices())[:1])
  rules = sharding_lib.rules_from_config(config.logical_axis_rules)
  optimizer = state_lib.make_optimizer(config.optimizer)
  abstract, shardings = state_lib.state_shardings(model_config, optimizer, mesh, rules)
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    got = ckpt.restore_latest(abstract_with_shardings(abstract, shardings), at_most=step)
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
  restored_step, state, _ = got
  params = jax.device_get(state.ema_params if use_ema else state.params)
  tokenizer = build_tokenizer(config, workdir)
  return Run(
      workdir=str(workdir),
      config=config,
      model_config=model_config_from(config, tokenizer),
      tokenizer=tokenizer,
      objective=build_objective(config),
      class_names=registry.class_names(config.data),
      params=params,
      step=int(restored_step),
  )
