"""Preemption of multi-process runs and elastic resume.

A SIGTERM to one of N processes (launch/local_multiprocess.sh, tests/fault_main.py's
--sigterm_after_step) makes all N save the same step once and exit 0; the run then resumes on
another number of processes and another mesh, and its losses are an uninterrupted run's. One
chain of runs, shared by the tests through module fixtures (starting processes is what costs):

  2 processes x 1 device, SIGTERM to process 1  -> saves step s1
  4 processes x 1 device, mesh data 2 x fsdp 2, from s1, SIGTERM to process 3  -> saves step s2
  1 process from s2 to the end (SIGTERM at the last step, which is also an interval save: the
  preemption save must not save it again)

and the reference: the same steps in one uninterrupted process (it compiles the last link's step).

The data iterators' positions are checkpointed for every process (pipeline.combine_states); the
first tests check, in this process, that they resume on any process count at the global batch the
saved run would have read next.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from monoformer_jax.data import pipeline, sources
from monoformer_jax.data import sequences as seq
from monoformer_jax.data import tokenizer as tok_lib
from tests.helpers import ROOT, launch_local_processes
from tests.helpers_env import subprocess_env

STEPS = 12
FLAGS = [
    "--config=configs/mnist_tiny.py:test",
    f"--config.num_train_steps={STEPS}",
    "--config.log_every_steps=1",
    f"--config.checkpoint_every_steps={STEPS}",
    # Image steps only, no sample grid: each process traces and compiles one step, and the run
    # that finishes draws nothing (starting processes is most of this module's time). The text
    # stream's positions resume like the image stream's (the in-process tests check both).
    "--config.schedule.ar=0",
    "--config.sampling.grid_classes=0",
    "--config.data.packing=False",
    "--config.mesh.data=-1",
]
GLOBAL_BATCH = 12


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  texts = [f"record {i} of {i * 7}" for i in range(300)]
  texts += [t.format(c) for c in sources.mnist.CLASS_NAMES for t in seq.MAIN_TEMPLATES]
  return tok_lib.train_sentencepiece(texts, 300, str(tmp_path_factory.mktemp("tok")))


class _Records(sources.Source):
  """Record i: a 4x4x1 image holding i and the text "record i"."""

  class_names = ("red", "green", "blue")

  def __len__(self):
    return 37

  def __getitem__(self, i):
    return {"image": np.full((4, 4, 1), i, np.uint8), "label": i % 3, "text": f"record {i}"}


def _iterators(tok, kind, count, seed, packing=False):
  """The `count` processes' iterators of one stream (global batch GLOBAL_BATCH)."""
  if kind == "text":
    return [
        pipeline.make_text_iterator(
            _Records(),
            tok,
            batch_size=GLOBAL_BATCH // count,
            seq_len=24,
            seed=seed,
            packing=packing,
            shard_index=p,
            shard_count=count,
        )
        for p in range(count)
    ]
  return [
      pipeline.make_image_iterator(
          _Records(),
          tok,
          batch_size=GLOBAL_BATCH // count,
          patch_size=2,
          t_token=True,
          seed=seed,
          text_dropout=0.3,
          shard_index=p,
          shard_count=count,
      )
      for p in range(count)
  ]


def _global_batch(iterators):
  batches = [next(it) for it in iterators]
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize("kind", ["image", "text"])
@pytest.mark.parametrize("saved_on, resumed_on", [(2, 4), (4, 2), (4, 3), (3, 1), (1, 2)])
def test_data_position_resumes_on_another_process_count(tok, seed, kind, saved_on, resumed_on):
  reference = _iterators(tok, kind, 1, seed)[0]
  expected = [next(reference) for _ in range(6)][4:]  # into the second epoch (37 records)
  saved = _iterators(tok, kind, saved_on, seed)
  for _ in range(4):
    _global_batch(saved)
  state = json.loads(json.dumps(pipeline.combine_states([it.get_state() for it in saved])))
  assert state["next_index"] == [4 * GLOBAL_BATCH // saved_on] * saved_on
  resumed = _iterators(tok, kind, resumed_on, seed)
  for it in resumed:
    it.set_state(state)
  for want in expected:
    got = _global_batch(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_packed_data_resumes_each_process_where_it_stood(tok, seed):
  """Packed rows take varying numbers of samples, so the processes' positions differ: the same
  process count takes each its own back; another count loses no sample (re-reads a few)."""
  saved = _iterators(tok, "text", 2, seed, packing=True)
  for _ in range(3):
    _global_batch(saved)
  next(saved[1])  # process 1 one batch ahead (as under packing: different positions)
  state = json.loads(json.dumps(pipeline.combine_states([it.get_state() for it in saved])))
  assert state["next_index"][0] != state["next_index"][1]
  resumed = _iterators(tok, "text", 2, seed, packing=True)
  for it in resumed:
    it.set_state(state)
  for old, new in zip(saved, resumed):
    np.testing.assert_array_equal(next(new)["tokens"], next(old)["tokens"])
  # On 3 processes: every process at the same global batch boundary, at or before the first
  # global position some process had not read. Records are dealt out in blocks of the
  # per-process batch: process p's j-th record is global (j // block * count + p) * block + j % block.
  block = GLOBAL_BATCH // 2
  first_unread = min((j // block * 2 + p) * block + j % block for p, j in enumerate(state["next_index"]))
  elastic = _iterators(tok, "text", 3, seed, packing=True)
  for it in elastic:
    it.set_state(state)
  starts = {int(it.get_state()["grain"]["next_index"]) * 3 for it in elastic}
  assert len(starts) == 1 and first_unread - GLOBAL_BATCH < starts.pop() <= first_unread


# ----------------------------------------------------------------------------------------------
# Runs.


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _launch(tmp_path, name, processes, devices_per_process, workdir, *flags):
  """launch/local_multiprocess.sh with tests.fault_main; returns the processes' logs."""
  log_dir = tmp_path / name
  log_dir.mkdir()
  return launch_local_processes(
      processes, [f"--workdir={workdir}", *FLAGS, *flags], log_dir, devices_per_process, MAIN_MODULE="tests.fault_main"
  )


def _saved_step(logs) -> int:
  """The step every process's log says it saved on SIGTERM (the same one, once each)."""
  steps = [re.findall(r"SIGTERM: saving step (\d+) before exit", log) for log in logs]
  assert all(len(s) == 1 for s in steps) and len({s[0] for s in steps}) == 1, steps
  return int(steps[0][0])


def _checkpoints(workdir):
  return sorted(int(d) for d in os.listdir(workdir / "checkpoints"))


def _one_process(workdir, *flags) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "tests.fault_main", f"--workdir={workdir}", *FLAGS, *flags],
      cwd=ROOT,
      env=subprocess_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )


def _finish(proc: subprocess.Popen) -> str:
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-2000:] + err[-3000:]
  return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  """The uninterrupted reference and the preempted run's workdir after each link (see above)."""
  tmp = tmp_path_factory.mktemp("chain")
  out = {"reference": tmp / "reference", "work": tmp / "preempted"}
  # Alongside the first link: that one spends much of its time waiting (start-up, SIGTERM).
  reference = _one_process(out["reference"])
  try:
    work = out["work"]
    out["two"] = _launch(tmp, "two", 2, 1, work, "--sigterm_after_step=3:1")
    out["s1"], out["after_two"] = _saved_step(out["two"]), _checkpoints(work)
    assert out["s1"] < STEPS - 3, "the SIGTERM took too long to reach the other process"
    _finish(reference)
  finally:
    if reference.poll() is None:
      reference.kill()
  out["four"] = _launch(tmp, "four", 4, 1, work, "--config.mesh.fsdp=2", f"--sigterm_after_step={out['s1'] + 3}:3")
  out["s2"], out["after_four"] = _saved_step(out["four"]), _checkpoints(work)
  assert out["s2"] < STEPS, "the SIGTERM took too long to reach the other processes"
  out["one"] = _finish(_one_process(work, f"--sigterm_after_step={STEPS}"))
  return out


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_one_step_and_exits_zero(chain):
  assert "test: SIGTERM to process 1 after step 3" in chain["two"][1]
  assert "process 1 of 2" in chain["two"][1]
  assert chain["after_two"] == [chain["s1"]]  # saved once, by both: one checkpoint
  extra = json.loads((chain["work"] / "checkpoints" / str(chain["s1"]) / "extra" / "metadata").read_text())
  assert {kind: state["shard_count"] for kind, state in extra["data"].items()} == {"diffusion": 2}


@pytest.mark.slow
def test_sigterm_to_one_of_four_processes_resumed_from_two(chain):
  logs = chain["four"]
  assert f"test: SIGTERM to process 3 after step {chain['s1'] + 3}" in logs[3]
  assert "process 3 of 4, 1 local / 4 global devices" in logs[3]
  assert f"resumed from checkpoint step {chain['s1']}" in logs[0]
  assert chain["after_four"] == [chain["s1"], chain["s2"]]


@pytest.mark.slow
def test_resumed_on_fewer_processes_the_losses_are_an_uninterrupted_runs(chain):
  assert f"resumed from checkpoint step {chain['s2']}" in chain["one"]
  # The last step's interval save is the preemption save: saved once, no error.
  assert f"SIGTERM: saving step {STEPS} before exit" in chain["one"]
  assert _checkpoints(chain["work"]) == [chain["s1"], chain["s2"], STEPS]
  a, b = _losses(chain["reference"]), _losses(chain["work"])
  assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
