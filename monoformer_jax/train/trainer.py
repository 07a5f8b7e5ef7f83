"""The training loop: `train_and_evaluate(config, workdir)`.

Creates the sharded state (or restores the latest checkpoint, or initialises from a converted
checkpoint), compiles one jitted step per step kind the schedule uses, then runs the plain-Python
loop: pick the step kind, fetch its batch, dispatch, and only then read the previous step's
metrics (so the host never waits on the device in between). Saves on the configured interval, on
SIGTERM (preemption) and at the end.

A restarted job continues from its latest good checkpoint as if it had never stopped: the state,
the scheduler, the data iterators and the half-filled metrics window come back from the
checkpoint, and whatever the killed job logged after it (metrics.jsonl rows, TensorBoard events,
sample files) is dropped, so each step is logged once.

Fault injection for the resume tests (environment variables):
  MONOFORMER_FAULT_KILL_AT_STEP=N     SIGKILL once checkpoint step N is saved.
  MONOFORMER_FAULT_KILL_AFTER_STEP=N  SIGKILL right after step N is dispatched and logged, without
                                      saving it (saves already under way are finished first, so
                                      the test knows which checkpoint survives).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import jax
import numpy as np

from monoformer_jax.train import checkpointing
from monoformer_jax.train import metrics as metrics_lib
from monoformer_jax.train import setup as setup_lib
from monoformer_jax.train import sharding as sharding_lib
from monoformer_jax.train import state as state_lib
from monoformer_jax.train import steps as steps_lib
from monoformer_jax.train.periodic_samples import PeriodicSampler
from monoformer_jax.train.scheduler import StepScheduler


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. notebooks): no handler
      self._previous = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _check_finite(step: int, values: dict):
  bad = [k for k, v in values.items() if isinstance(v, float) and not np.isfinite(v)]
  if bad:
    raise FloatingPointError(f"non-finite {', '.join(bad)} at step {step}: stopping (lower the "
                             "learning rate or check the data)")


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`; returns the last logged metrics."""
  setup_lib.validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  setup_lib.save_resolved_config(config, workdir, is_main)

  mesh = sharding_lib.make_mesh(config.mesh.to_dict())
  rules = sharding_lib.rules_from_config(config.logical_axis_rules)
  tokenizer = setup_lib.build_tokenizer(config, workdir)
  model_config = setup_lib.model_config_from(config, tokenizer)
  needs_images = config.schedule.diffusion > 0 or config.schedule.mixed > 0
  objective = setup_lib.build_objective(config) if needs_images else None
  optimizer = state_lib.make_optimizer(config.optimizer)
  lr_fn = state_lib.learning_rate_schedule(config.optimizer)
  data = setup_lib.build_data(config, model_config, tokenizer)
  scheduler = StepScheduler({k: config.schedule[k] for k in steps_lib.STEP_KINDS},
                            config.schedule.text_warmup_steps)

  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  state, abstract, shardings = state_lib.create_train_state(model_config, optimizer, init_rng,
                                                            mesh, rules)
  ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.keep_checkpoints,
                                    clean_unfinished=True)
  restored = ckpt.restore_latest(checkpointing.abstract_with_shardings(abstract, shardings))
  accum = metrics_lib.Accumulator()
  if restored is not None:
    step0, state, extra = restored
    scheduler.set_state(extra["scheduler"])
    for kind, it in data.items():
      if kind in extra.get("data", {}):
        it.set_state(extra["data"][kind])
    accum.set_state(extra.get("metrics_window", {}))
    logging.info("resumed from step %d", step0)
    print(f"resumed from checkpoint step {step0}", flush=True)
  elif config.init_from:
    state = setup_lib.initialise_from(config, state, shardings, model_config, optimizer,
                                      init_rng)

  step = int(jax.device_get(state.step))
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=step)
  compiled = {}
  t_compile = time.perf_counter()
  for kind in scheduler.weights:
    step_fn = steps_lib.make_train_step(
        kind, model_config, objective, optimizer,
        grad_accum_steps=config.optimizer.grad_accum_steps,
        diffusion_weight=config.loss.diffusion_weight, lm_weight=config.loss.lm_weight,
        ema_decay_value=config.ema.decay, ema_warmup=config.ema.warmup, learning_rate_fn=lr_fn)
    compiled[kind] = steps_lib.compile_step(step_fn, shardings, mesh, rules, data[kind].spec())
  compile_note = {}
  flops_per_step = {kind: data[kind].flops_per_step(model_config, kind) for kind in compiled}

  throughput = metrics_lib.Throughput()
  sampler = PeriodicSampler(config, model_config, objective, tokenizer, workdir, writer,
                                      is_main)
  sampler.discard_after(step)
  pending = None  # (step, kind, metrics on device)
  last = {}
  t_start = time.perf_counter()
  start_step = step

  def drain(pending):
    s, kind, m = pending
    values = {k: float(v) for k, v in jax.device_get(m).items()}
    _check_finite(s, values)
    values[f"steps_{kind}"] = 1.0
    accum.add(values)
    return s

  def save(step_now):
    nonlocal pending
    if pending is not None:  # its metrics belong to the window the checkpoint carries
      drain(pending)
      pending = None
    ckpt.save(step_now, state, {
        "scheduler": scheduler.get_state(),
        "data": {k: it.get_state() for k, it in data.items()},
        "metrics_window": accum.get_state(),
        "config_hash": setup_lib.config_hash(config)}, force=True)

  with _Preemption() as preempt:
    while step < config.num_train_steps:
      kind = scheduler.next(step)
      batch = data[kind].next_global(mesh)
      if not compile_note.get(kind):
        t0 = time.perf_counter()
      state, m = compiled[kind](state, batch, step_rng)
      if not compile_note.get(kind):
        jax.block_until_ready(m)
        compile_note[kind] = time.perf_counter() - t0
        print(f"compiled and ran the first {kind} step in {compile_note[kind]:.1f}s", flush=True)
        throughput.reset()
      if pending is not None:
        drain(pending)
      pending = (step + 1, kind, m)
      step += 1
      throughput.add(*data[kind].counts(), flops_per_step[kind])
      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        drain(pending)
        pending = None
        last = accum.compute_and_reset()
        last.update(throughput.report())
        throughput.reset()
        elapsed = time.perf_counter() - t_start
        rate = (step - start_step) / max(elapsed, 1e-9)
        eta = (config.num_train_steps - step) / max(rate, 1e-9)
        writer.write_scalars(step, last)
        if is_main:
          losses = " ".join(f"{k}={last[k]:.4f}" for k in ("loss_diffusion", "loss_lm")
                            if k in last)
          print(f"step {step}/{config.num_train_steps} {losses} "
                f"lr={last.get('learning_rate', 0):.2e} {last['tokens_per_s']:.0f} tok/s "
                f"elapsed {elapsed:.0f}s eta {eta:.0f}s", flush=True)
      if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
        save(step)
        if os.environ.get("MONOFORMER_FAULT_KILL_AT_STEP") == str(step):
          # Fault injection for the resume tests: die hard (no cleanup) once this step is saved.
          ckpt.wait()
          writer.flush()
          os.kill(os.getpid(), signal.SIGKILL)
      if os.environ.get("MONOFORMER_FAULT_KILL_AFTER_STEP") == str(step):
        ckpt.wait()
        os.kill(os.getpid(), signal.SIGKILL)
      if config.sample_every_steps and step % config.sample_every_steps == 0:
        sampler(step, state.ema_params)
      if preempt.requested:
        print(f"SIGTERM: saving step {step} before exit", flush=True)
        save(step)
        break
  if pending is not None:
    drain(pending)
  if not preempt.requested and step >= config.num_train_steps:
    if step not in ckpt.steps():
      save(step)  # with num_train_steps=0: the initial state (e.g. converted by init_from)
    if step > start_step and (not config.sample_every_steps or step % config.sample_every_steps):
      sampler(step, state.ema_params)
  ckpt.close()
  writer.flush()
  writer.close()
  for it in data.values():
    it.close()
  if is_main:
    with open(os.path.join(workdir, "train_summary.json"), "w") as f:
      json.dump({"final_step": step, "wall_clock_s": time.perf_counter() - t_start,
                 "compile_s": compile_note, "last_metrics": last}, f, indent=2)
  return last
