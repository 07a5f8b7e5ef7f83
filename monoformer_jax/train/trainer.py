"""The training loop: `train_and_evaluate(config, workdir)`.

A `Trainer` owns the run: the sharded train state (created, restored from the latest checkpoint,
or initialised from a converted checkpoint), one compiled step per step kind the schedule uses,
and the metrics of the last step, read from the device only once the next step is dispatched (so
the host never waits on the device in between). `train_and_evaluate` is the plain loop around
it: a step, then the log, checkpoint, hooks and samples due at that step. It saves on the
configured interval, on SIGTERM (preemption) and at the end, and handles a non-finite loss as
config.nonfinite says (train/nonfinite.py).

A restarted job continues from its latest good checkpoint as if it had never stopped: the state,
the scheduler, the data iterators and the half-filled metrics window come back from the
checkpoint (train/snapshot.py), and whatever the killed job logged after it (metrics.jsonl rows,
TensorBoard events, sample files) is dropped, so each step is logged once.

`hooks` see every finished step (`after_step(context)` with the step, whether it was saved, the
checkpointer and the metric writer): the tests inject faults through them.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time
from typing import Any, NamedTuple, Optional, Sequence

import jax
from etils import epath

from monoformer_jax import cli
from monoformer_jax.data import registry
from monoformer_jax.run import checkpoints
from monoformer_jax.run import config as config_lib
from monoformer_jax.run import sharding as sharding_lib
from monoformer_jax.run import state as state_lib
from monoformer_jax.run.tokenizer import build_tokenizer
from monoformer_jax.train import metrics as metrics_lib
from monoformer_jax.train import steps as steps_lib
from monoformer_jax.train.data_streams import build_data
from monoformer_jax.train.init_from import check_init_from, initialise_from
from monoformer_jax.train.nonfinite import NonFinite, Rollbacks, check_finite, with_lr_scale
from monoformer_jax.train.periodic_samples import PeriodicSampler
from monoformer_jax.train.preemption import Preemption
from monoformer_jax.train.reporting import Progress, report
from monoformer_jax.train.scheduler import StepScheduler
from monoformer_jax.train.snapshot import Snapshot


@dataclasses.dataclass
class StepContext:
  """What a hook sees after a step."""

  step: int
  saved: bool
  checkpointer: Any
  writer: Any


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
  """Every check a config gets before anything is built (ConfigError naming the field), after
  what the config leaves to the run's start is filled in; returns the step schedule."""
  config_lib.resolve_config(config)
  scheduler = make_scheduler(config)
  config_lib.validate_config(config, scheduler.weights)
  return scheduler


class _Pending(NamedTuple):
  """A dispatched step whose metrics are still on the device."""

  step: int
  kind: str
  metrics: Any


class Trainer:
  """One training run in `workdir`: builds the model, the data and the state, then takes steps.

  Owns the train state, the compiled steps (at the learning rate config.nonfinite's rollbacks
  left), the metrics window since the last log and the step whose metrics are still pending.
  """

  def __init__(self, config, workdir: str, scheduler: StepScheduler):
    self.config, self.workdir, self.scheduler = config, workdir, scheduler
    self.is_main = jax.process_index() == 0
    self.mesh = sharding_lib.make_mesh(config.mesh.to_dict())
    self.rules = sharding_lib.rules_from_config(config.logical_axis_rules)
    tokenizer = build_tokenizer(config, workdir)
    self.model_config = config_lib.model_config_from(config, tokenizer)
    needs_images = config.schedule.diffusion > 0 or config.schedule.mixed > 0
    self.objective = config_lib.build_objective(config) if needs_images else None
    optimizer = state_lib.make_optimizer(config.optimizer)  # its state's structure; steps compile below
    if config.init_from and not checkpoints.step_dirs(workdir):
      check_init_from(config, self.model_config)  # before the data: a wrong model is the first thing to say
    self.data = build_data(config, self.model_config, tokenizer, scheduler.weights)
    self._create_or_restore(optimizer)
    self.writer = metrics_lib.MetricWriter(workdir, enabled=self.is_main, resume_step=self.step)
    self.compiled = self._compile_steps()
    if self.rollbacks.lr_scale != 1.0:
      report(f"learning rate x{self.rollbacks.lr_scale:g} (rollbacks after non-finite losses)")
    self.compile_s = {}  # per step kind: its first step's compile and run time
    self.flops_per_step = {kind: self.data[kind].flops_per_step(self.model_config, kind) for kind in self.compiled}
    self.sampler = PeriodicSampler(
        config,
        self.model_config,
        self.objective,
        tokenizer,
        workdir,
        self.writer,
        self.is_main,
        draws_text=config.schedule.ar > 0 or config.schedule.mixed > 0,
        mesh=self.mesh,
        rules=self.rules,
    )
    self.sampler.discard_after(self.step)
    self.pending: Optional[_Pending] = None
    self.reads = collections.Counter()  # batches read per step kind by this run
    self.reads_at_save = {self.step: {}}  # ... when each checkpoint was saved: what a rollback skips
    self.last = {}  # the last logged metrics
    self.progress = Progress(config.num_train_steps, self.step, metrics_lib.local_peak_flops())

  def _create_or_restore(self, optimizer) -> None:
    """The state (and the loop's place) of the latest checkpoint, else the one config.init_from
    converts, else a fresh one; the checkpointer, the metrics window and the rollbacks' state."""
    init_rng, self.step_rng = jax.random.split(jax.random.key(self.config.seed))
    self.state, abstract, self.shardings = state_lib.create_train_state(
        self.model_config, optimizer, init_rng, self.mesh, self.rules
    )
    self.checkpointer = checkpoints.Checkpointer(
        self.workdir, max_to_keep=self.config.keep_checkpoints, clean_unfinished=True
    )
    self.abstract = checkpoints.abstract_with_shardings(abstract, self.shardings)
    self.window = metrics_lib.Accumulator()  # the metrics since the last log
    snapshot = Snapshot.restore_latest(self.checkpointer, self.abstract)
    self.rollbacks = Rollbacks(self.config.nonfinite, snapshot.nonfinite if snapshot else {})
    if snapshot is not None:
      self._go_back_to(snapshot)
      for kind, it in self.data.items():
        if kind in snapshot.data:
          it.set_state(snapshot.data[kind])
      report(f"resumed from checkpoint step {snapshot.step}")
    elif self.config.init_from:
      self.state = initialise_from(self.config, self.state, self.shardings, self.model_config, optimizer, init_rng)
    self.step = self.start_step = int(jax.device_get(self.state.step))

  def _go_back_to(self, snapshot: Snapshot) -> None:
    """Takes `snapshot`'s state, schedule and metrics window (not its data iterators' places)."""
    self.state = snapshot.state
    self.scheduler.set_state(snapshot.scheduler)
    self.window.set_state(snapshot.metrics_window)

  def _compile_steps(self) -> dict:
    """{step kind: its jitted step}, at the learning rate the rollbacks so far left."""
    run_config = with_lr_scale(self.config, self.rollbacks.lr_scale)
    optimizer = state_lib.make_optimizer(run_config.optimizer)
    compiled = {}
    for kind in self.scheduler.weights:
      step_fn = steps_lib.train_step_from_config(kind, run_config, self.model_config, self.objective, optimizer)
      compiled[kind] = steps_lib.compile_step(step_fn, self.shardings, self.mesh, self.rules, self.data[kind].spec())
    return compiled

  def do_step(self) -> None:
    """Dispatches the next step, then reads the previous step's metrics (raises NonFinite)."""
    kind = self.scheduler.next(self.step)
    batch = self.data[kind].next_global(self.mesh)
    self.reads[kind] += 1
    if kind in self.compile_s:
      self.state, metrics = self.compiled[kind](self.state, batch, self.step_rng)
    else:
      self.state, metrics = self._first_step(kind, batch)
    self._read_pending()
    self.pending = _Pending(self.step + 1, kind, metrics)
    self.step += 1
    self.progress.add(*self.data[kind].counts(), self.flops_per_step[kind])

  def _first_step(self, kind: str, batch: dict):
    """The first step of `kind`, waited for: its compile time is reported and left out of the
    throughput."""
    t0 = time.perf_counter()
    state, metrics = self.compiled[kind](self.state, batch, self.step_rng)
    jax.block_until_ready(metrics)
    self.compile_s[kind] = time.perf_counter() - t0
    report(f"compiled and ran the first {kind} step in {self.compile_s[kind]:.1f}s")
    self.progress.restart_window()
    return state, metrics

  def _read_pending(self) -> None:
    """Adds the pending step's metrics to the window; a non-finite one raises NonFinite once the
    save in flight (the last good checkpoint) is whole and the logged metrics are flushed."""
    if self.pending is None:
      return
    step, kind, metrics = self.pending
    self.pending = None
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    try:
      check_finite(step, values)
    except NonFinite:
      self.checkpointer.wait()
      self.writer.flush()
      raise
    values[f"steps_{kind}"] = 1.0
    self.window.add(values)

  def log(self) -> None:
    """Writes the window's averages and throughput; the main process shows the progress line."""
    self._read_pending()
    metrics = self.window.compute_and_reset()
    metrics.update(self.progress.window_metrics())
    if self.config.data.skip_bad_records:  # the run's total so far, this process's shard
      metrics["skipped_records"] = float(sum(it.skipped_records() for it in self.data.values()))
    self.writer.write_scalars(self.step, metrics)
    if self.is_main:
      report(self.progress.line(self.step, metrics))
    self.last = metrics

  def save(self) -> None:
    """Checkpoints this step with the loop's place: schedule, data iterators, metrics window
    (the pending step's metrics included) and the rollbacks' state."""
    self._read_pending()
    self.rollbacks.saved(self.step)
    Snapshot(
        step=self.step,
        state=self.state,
        scheduler=self.scheduler.get_state(),
        data={k: it.get_state() for k, it in self.data.items()},
        metrics_window=self.window.get_state(),
        nonfinite=self.rollbacks.get_state(),
    ).save(self.checkpointer)
    self.reads_at_save[self.step] = dict(self.reads)

  def roll_back(self, bad: NonFinite) -> None:
    """Goes back to the last checkpoint after `bad` (policy rollback; raises cli.RunStopped under
    policy stop or when out of tries). The data iterators stay where they are: the batches read
    since the checkpoint are skipped."""
    self.rollbacks.next_try(bad)
    self.pending = None
    snapshot = Snapshot.restore_latest(self.checkpointer, self.abstract)
    if snapshot is None:
      raise cli.RunStopped(f"{bad}, and no checkpoint to roll back to") from None
    since = self.reads_at_save.get(snapshot.step, {})
    skipped = ", ".join(f"{n - since.get(k, 0)} {k}" for k, n in sorted(self.reads.items()))
    self._go_back_to(snapshot)
    self.step = snapshot.step
    self.writer.rewind(snapshot.step)
    self.sampler.discard_after(snapshot.step)
    self.compiled = self._compile_steps()
    self.progress.restart_window()
    report(
        f"WARNING: {bad}: rolled back to checkpoint step {snapshot.step} (try {self.rollbacks.tries} of "
        f"{self.config.nonfinite.max_tries}), skipping the batches read since ({skipped}), learning rate "
        f"x{self.rollbacks.lr_scale:g}"
    )

  def sample(self) -> None:
    """Writes samples of this step from the EMA weights (train/periodic_samples.py)."""
    self.sampler(self.step, self.state.ema_params)

  def finish(self, preempted: bool) -> None:
    """Reads the last step's metrics; after the last step (not a preemption) saves it unless its
    checkpoint exists and samples it unless the interval did; closes; writes train_summary.json."""
    try:
      self._read_pending()
    except NonFinite as bad:
      raise cli.RunStopped(f"{bad}; the checkpoints saved before it are intact") from None
    if not preempted and self.step >= self.config.num_train_steps:
      if self.step not in self.checkpointer.steps():
        self.save()  # with num_train_steps=0: the initial state (e.g. converted by init_from)
      if self.step > self.start_step and not _every(self.step, self.config.sample_every_steps):
        self.sample()
    self.checkpointer.close()
    self.writer.flush()
    self.writer.close()
    for it in self.data.values():
      it.close()
    if self.is_main:
      summary = {
          "final_step": self.step,
          "wall_clock_s": self.progress.elapsed(),
          "compile_s": self.compile_s,
          "last_metrics": self.last,
      }
      (epath.Path(self.workdir) / "train_summary.json").write_text(json.dumps(summary, indent=2))


def _every(step: int, interval: int) -> bool:
  """Whether an action every `interval` steps (0: never) falls on `step`."""
  return bool(interval) and step % interval == 0


def _record_config(config, workdir: str) -> None:
  """Writes WORKDIR/config.json; the main process shows the resolved config and what changed
  since the config.json of an earlier run in `workdir`."""
  is_main = jax.process_index() == 0
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  changes = config_lib.save_resolved_config(
      config, workdir, is_main, has_checkpoints=bool(checkpoints.step_dirs(workdir))
  )
  if is_main:
    config_lib.save_class_names(workdir, registry.class_names(config.data))
    report("resolved config:\n" + config.to_json(indent=2, sort_keys=True))
    for field, old, new in changes:
      report(f"config.{field} changed since this workdir's config.json: {old!r} -> {new!r}")


def train_and_evaluate(config, workdir: str, hooks: Sequence[Any] = ()) -> dict:
  """Trains `config` in `workdir` (a local or bucket path); returns the last logged metrics."""
  scheduler = check_config(config)
  _record_config(config, workdir)
  trainer = Trainer(config, workdir, scheduler)
  no_checkpoint_to_roll_back_to = config.nonfinite.policy == "rollback" and not trainer.checkpointer.steps()
  if no_checkpoint_to_roll_back_to and trainer.step < config.num_train_steps:
    trainer.save()  # a rollback needs a checkpoint to return to
  with Preemption(trainer.step) as preemption:
    while trainer.step < config.num_train_steps:
      try:
        trainer.do_step()
        step = trainer.step
        if step % config.log_every_steps == 0 or step == config.num_train_steps:
          trainer.log()
        saved = _every(step, config.checkpoint_every_steps)
        if saved:
          trainer.save()
        for hook in hooks:
          hook.after_step(StepContext(step=step, saved=saved, checkpointer=trainer.checkpointer, writer=trainer.writer))
        if _every(step, config.sample_every_steps):
          trainer.sample()
        if preemption.reached(step):
          report(f"SIGTERM: saving step {step} before exit")
          if not saved:  # the interval save of this step is the preemption save
            trainer.save()
          break
      except NonFinite as bad:
        trainer.roll_back(bad)
  trainer.finish(preempted=preemption.requested)
  return trainer.last
