"""The training system end to end: resume after SIGKILL, half-written and corrupt checkpoints,
initialisation from other checkpoints, what a run records, config errors.

The runs are subprocesses of `python -m monoformer_jax.main` on the `mnist_tiny.py:test` config.
They share the session's XLA compilation cache (tests/conftest.py), so only the first run of a
given program pays its compile; the runs compile the same programs, so this keeps the module cheap.
"""

import json
import os
import re
import shutil
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mnist_tiny
from monoformer_jax.run import checkpoints
from monoformer_jax.run.config import ConfigError, build_objective, save_resolved_config
from monoformer_jax.run.open import open_run
from monoformer_jax.train.trainer import check_config
from monoformer_jax.train.scheduler import StepScheduler
from tests.helpers import shared_tiny_run
from tests.helpers_env import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Throughput values depend on the wall clock; every other metric must be reproduced exactly.
TIMING_KEYS = {"step_time_s", "tokens_per_s", "images_per_s", "tflops_per_device", "mfu"}


def _run(workdir, *overrides, env=None, check=True, module="monoformer_jax.main"):
  cmd = [sys.executable, "-m", module, "--config=configs/mnist_tiny.py:test", f"--workdir={workdir}", *overrides]
  full_env = subprocess_env()
  full_env.update(env or {})
  proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _final_params(workdir, use_ema=False):
  return open_run(str(workdir), use_ema=use_ema).params


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def _tb_events(workdir):
  """Every Event of WORKDIR/tensorboard, per file (sorted by name), parsed from the TFRecord
  framing: u64 length, u32 masked CRC of it, the Event proto, u32 masked CRC of the data."""
  from tensorboardX.proto import event_pb2

  tb_dir = os.path.join(workdir, "tensorboard")
  files = {}
  for name in sorted(n for n in os.listdir(tb_dir) if n.startswith("events.")):
    with open(os.path.join(tb_dir, name), "rb") as f:
      data = f.read()
    events, pos = [], 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      if pos + 12 + length + 4 > len(data):
        break  # a record cut short (the writer was killed)
      event = event_pb2.Event()
      event.ParseFromString(data[pos + 12 : pos + 12 + length])
      events.append(event)
      pos += 12 + length + 4
    files[name] = events
  return files


# 12 steps of the test config (5 diffusion : 1 AR), checkpoints every 4 steps keeping the last 2,
# metrics every 3: logging windows straddle the checkpoints, and the windows of steps 1-3 and 7-9
# have no AR step (no loss_lm in their rows).
STEPS = [
    "--config.num_train_steps=12",
    "--config.checkpoint_every_steps=4",
    "--config.log_every_steps=3",
    "--config.keep_checkpoints=2",
]
_SCHEDULE = StepScheduler({"diffusion": 5, "ar": 1})  # the test config's
KINDS = [_SCHEDULE.next(i) for i in range(12)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """One uninterrupted run: the reference of the resume test, the run the observability test
  inspects, and the run another run initialises from."""
  work = tmp_path_factory.mktemp("straight")
  proc = _run(work, *STEPS)
  return work, proc


@pytest.mark.slow
def test_sigkill_between_checkpoints_and_resume_is_exact(tmp_path, straight):
  straight_dir, _ = straight
  broken = tmp_path / "broken"
  # Killed at step 10: after checkpoint 8, mid-interval, with the row of step 9 already logged.
  killed = _run(broken, *STEPS, "--kill_after_step=10", module="tests.fault_main", check=False)
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert sorted(os.listdir(broken / "checkpoints"), key=int) == ["4", "8"]
  assert [r["step"] for r in _rows(broken)] == [3, 6, 9]
  resumed = _run(broken, *STEPS)
  assert "resumed from checkpoint step 8" in resumed.stdout
  assert "dropped 1 metrics.jsonl rows past step 8" in resumed.stdout

  # Every row, no duplicates, the same values (the window 7-9 began before the checkpoint).
  a, b = _rows(straight_dir), _rows(broken)
  assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6, 9, 12]
  for ra, rb in zip(a, b):
    assert set(ra) == set(rb), (ra, rb)
    assert {k: v for k, v in ra.items() if k not in TIMING_KEYS} == {
        k: v for k, v in rb.items() if k not in TIMING_KEYS
    }
  _assert_trees_equal(_final_params(straight_dir), _final_params(broken))
  _assert_trees_equal(_final_params(straight_dir, use_ema=True), _final_params(broken, use_ema=True))
  # TensorBoard files cannot be rewritten: the resumed run's file starts with a SessionLog.START
  # at step 9, which makes TensorBoard hide the killed run's events from step 9 on.
  files = list(_tb_events(broken).values())
  assert len(files) == 2
  starts = [e.step for e in files[1] if e.HasField("session_log")]
  assert starts == [9]


@pytest.mark.slow
def test_a_run_records_metrics_tensorboard_progress_and_prunes_checkpoints(straight):
  work, proc = straight
  rows = _rows(work)
  assert [r["step"] for r in rows] == [3, 6, 9, 12]
  for row in rows:
    window = KINDS[row["step"] - 3 : row["step"]]
    for key in (
        "learning_rate",
        "grad_norm",
        "loss",
        "tokens_per_s",
        "images_per_s",
        "tflops_per_device",
        "step_time_s",
    ):
      assert np.isfinite(row[key]) and row[key] >= 0, (key, row)
    assert row["tokens_per_s"] > 0 and row["images_per_s"] > 0 and row["grad_norm"] > 0
    assert ("loss_diffusion" in row) == ("diffusion" in window), row
    assert ("loss_lm" in row) == ("ar" in window), row
  assert "loss_lm" not in rows[0] and "loss_lm" in rows[1]  # the schedule gives both cases
  # The learning rate averaged over the window's steps (step s trains at schedule(s - 1)).
  from monoformer_jax.run.state import learning_rate_schedule

  lr = learning_rate_schedule(mnist_tiny.get_config("test").optimizer)
  for row in rows:
    want = np.mean([float(lr(s - 1)) for s in range(row["step"] - 2, row["step"] + 1)])
    np.testing.assert_allclose(row["learning_rate"], want, rtol=1e-5)

  # TensorBoard: the same scalars at the same steps, and the final sample grid as an image.
  events = [e for evs in _tb_events(work).values() for e in evs]
  scalars, images = {}, {}
  for e in events:
    for v in e.summary.value:
      if v.WhichOneof("value") == "image":
        images[(v.tag, e.step)] = v.image
      elif v.WhichOneof("value") == "simple_value":
        scalars.setdefault(v.tag, {})[e.step] = v.simple_value
  for row in rows:
    for key in (
        "loss_diffusion",
        "loss_lm",
        "learning_rate",
        "grad_norm",
        "tokens_per_s",
        "images_per_s",
        "tflops_per_device",
    ):
      if key in row:
        np.testing.assert_allclose(scalars[key][row["step"]], row[key], rtol=1e-6)
  image = images[("samples", 12)]
  png = open(work / "samples" / "step_12.png", "rb").read()
  assert image.encoded_image_string[:8] == png[:8] == b"\x89PNG\r\n\x1a\n"
  assert (image.height, image.width) == (10 * 28, 28)  # a row per digit class, 1 per class

  # The progress line with ETA, at every log step.
  for step in (3, 6, 9, 12):
    assert re.search(
        rf"^step {step}/12 loss_diffusion=\d+\.\d{{4}}.* lr=\S+ \d+ tok/s " rf"elapsed \d+s eta \d+s$",
        proc.stdout,
        re.M,
    ), proc.stdout[-2000:]
  # keep_checkpoints=2 pruned steps 4 and the final save did not duplicate 12.
  assert sorted(os.listdir(work / "checkpoints"), key=int) == ["8", "12"]


def _save_tiny_official(out_dir, seed):
  """A MonoFormer checkpoint in the official layout, of the test config's model, with every
  weight random (the zero-initialised image layers too)."""
  from monoformer_jax.convert.checkpoints import save_official
  from monoformer_jax.model.config import ModelConfig
  from tests.helpers import random_params

  c = mnist_tiny.get_config("test")
  # The run's vocabulary (516 = the 512-token tokenizer + 4 special tokens) and model.
  model_config = ModelConfig.from_mapping(c.model)
  params = random_params(model_config, seed=seed)
  save_official(params, model_config, str(out_dir))
  return params


# num_train_steps=0: initialise, save the initial state as checkpoint 0 and stop (no step is
# compiled, so these runs cost little more than the process start).
INIT = ["--config.num_train_steps=0"]


def _assert_run_starts_from(workdir, params):
  """Checkpoint 0 of `workdir` holds `params` as its weights and as its EMA."""
  assert os.listdir(workdir / "checkpoints") == ["0"]
  _assert_trees_equal(_final_params(workdir), params)
  _assert_trees_equal(_final_params(workdir, use_ema=True), params)


@pytest.mark.slow
def test_init_from_an_official_checkpoint(tmp_path, seed):
  params = _save_tiny_official(tmp_path / "official", seed)
  proc = _run(tmp_path / "run", f"--config.init_from=official:{tmp_path / 'official'}", *INIT)
  assert "initialised from official:" in proc.stdout
  _assert_run_starts_from(tmp_path / "run", params)


@pytest.mark.slow
def test_init_from_another_run(tmp_path, straight):
  source, _ = straight
  proc = _run(tmp_path / "run", f"--config.init_from=run:{source}", *INIT)
  assert f"initialised from run:{source}" in proc.stdout
  assert "resumed" not in proc.stdout
  # The source run's latest raw (not EMA) weights start the new run, its EMA included.
  source_params = _final_params(source)
  assert not all(
      np.array_equal(a, b)
      for a, b in zip(jax.tree.leaves(source_params), jax.tree.leaves(_final_params(source, use_ema=True)))
  )
  _assert_run_starts_from(tmp_path / "run", source_params)
  # A second start of the same workdir resumes from its own checkpoint, not from the source.
  again = _run(tmp_path / "run", f"--config.init_from=run:{source}", *INIT)
  assert "resumed from checkpoint step 0" in again.stdout
  assert "initialised from" not in again.stdout


@pytest.mark.slow
def test_sigkill_mid_save_resumes_from_the_last_complete_checkpoint(tmp_path, straight):
  """Killed inside orbax's background commit of step 8 (arrays written, no commit marker): the
  partial save is never read; the restart deletes it, resumes from step 4 and ends bit-exact."""
  straight_dir, _ = straight
  broken = tmp_path / "broken"
  killed = _run(broken, *STEPS, "--kill_mid_save=8", module="tests.fault_main", check=False)
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert "SIGKILL while committing checkpoint 8" in killed.stdout
  assert sorted(os.listdir(broken / "checkpoints")) == ["4", f"8{checkpoints.TMP_DIR_SUFFIX}"]
  resumed = _run(broken, *STEPS)
  assert "ignoring and deleting the unfinished save" in resumed.stdout
  assert "resumed from checkpoint step 4" in resumed.stdout
  assert sorted(os.listdir(broken / "checkpoints"), key=int) == ["8", "12"]
  assert [r["step"] for r in _rows(broken)] == [3, 6, 9, 12]
  _assert_trees_equal(_final_params(straight_dir), _final_params(broken))
  _assert_trees_equal(_final_params(straight_dir, use_ema=True), _final_params(broken, use_ema=True))


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back(tmp_path, tmp_path_factory):
  work = tmp_path / "run"
  # The shared tiny run is this config's 6 steps, checkpoints 3 and 6: corrupt a copy of it.
  shutil.copytree(shared_tiny_run(tmp_path_factory), work, ignore=shutil.ignore_patterns("eval"))
  ckpts = work / "checkpoints"
  assert sorted(os.listdir(ckpts)) == ["3", "6"]
  # A save of step 9 interrupted half-way: orbax's temporary folder, without its commit marker.
  shutil.copytree(ckpts / "6", ckpts / f"9{checkpoints.TMP_DIR_SUFFIX}")
  os.remove(ckpts / f"9{checkpoints.TMP_DIR_SUFFIX}" / checkpoints.COMMIT_SUCCESS_FILE)
  # Corrupt every data file of the latest finished step's state.
  for root, _, files in os.walk(ckpts / "6" / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  # The same interval: the resumed run saves step 6 again, where the corrupt one was.
  proc = _run(work, "--config.num_train_steps=8")
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  assert "ignoring and deleting the unfinished save" in out and "9.orbax-checkpoint-tmp" in out
  assert "falling back to the previous checkpoint" in out
  assert "moved checkpoint step 6 aside" in out
  assert "resumed from checkpoint step 3" in proc.stdout
  assert not (ckpts / f"9{checkpoints.TMP_DIR_SUFFIX}").exists()
  assert sorted(os.listdir(ckpts), key=int) == ["3", "6", "8"]
  kept = work / "corrupt_checkpoints" / "6" / "state"
  assert kept.is_dir() and all(
      open(os.path.join(r, f), "rb").read() == b"garbage" for r, _, fs in os.walk(kept) for f in fs
  )
  assert [r["step"] for r in _rows(work)] == [2, 4, 6, 8]


def test_half_written_checkpoints_are_skipped_with_a_warning(tmp_path, capsys, rng):
  """The Checkpointer alone (no training): every way a save can be left unfinished."""
  devices = jax.devices()[:1]
  sharding = jax.sharding.SingleDeviceSharding(devices[0])
  value = rng.standard_normal((3, 5)).astype(np.float32)
  abstract = {"w": jax.ShapeDtypeStruct(value.shape, jnp.float32, sharding=sharding)}
  ck = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  for step in (1, 2, 3):
    ck.save(step, {"w": jnp.asarray(value * step)}, {"step": step})
  ck.close()
  d = tmp_path / "checkpoints"
  # 4: interrupted before orbax's final rename (the temporary folder, no commit marker).
  shutil.copytree(d / "3", d / f"4{checkpoints.TMP_DIR_SUFFIX}")
  os.remove(d / f"4{checkpoints.TMP_DIR_SUFFIX}" / checkpoints.COMMIT_SUCCESS_FILE)
  # 3: a step folder without its commit marker (a copy cut short).
  os.remove(d / "3" / checkpoints.COMMIT_SUCCESS_FILE)
  # 2: finished, then its array data truncated.
  for root, _, files in os.walk(d / "2" / "state"):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)

  # A reader (sampling from a running job's workdir) leaves temporary folders alone.
  reader = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  step, state, extra = reader.restore_latest(abstract)
  reader.close()
  assert (step, extra) == (1, {"step": 1})
  np.testing.assert_array_equal(np.asarray(state["w"]), value)
  out = capsys.readouterr().out
  assert f"checkpoint {d}/3 has no commit_success.txt" in out
  assert f"checkpoint {d}/2 is unreadable" in out
  assert (d / f"4{checkpoints.TMP_DIR_SUFFIX}").exists()

  # The training job warns about the leftover and deletes it; saving step 4 again works.
  trainer_ck = checkpoints.Checkpointer(str(tmp_path), async_save=False, clean_unfinished=True)
  assert "ignoring and deleting the unfinished save" in capsys.readouterr().out
  trainer_ck.save(4, {"w": jnp.asarray(value * 4)}, {"step": 4})
  step, state, _ = trainer_ck.restore_latest(abstract)
  trainer_ck.close()
  assert step == 4 and not (d / f"4{checkpoints.TMP_DIR_SUFFIX}").exists()
  np.testing.assert_array_equal(np.asarray(state["w"]), value * 4)


def test_metric_writer_drops_rows_past_the_resume_step(tmp_path, rng):
  from monoformer_jax.train.metrics import Accumulator, MetricWriter

  w = MetricWriter(str(tmp_path))
  for step in (2, 4, 6):
    w.write_scalars(step, {"loss": 0.5 * step})
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 8, "lo')  # a write cut short by a kill
  w = MetricWriter(str(tmp_path), resume_step=4)
  w.write_scalars(6, {"loss": 7.0})
  w.close()
  assert _rows(tmp_path) == [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 2.0}, {"step": 6, "loss": 7.0}]
  # The logging window survives a JSON round trip exactly (float32 totals).
  acc = Accumulator()
  for v in rng.standard_normal(3):
    acc.add({"loss": v, "grad_norm": abs(v)})
  acc2 = Accumulator()
  acc2.set_state(json.loads(json.dumps(acc.get_state())))
  acc.add({"loss": 0.25, "grad_norm": 0.5})
  acc2.add({"loss": 0.25, "grad_norm": 0.5})
  assert acc.compute_and_reset() == acc2.compute_and_reset()


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "--config.data.image_batch_size=7",
            "config.data.image_batch_size: 7 is not divisible by the data-parallel size 2",
        ),
        ("--config.model.patch_size=5", "patch_size=5 does not divide image_height=28"),
        ("--config.sampling.guidance_scale=0.5", "config.sampling.guidance_scale: must be >= 1"),
        ("--config.model.hiden_size=3", "hiden_size"),
        ("--config.optimizer.learning_rate=abc", "learning_rate"),
    ],
)
def test_bad_configs_fail_naming_the_field(tmp_path, override, message):
  proc = _run(
      tmp_path / "bad",
      override,
      "--config.mesh.data=2",
      env={"XLA_FLAGS": subprocess_env(devices=2)["XLA_FLAGS"]},
      check=False,
  )
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "bad" / "checkpoints").exists()


def _mnist_tiny_test_config():
  return mnist_tiny.get_config("test")


@pytest.mark.parametrize("kind,sampler", [("flow", "ddpm"), ("gaussian", "heun")])
def test_sampler_must_match_the_objective(kind, sampler):
  # In-process (no compile): the sampler only runs after training, so this must fail up front.
  config = _mnist_tiny_test_config()
  check_config(config)  # the default pairing passes
  config.objective.kind, config.sampling.sampler = kind, sampler
  config.objective.min_snr_gamma = 0.0  # Gaussian-only: would be the first error for flow
  with pytest.raises(ConfigError, match=f"config.sampling.sampler: '{sampler}' does not sample"):
    check_config(config)


@pytest.mark.parametrize("kind,gamma", [("gaussian", -1.0), ("flow", 5.0)])
def test_min_snr_gamma_is_checked_up_front(kind, gamma):
  config = _mnist_tiny_test_config()
  config.objective.min_snr_gamma = 5.0
  check_config(config)
  assert build_objective(config).min_snr_gamma == 5.0
  config.objective.kind, config.objective.min_snr_gamma = kind, gamma
  if kind == "flow":
    config.sampling.sampler = "euler"
  with pytest.raises(ConfigError, match="config.objective.min_snr_gamma: must be >= 0"):
    check_config(config)


@pytest.mark.parametrize("change", [dict(kind="flow"), dict(vae="runs/v/vae")])
def test_clip_denoised_is_checked_up_front(change):
  """x0 clamping is for Gaussian sampling in pixel space; latents or the ODE samplers fail now."""
  config = _mnist_tiny_test_config()
  config.sampling.clip_denoised = True
  check_config(config)
  if "kind" in change:
    config.objective.kind, config.objective.min_snr_gamma = "flow", 0.0
    config.sampling.sampler = "euler"
  else:
    config.vae.path = change["vae"]
  with pytest.raises(ConfigError, match="config.sampling.clip_denoised: clamps the predicted x0"):
    check_config(config)


def test_scheduler_ratio_and_resume():
  s = StepScheduler({"diffusion": 9, "ar": 1, "mixed": 0})
  kinds = [s.next(i) for i in range(100)]
  assert kinds.count("ar") == 10 and kinds.count("diffusion") == 90
  # Evenly spread: never two AR steps within 9 steps of each other.
  idx = [i for i, k in enumerate(kinds) if k == "ar"]
  assert min(np.diff(idx)) == 10
  s2 = StepScheduler({"diffusion": 9, "ar": 1})
  for i in range(37):
    s2.next(i)
  state = json.loads(json.dumps(s2.get_state()))
  s3 = StepScheduler({"diffusion": 9, "ar": 1})
  s3.set_state(state)
  assert [s2.next(i) for i in range(37, 67)] == [s3.next(i) for i in range(37, 67)]
  with pytest.raises(ValueError, match="positive weight"):
    StepScheduler({"diffusion": 0, "ar": 0})


def test_text_warmup_runs_ar_first_then_the_round_robin(rng):
  n = int(rng.integers(3, 30))
  warm = StepScheduler({"diffusion": 9, "ar": 1}, text_warmup_steps=n)
  plain = StepScheduler({"diffusion": 9, "ar": 1})
  kinds = [warm.next(i) for i in range(n + 50)]
  assert kinds[:n] == ["ar"] * n
  assert kinds[n:] == [plain.next(i) for i in range(50)]
  # Resumed inside the warm-up, the run continues it (the step decides, not the credits).
  again = StepScheduler({"diffusion": 9, "ar": 1}, text_warmup_steps=n)
  again.set_state(json.loads(json.dumps(StepScheduler({"diffusion": 9, "ar": 1}).get_state())))
  assert [again.next(i) for i in range(n - 2, n + 50)] == kinds[n - 2 :]
  with pytest.raises(ValueError, match="text_warmup_steps"):
    StepScheduler({"diffusion": 1}, text_warmup_steps=5)
  config = _mnist_tiny_test_config()
  config.schedule.text_warmup_steps = 10
  check_config(config)
  config.schedule.ar = 0.0
  with pytest.raises(ConfigError, match="schedule.text_warmup_steps"):
    check_config(config)


def test_resuming_with_another_config_refuses_model_changes_and_notes_harmless_ones(tmp_path):
  """A workdir with checkpoints: fields that change the model, its tokens or its data's meaning
  are refused (each named with both values, the saved config.json untouched); the rest
  (intervals, learning rate, steps, mesh, processes) go through and are returned to be logged."""
  first = mnist_tiny.get_config("test")
  save_resolved_config(first, tmp_path, True, has_checkpoints=False)
  saved = (tmp_path / "config.json").read_text()
  changed = mnist_tiny.get_config("test")
  changed.model.hidden_size = 64
  changed.objective.kind = "flow"
  changed.data.tokenizer_vocab_size = 300
  with pytest.raises(ConfigError) as err:
    save_resolved_config(changed, tmp_path, True, has_checkpoints=True)
  for field, old, new in (
      ("model.hidden_size", 32, 64),
      ("objective.kind", "'gaussian'", "'flow'"),
      ("data.tokenizer_vocab_size", 512, 300),
  ):
    assert f"config.{field}: {old} in" in str(err.value) and f"{new} now" in str(err.value), str(err.value)
  assert (tmp_path / "config.json").read_text() == saved
  harmless = mnist_tiny.get_config("test")
  harmless.log_every_steps, harmless.sample_every_steps, harmless.num_train_steps = 1, 5, 100
  harmless.optimizer.learning_rate, harmless.checkpoint_every_steps, harmless.keep_checkpoints = 0.5, 7, 9
  harmless.mesh.data, harmless.mesh.fsdp = 1, -1
  changes = save_resolved_config(harmless, tmp_path, True, has_checkpoints=True)
  assert {c[0] for c in changes} == {
      "log_every_steps",
      "sample_every_steps",
      "num_train_steps",
      "optimizer.learning_rate",
      "checkpoint_every_steps",
      "keep_checkpoints",
      "mesh.data",
      "mesh.fsdp",
  }


@pytest.mark.parametrize(
    "wanted, message",
    [
        ({"w": (4, 5)}, "not compatible with the stored shape"),
        ({"w": (3, 5), "v": (2,)}, "tree structures do not match"),
    ],
    ids=["shape", "structure"],
)
def test_a_checkpoint_that_does_not_fit_the_run_stops_without_rolling_back(tmp_path, rng, wanted, message):
  """Not corruption: the newest step is readable but holds another tree. The restore stops with
  its own error (restoring an older step would not help) and moves nothing aside."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  value = rng.standard_normal((3, 5)).astype(np.float32)
  ck = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  for step in (1, 2):
    ck.save(step, {"w": jnp.asarray(value * step)}, {"step": step})
  ck.close()
  abstract = {k: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding) for k, shape in wanted.items()}
  trainer_ck = checkpoints.Checkpointer(str(tmp_path), async_save=False, clean_unfinished=True)
  with pytest.raises(checkpoints.CheckpointMismatchError, match=message):
    trainer_ck.restore_latest(abstract)
  trainer_ck.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  assert not (tmp_path / "corrupt_checkpoints").exists()


# tensorstore's forms of one failed write: as raised, and quoted again inside a gathered error.
_WRITE_FAILURES = (
    'OUT_OF_RANGE: Error writing "params.x/0" in OCDBT database at local file "/w/": Failed to write'
    " 12756 bytes to file 7: File too large [os_error_code='27']",
    '[ValueError(\'OUT_OF_RANGE: Error writing "params.x/0": Failed writing: "/w/d/9": File too large'
    " [os_error_code=\\'27\\']')] [tensorstore_spec='{}']",
)


@pytest.mark.parametrize("message", _WRITE_FAILURES, ids=["raised", "gathered"])
def test_a_failed_checkpoint_write_names_the_os_reason(tmp_path, message):
  saver = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  expected = r"writing a checkpoint under .* failed \(File too large, errno 27\); the finished checkpoints \[\] are"
  with pytest.raises(OSError, match=expected):
    with saver._write_errors():  # pylint: disable=protected-access  # the rephrasing alone
      raise ValueError(message)


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_error_and_loses_nothing_saved(tmp_path, tmp_path_factory):
  """Checkpoint 3 saved; the save of 6 cannot write its ~160 KB array file: one line naming the
  failure and the intact steps, exit 2; checkpoint 3 untouched; the next start (disk freed)
  resumes from 3 and ends with the uninterrupted shared run's weights, bit for bit."""
  work = tmp_path / "run"
  _run(work, "--config.num_train_steps=3")
  before = {p: p.read_bytes() for p in sorted((work / "checkpoints" / "3").rglob("*")) if p.is_file()}
  # Files of the child cannot grow past 100 KB (RLIMIT_FSIZE through the shell's ulimit, with
  # SIGXFSZ ignored so a write fails with EFBIG instead of killing it): a full disk, as this
  # machine allows one without mounting a file system.
  limited = ["bash", "-c", "trap '' XFSZ; ulimit -f 100; exec \"$@\"", "bash", sys.executable]
  proc = subprocess.run(
      [*limited, "-m", "monoformer_jax.main", "--config=configs/mnist_tiny.py:test", f"--workdir={work}"],
      cwd=ROOT,
      env=subprocess_env(),
      capture_output=True,
      text=True,
      timeout=600,
  )
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert (
      len(errors) == 1 and "writing a checkpoint under" in errors[0] and "File too large, errno 27" in errors[0]
  ), errors
  assert "the finished checkpoints [3] are intact" in errors[0]
  assert {p: p.read_bytes() for p in before} == before
  resumed = _run(work)
  assert "resumed from checkpoint step 3" in resumed.stdout
  _assert_trees_equal(_final_params(work), _final_params(shared_tiny_run(tmp_path_factory)))
