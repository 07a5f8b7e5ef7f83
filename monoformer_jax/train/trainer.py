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

`hooks` see every finished step (`after_step(context)` with the step, whether it was saved, the
checkpointer and the metric writer): the tests inject faults through them.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import signal
import time
from typing import Any, Sequence

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from monoformer_jax import cli
from monoformer_jax.run import checkpoints
from monoformer_jax.run import config as config_lib
from monoformer_jax.run import sharding as sharding_lib
from monoformer_jax.run import state as state_lib
from monoformer_jax.run.tokenizer import build_tokenizer
from monoformer_jax.train import metrics as metrics_lib
from monoformer_jax.train import steps as steps_lib
from monoformer_jax.train.data_streams import build_data
from monoformer_jax.train.init_from import check_init_from, initialise_from
from monoformer_jax.train.periodic_samples import PeriodicSampler
from monoformer_jax.train.scheduler import StepScheduler


@dataclasses.dataclass
class StepContext:
  """What a hook sees after a step."""

  step: int
  saved: bool
  checkpointer: Any
  writer: Any


class _Preemption:
  """SIGTERM (preemption) -> every process saves the same step and stops.

  One process without jax.distributed: our SIGTERM handler sets a flag the loop checks between
  steps. Under jax.distributed, `jax.distributed.initialize` has installed JAX's own SIGTERM
  notifier: a SIGTERM to any one process reaches all of them through the coordination service,
  and `reached_preemption_sync_point(step)` turns True on every process at the same step (one
  past the largest step any of them had reached), so they all take part in one collective save.
  A Python handler installed after `initialize` would take the signal from JAX's notifier (no
  process would ever reach the sync point), so under jax.distributed we install none.

  JAX's protocol takes each process's last reported step (0 before the first report), so the
  step the loop starts from is reported on entry: a notice arriving while the first step
  compiles then stops the run after that step, where unreported it would set the sync point to
  step 1, long past in a resumed run, and no process would ever save. (A notice arriving before
  that, while the checkpoint is restored, is lost that way; the scheduler's kill at the end of
  its grace period then restarts the job from the same checkpoint.)
  """

  def __init__(self, step: int):
    self.requested = False
    self._previous = None
    self._synced = False
    self._step = step

  def __enter__(self):
    self._synced = jax.distributed.is_initialized()
    if self._synced:
      self.reached(self._step)
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. notebooks): no handler
      self._previous = None
    return self

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to save `step` and stop. Called after every step on every process: JAX's sync
    protocol counts on every process reporting each step."""
    if self._synced and not self.requested:
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _NonFinite(Exception):
  """A step's loss or gradient norm is NaN / Inf (handled by config.nonfinite's policy)."""

  def __init__(self, step: int, names: list):
    super().__init__(f"non-finite {', '.join(names)} at step {step}")
    self.step = step


def _check_finite(step: int, values: dict):
  bad = [k for k, v in values.items() if isinstance(v, float) and not np.isfinite(v)]
  if bad:
    raise _NonFinite(step, bad)


class _Rollbacks:
  """config.nonfinite's state: the learning-rate scale so far and the rollbacks since the last
  checkpoint saved past a non-finite step. Saved in checkpoints, so a restarted run keeps both."""

  def __init__(self, policy, state: dict):
    self.policy = policy
    self.lr_scale = float(state.get("lr_scale", 1.0))
    self.tries = int(state.get("tries", 0))
    self.bad_step = int(state.get("bad_step", -1))

  def get_state(self) -> dict:
    return {"lr_scale": self.lr_scale, "tries": self.tries, "bad_step": self.bad_step}

  def saved(self, step: int) -> None:
    if step > self.bad_step:
      self.tries = 0

  def next_try(self, bad: _NonFinite) -> None:
    """Counts a rollback for `bad`, or raises cli.RunStopped when the policy says stop."""
    if self.policy.policy == "stop":
      raise cli.RunStopped(
          f"{bad} (lower the learning rate or check the data; config.nonfinite.policy=rollback "
          "recovers instead); the checkpoints saved before it are intact"
      )
    if self.tries >= self.policy.max_tries:
      raise cli.RunStopped(
          f"{bad}, after {self.tries} rollbacks without a checkpoint past step {self.bad_step} "
          "(config.nonfinite.max_tries); the checkpoints saved before it are intact"
      )
    self.tries += 1
    self.bad_step = max(self.bad_step, bad.step)
    self.lr_scale *= self.policy.lr_factor


def _with_lr_scale(config, scale: float):
  """`config` with optimizer.learning_rate scaled (the schedule's shape kept)."""
  if scale == 1.0:
    return config
  scaled = config.copy_and_resolve_references()
  scaled.optimizer.learning_rate = config.optimizer.learning_rate * scale
  return scaled


def make_scheduler(config) -> StepScheduler:
  """The schedule of `config.schedule`, its errors named by field."""
  weights = {k: config.schedule[k] for k in steps_lib.STEP_KINDS}
  if any(v < 0 for v in weights.values()) or not any(v > 0 for v in weights.values()):
    raise config_lib.ConfigError(f"config.schedule: weights must be >= 0 with at least one > 0, got {weights}")
  warmup = config.schedule.text_warmup_steps
  if not isinstance(warmup, int):
    raise config_lib.ConfigError(f"config.schedule.text_warmup_steps: must be an integer, got {warmup!r}")
  try:
    return StepScheduler(weights, warmup)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.schedule.text_warmup_steps: {e}") from e


def check_config(config) -> StepScheduler:
  """Every check a config gets before anything is built (ConfigError naming the field); returns
  the step schedule."""
  scheduler = make_scheduler(config)
  config_lib.validate_config(config, scheduler.weights)
  return scheduler


def train_and_evaluate(config, workdir: str, hooks: Sequence[Any] = ()) -> dict:
  """Trains `config` in `workdir` (a local or bucket path); returns the last logged metrics."""
  scheduler = check_config(config)
  is_main = jax.process_index() == 0
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  changes = config_lib.save_resolved_config(
      config, workdir, is_main, has_checkpoints=bool(checkpoints.step_dirs(workdir))
  )
  if is_main:
    print("resolved config:\n" + config.to_json(indent=2, sort_keys=True), flush=True)
    for field, old, new in changes:
      print(f"config.{field} changed since this workdir's config.json: {old!r} -> {new!r}", flush=True)

  mesh = sharding_lib.make_mesh(config.mesh.to_dict())
  rules = sharding_lib.rules_from_config(config.logical_axis_rules)
  tokenizer = build_tokenizer(config, workdir)
  model_config = config_lib.model_config_from(config, tokenizer)
  needs_images = config.schedule.diffusion > 0 or config.schedule.mixed > 0
  objective = config_lib.build_objective(config) if needs_images else None
  optimizer = state_lib.make_optimizer(config.optimizer)  # its state's structure; steps compile below
  if config.init_from and not checkpoints.step_dirs(workdir):
    check_init_from(config, model_config)  # before the data: a wrong model is the first thing to say
  data = build_data(config, model_config, tokenizer, scheduler.weights)

  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)
  state, abstract, shardings = state_lib.create_train_state(model_config, optimizer, init_rng, mesh, rules)
  ckpt = checkpoints.Checkpointer(workdir, max_to_keep=config.keep_checkpoints, clean_unfinished=True)
  abstract_sharded = checkpoints.abstract_with_shardings(abstract, shardings)
  restored = ckpt.restore_latest(abstract_sharded)
  accum = metrics_lib.Accumulator()
  rollbacks = _Rollbacks(config.nonfinite, restored[2].get("nonfinite", {}) if restored else {})
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
    state = initialise_from(config, state, shardings, model_config, optimizer, init_rng)

  step = int(jax.device_get(state.step))
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=step)

  def compile_steps() -> dict:
    run_config = _with_lr_scale(config, rollbacks.lr_scale)
    run_optimizer = state_lib.make_optimizer(run_config.optimizer)
    out = {}
    for kind in scheduler.weights:
      step_fn = steps_lib.train_step_from_config(kind, run_config, model_config, objective, run_optimizer)
      out[kind] = steps_lib.compile_step(step_fn, shardings, mesh, rules, data[kind].spec())
    return out

  compiled = compile_steps()
  if rollbacks.lr_scale != 1.0:
    print(f"learning rate x{rollbacks.lr_scale:g} (rollbacks after non-finite losses)", flush=True)
  compile_note = {}
  flops_per_step = {kind: data[kind].flops_per_step(model_config, kind) for kind in compiled}

  throughput = metrics_lib.Throughput()
  sampler = PeriodicSampler(
      config,
      model_config,
      objective,
      tokenizer,
      workdir,
      writer,
      is_main,
      draws_text=config.schedule.ar > 0 or config.schedule.mixed > 0,
      mesh=mesh,
      rules=rules,
  )
  sampler.discard_after(step)
  pending = None  # (step, kind, metrics on device)
  reads = collections.Counter()  # batches read per step kind by this run
  reads_at_save = {step: {}}  # ... when each checkpoint was saved: what a rollback skips
  last = {}
  t_start = time.perf_counter()
  start_step = step

  def drain(pending):
    s, kind, m = pending
    values = {k: float(v) for k, v in jax.device_get(m).items()}
    try:
      _check_finite(s, values)
    except _NonFinite:
      ckpt.wait()  # a save still in flight finishes: the last good checkpoint stays whole
      writer.flush()
      raise
    values[f"steps_{kind}"] = 1.0
    accum.add(values)
    return s

  def save(step_now):
    nonlocal pending
    if pending is not None:  # its metrics belong to the window the checkpoint carries
      drain(pending)
      pending = None
    rollbacks.saved(step_now)
    ckpt.save(
        step_now,
        state,
        {
            "scheduler": scheduler.get_state(),
            "data": {k: it.get_state() for k, it in data.items()},
            "metrics_window": accum.get_state(),
            "nonfinite": rollbacks.get_state(),
        },
        force=True,
    )
    reads_at_save[step_now] = dict(reads)

  def roll_back(bad: _NonFinite) -> int:
    """Restores the last checkpoint after `bad` (policy rollback) and returns its step. The data
    iterators stay where they are: the batches read since the checkpoint are skipped."""
    nonlocal state, compiled, pending
    rollbacks.next_try(bad)  # raises cli.RunStopped under policy stop or when out of tries
    pending = None
    restored = ckpt.restore_latest(abstract_sharded)
    if restored is None:
      raise cli.RunStopped(f"{bad}, and no checkpoint to roll back to") from None
    back, state, extra = restored
    since = reads_at_save.get(back, {})
    skipped = ", ".join(f"{n - since.get(k, 0)} {k}" for k, n in sorted(reads.items()))
    scheduler.set_state(extra["scheduler"])
    accum.set_state(extra.get("metrics_window", {}))
    writer.rewind(back)
    sampler.discard_after(back)
    compiled = compile_steps()
    throughput.reset()
    print(
        f"WARNING: {bad}: rolled back to checkpoint step {back} (try {rollbacks.tries} of "
        f"{config.nonfinite.max_tries}), skipping the batches read since ({skipped}), learning rate "
        f"x{rollbacks.lr_scale:g}",
        flush=True,
    )
    return back

  if config.nonfinite.policy == "rollback" and not ckpt.steps() and step < config.num_train_steps:
    save(step)  # a rollback needs a checkpoint to return to
  with _Preemption(step) as preempt:
    while step < config.num_train_steps:
      try:
        kind = scheduler.next(step)
        batch = data[kind].next_global(mesh)
        reads[kind] += 1
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
          if config.data.skip_bad_records:  # the run's total so far, this process's shard
            last["skipped_records"] = float(sum(it.skipped_records() for it in data.values()))
          throughput.reset()
          elapsed = time.perf_counter() - t_start
          rate = (step - start_step) / max(elapsed, 1e-9)
          eta = (config.num_train_steps - step) / max(rate, 1e-9)
          writer.write_scalars(step, last)
          if is_main:
            losses = " ".join(
                f"{k}={last[k]:.4f}" for k in ("loss_diffusion", "loss_lm", "loss_understand") if k in last
            )
            print(
                f"step {step}/{config.num_train_steps} {losses} "
                f"lr={last.get('learning_rate', 0):.2e} {last['tokens_per_s']:.0f} tok/s "
                f"elapsed {elapsed:.0f}s eta {eta:.0f}s",
                flush=True,
            )
        saved = bool(config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0)
        if saved:
          save(step)
        for hook in hooks:
          hook.after_step(StepContext(step=step, saved=saved, checkpointer=ckpt, writer=writer))
        if config.sample_every_steps and step % config.sample_every_steps == 0:
          sampler(step, state.ema_params)
        if preempt.reached(step):
          print(f"SIGTERM: saving step {step} before exit", flush=True)
          if not saved:  # the interval save of this step is the preemption save
            save(step)
          break
      except _NonFinite as bad:
        step = roll_back(bad)
  if pending is not None:
    try:
      drain(pending)
    except _NonFinite as bad:
      raise cli.RunStopped(f"{bad}; the checkpoints saved before it are intact") from None
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
    (epath.Path(workdir) / "train_summary.json").write_text(
        json.dumps(
            {
                "final_step": step,
                "wall_clock_s": time.perf_counter() - t_start,
                "compile_s": compile_note,
                "last_metrics": last,
            },
            indent=2,
        )
    )
  return last
