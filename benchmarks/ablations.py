"""The paper's ablations at the embedded default's scale, on several seeds: one command.

    python benchmarks/ablations.py [--seeds 0,1,2] [--steps N] [--eval_every K] [--jobs J] \
        [--out benchmarks/ablations] [--workdir runs/ablations]

Per seed: the text-only pretraining run (configs/mnist_ablations.py:text_pretrain), then every arm
of that config: `scratch`, `llm_init` (initialised from that seed's pretraining run), `causal_image`
and `no_lm_loss` (both initialised like llm_init). Each run is a `python -m monoformer_jax.main`
subprocess with `--config.seed=S`; up to --jobs run at once (default: one per core), each on its
own share of the cores. The image arms keep a checkpoint every --eval_every steps (no_lm_loss,
which has no text steps, every as many image steps). Afterwards (a job per run, in the same pool)
every checkpoint is evaluated as benchmarks/mnist_quality.py does: `--num_per_class` guided samples
per digit with the EMA weights and the run's sampler, the fraction the project's digit classifier
recognises as the digit asked for (and the worst digit), and the digit-FID against held-out MNIST
digits. The last checkpoint's held-out pydoc perplexity (teacher forcing, one passage per row,
benchmarks/text_baselines.py) is set beside the pretrained model's (at each of its checkpoints)
and those of unigram / bigram tables fitted with the same tokenizer.

The defaults (3 seeds x 5 runs of ~1,800 steps) should take 1.5-2 hours on 2 cores: estimated from
the default config's ~0.42 s a step when two runs share the cores one each (benchmarks/RESULTS.md),
not measured end to end.

Writes into --out: ablations.json (every number, per seed), ablations.md (the table: mean and
standard deviation over seeds at every evaluation point, then the paper's three effects as paired
differences), ablations.png (quality against image steps per arm, mean and min-max band over
seeds; final text perplexity per arm). Image steps (diffusion steps) are the x axis: the arms
with text steps spend a tenth of their steps on text, no_lm_loss none.

Runs live in --workdir/seed_S/ARM (logs in --workdir/logs). A rerun of the same command skips
what is done: finished runs (train_summary.json), evaluated ones (eval.json), and continues a
stopped run from its last checkpoint. Other settings need another --workdir (refused otherwise).
`--test` runs the configs' `test` shrinks (`ARM,test`; tests/test_ablations.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from typing import Callable

import matplotlib  # (mlxtend's dependency)

matplotlib.use("Agg")  # before pyplot: files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import text_baselines  # noqa: E402
from monoformer_jax.data import mnist  # noqa: E402
from monoformer_jax.data.sources import PydocSource  # noqa: E402
from monoformer_jax.evaluation import digit_classifier  # noqa: E402
from monoformer_jax.host_memory import tune_for_xla_cpu  # noqa: E402
from monoformer_jax.run import images as images_lib  # noqa: E402
from monoformer_jax.run.checkpoints import step_dirs  # noqa: E402
from monoformer_jax.run.config import read_run_config  # noqa: E402
from monoformer_jax.run.open import open_run  # noqa: E402
from monoformer_jax.sampling import classes  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "mnist_ablations.py")
EVAL_FILE = "eval.json"
SETTINGS_FILE = "settings.json"
# The paper's three effects as (name, better arm, worse arm, metric, lower is better). Paired by seed.
EFFECTS = (
    ("(a) LLM init gives better images (digit-FID)", "llm_init", "scratch", "digit_fid", True),
    ("(a) LLM init gives better images (digits recognised)", "llm_init", "scratch", "digit_accuracy", False),
    ("(b) LLM init keeps the text (perplexity)", "llm_init", "scratch", "text_ppl", True),
    ("(c) bidirectional beats causal image mask (digit-FID)", "llm_init", "causal_image", "digit_fid", True),
    (
        "(c) bidirectional beats causal image mask (digits recognised)",
        "llm_init",
        "causal_image",
        "digit_accuracy",
        False,
    ),
    ("LM loss during image training: digit-FID", "llm_init", "no_lm_loss", "digit_fid", True),
    ("LM loss during image training: perplexity", "llm_init", "no_lm_loss", "text_ppl", True),
)


def ablation_configs():
  """configs/mnist_ablations.py as a module (config files are loaded by path)."""
  spec = importlib.util.spec_from_file_location("mnist_ablations", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ------------------------------------------------------------------------------------------------
# The runs: jobs with dependencies, at most --jobs at a time, each pinned to its share of the cores.


@dataclasses.dataclass
class Job:
  name: str
  argv: list
  log: str
  after: tuple = ()  # names of jobs that must have succeeded first
  priority: int = 0  # lower starts first among ready jobs
  done: Callable[[], bool] = lambda: False  # finished by an earlier invocation: skipped


def core_sets(jobs: int) -> list:
  """One set of cores per job slot: the available cores split evenly (shared round-robin when
  there are more slots than cores). Pinned, XLA sizes its thread pool to the slot's share rather
  than every process spawning a thread per core of the machine."""
  cores = sorted(os.sched_getaffinity(0))
  if jobs >= len(cores):
    return [{cores[i % len(cores)]} for i in range(jobs)]
  return [set(cores[i * len(cores) // jobs : (i + 1) * len(cores) // jobs]) for i in range(jobs)]


def run_jobs(jobs: list, parallel: int, env: dict) -> list:
  """Runs `jobs`, `parallel` at a time, each once every job it comes after has succeeded. Returns
  the names of the jobs that failed or could not start because one they need failed."""
  waiting = sorted(jobs, key=lambda j: j.priority)
  done, failed, running = set(), [], {}  # running: slot -> (job, process, start time)
  free, slots = list(range(parallel)), core_sets(parallel)

  def start(job: Job) -> None:
    slot = free.pop(0)
    os.makedirs(os.path.dirname(job.log), exist_ok=True)
    with open(job.log, "w") as log:  # the child keeps its own copy of the file
      # pylint: disable-next=consider-using-with  # waited for by the loop (os.wait4)
      proc = subprocess.Popen(job.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
      os.sched_setaffinity(proc.pid, slots[slot])  # before JAX has started any thread
    except OSError:  # the process already ended
      pass
    running[slot] = (job, proc, time.perf_counter())
    print(f"started {job.name} (cores {sorted(slots[slot])}; log {job.log})", flush=True)

  def reap(slot: int) -> None:
    job, proc, t0 = running[slot]
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # with its CPU time, unlike poll()
    if pid == 0:
      return
    proc.returncode = os.waitstatus_to_exitcode(status)
    del running[slot]
    free.append(slot)
    seconds, cpu = time.perf_counter() - t0, usage.ru_utime + usage.ru_stime
    if proc.returncode == 0:
      done.add(job.name)
      print(f"finished {job.name} in {seconds:.0f}s ({cpu:.0f}s of CPU)", flush=True)
      return
    failed.append(job.name)
    with open(job.log) as log:
      tail = log.read()[-3000:]
    print(f"FAILED {job.name} (exit {proc.returncode}) after {seconds:.0f}s; the end of {job.log}:\n{tail}", flush=True)

  try:
    while waiting or running:
      for job in list(waiting):
        if any(a in failed for a in job.after):
          waiting.remove(job)
          failed.append(job.name)
          print(f"skipped {job.name}: {', '.join(a for a in job.after if a in failed)} failed", flush=True)
        elif job.done():
          waiting.remove(job)
          done.add(job.name)
          print(f"already done: {job.name}", flush=True)
        elif free and all(a in done for a in job.after):
          waiting.remove(job)
          start(job)
      for slot in list(running):
        reap(slot)
      if running:
        time.sleep(0.2)
      elif waiting and not any(all(a in done for a in j.after) or any(a in failed for a in j.after) for j in waiting):
        raise RuntimeError(f"jobs wait on jobs that never run: {[(j.name, j.after) for j in waiting]}")
  finally:
    # Stopped (Ctrl-C, an error): SIGTERM makes a training save a checkpoint and exit, so that a
    # rerun of the command continues it.
    for job, proc, _ in running.values():
      proc.terminate()
    for job, proc, _ in running.values():
      proc.wait()
      print(f"stopped {job.name}", flush=True)
  return failed


def plan(args, cfgs) -> tuple[list, dict]:
  """The jobs of every seed and arm, and {(arm, seed): workdir}."""
  suffix = ",test" if args.test else ""
  workdirs, jobs = {}, []
  logs = os.path.join(args.workdir, "logs")
  eval_flags = ["--num_per_class", str(args.num_per_class)]
  if args.classifier_cache:
    eval_flags += ["--classifier_cache", args.classifier_cache]
  for seed in args.seeds:
    for arm in (cfgs.PRETRAIN,) + tuple(args.arms):
      workdir = os.path.join(args.workdir, f"seed_{seed}", arm)
      workdirs[(arm, seed)] = workdir
      flags, after = [f"--config.seed={seed}"], ()
      if arm == cfgs.PRETRAIN:
        if args.pretrain_steps:
          flags.append(f"--config.num_train_steps={args.pretrain_steps}")
      else:
        steps, every = args.steps or None, args.eval_every or None
        if arm == "no_lm_loss":  # as many image steps as the arms with text steps take
          base = cfgs.get_config("llm_init" + suffix)
          steps = cfgs.image_steps(base, steps) if steps else None
          every = cfgs.image_steps(base, every) if every else None
        if steps:
          flags.append(f"--config.num_train_steps={steps}")
        if every:
          flags.append(f"--config.checkpoint_every_steps={every}")
        if cfgs.get_config(arm + suffix).init_from:
          pretrain = workdirs[(cfgs.PRETRAIN, seed)]
          # Its own seed's pretrained model and, with it, the very tokenizer it was trained with.
          flags += [
              f"--config.init_from=run:{pretrain}",
              f"--config.data.tokenizer={os.path.join(pretrain, 'tokenizer', 'tokenizer.model')}",
          ]
          after = (f"train {cfgs.PRETRAIN} {seed}",)
      train = f"train {arm} {seed}"
      jobs.append(
          Job(
              train,
              [sys.executable, "-m", "monoformer_jax.main", f"--config={CONFIG}:{arm}{suffix}", f"--workdir={workdir}"]
              + flags,
              os.path.join(logs, f"train_{arm}_seed{seed}.log"),
              after=after,
              priority=0 if arm == cfgs.PRETRAIN else 1,  # the init arms wait for it
              done=lambda workdir=workdir: _trained(workdir),
          )
      )
      images = [] if arm == cfgs.PRETRAIN else ["--images"]
      jobs.append(
          Job(
              f"evaluate {arm} {seed}",
              [sys.executable, os.path.abspath(__file__), "--evaluate", workdir] + eval_flags + images,
              os.path.join(logs, f"evaluate_{arm}_seed{seed}.log"),
              after=(train,),
              priority=2,  # on no run's way: after every training that can start
              done=lambda workdir=workdir: os.path.exists(os.path.join(workdir, EVAL_FILE)),
          )
      )
  return jobs, workdirs


def _trained(workdir: str) -> bool:
  """Whether `workdir` holds a run trained to its end (a stopped one is continued instead)."""
  try:
    with open(os.path.join(workdir, "train_summary.json")) as f:
      final = json.load(f)["final_step"]
    with open(os.path.join(workdir, "config.json")) as f:
      return final >= json.load(f)["num_train_steps"]
  except (OSError, ValueError, KeyError):
    return False


def check_settings(args) -> None:
  """One --workdir holds runs of one setting: continuing them under others would mix schedules."""
  settings = {
      k: getattr(args, k) for k in ("steps", "pretrain_steps", "eval_every", "num_per_class", "test", "seeds", "arms")
  }
  path = os.path.join(args.workdir, SETTINGS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    fixed = ("steps", "pretrain_steps", "eval_every", "num_per_class", "test")
    changed = {k: (saved.get(k), settings[k]) for k in fixed if saved.get(k) != settings[k]}
    if changed:
      sys.exit(
          f"{args.workdir} holds runs made with other settings ({changed}, saved vs now): use another "
          "--workdir, or delete it"
      )
  os.makedirs(args.workdir, exist_ok=True)
  with open(path, "w") as f:
    json.dump(settings, f, indent=1)


# ------------------------------------------------------------------------------------------------
# Evaluating one run (a subprocess of its own: `--evaluate WORKDIR`).


def evaluate_run(workdir: str, num_per_class: int, classifier_cache: str, images: bool) -> dict:
  """Digit quality of every checkpoint of `workdir` (with `images`) and the held-out text
  perplexity of its last one, as benchmarks/mnist_quality.py measures them."""
  cfgs = ablation_configs()
  steps = step_dirs(workdir)
  schedule_config = read_run_config(workdir)
  report = {"workdir": workdir, "seed": int(schedule_config.seed), "points": []}
  run = None
  if images:
    clf = digit_classifier.load_or_train(classifier_cache or None)
    mnist_images, _ = mnist.load_mnist5k()
    train_idx, held = mnist.split_indices(len(mnist_images))
    labels = np.repeat(np.arange(10), num_per_class)
    # The distance real training digits reach at this sample count: FID's floor here.
    real = mnist_images[train_idx][np.random.default_rng(0).permutation(len(train_idx))[: len(labels)]]
    report["digit_fid_real"] = float(digit_classifier.digit_fid(real, mnist_images[held], clf))
    for step in steps:
      run = open_run(workdir, step=step)
      t0 = time.perf_counter()
      samples = classes.sample_classes(
          run.params,
          run.model_config,
          run.objective,
          run.tokenizer,
          list(mnist.CLASS_NAMES),
          labels,
          options=run.image_sampling,
          seed=0,
      )
      samples = images_lib.to_uint8(images_lib.decode_images(samples, run.config.vae.path, run.config.vae.scale))
      scores = digit_classifier.digit_scores(samples, labels, mnist_images[held], clf)
      report["points"].append(
          {
              "step": int(step),
              "image_steps": cfgs.image_steps(schedule_config, step),
              "digit_accuracy": scores["accuracy"],
              "worst_class_accuracy": min(scores["per_class"]),
              "digit_accuracy_per_class": scores["per_class"],
              "digit_fid": scores["fid"],
              "sample_seconds": time.perf_counter() - t0,
          }
      )
      print(json.dumps(report["points"][-1]), flush=True)
  if run is None or run.step != max(steps):
    run = open_run(workdir)
  seq_len = run.config.data.text_seq_len
  hold = PydocSource(split="holdout")
  test_ids = text_baselines.passages_ids(run.tokenizer, [hold[i]["text"] for i in range(len(hold))], seq_len)
  nll, n = text_baselines.model_nll(run.model_config, run.params, test_ids, seq_len)
  report["text"] = {"step": run.step, "heldout_tokens": n, "model_ppl": math.exp(nll)}
  if not images:
    # The pretraining run: its perplexity at every checkpoint (where it stops improving says how
    # long to pretrain: pydoc is small), and once per seed (every run of a seed has the same
    # tokenizer) the n-gram references.
    for step in steps:
      ppl = report["text"]["model_ppl"]
      if step != run.step:
        opened = open_run(workdir, step=step)
        ppl = math.exp(text_baselines.model_nll(opened.model_config, opened.params, test_ids, seq_len)[0])
      report["points"].append({"step": int(step), "text_ppl": ppl})
    train = PydocSource(split="train")
    train_ids = text_baselines.passages_ids(run.tokenizer, [train[i]["text"] for i in range(len(train))], seq_len)
    uni, bi, n_base = text_baselines.unigram_bigram_nll(train_ids, test_ids, run.tokenizer.vocab_size)
    assert n_base == n, (n_base, n)
    report["text"].update(unigram_ppl=math.exp(uni), bigram_ppl=math.exp(bi))
  with open(os.path.join(workdir, "tokenizer", "tokenizer.model"), "rb") as f:
    report["tokenizer_sha256"] = hashlib.sha256(f.read()).hexdigest()
  with open(os.path.join(workdir, EVAL_FILE + ".tmp"), "w") as f:
    json.dump(report, f, indent=1)
  os.replace(os.path.join(workdir, EVAL_FILE + ".tmp"), os.path.join(workdir, EVAL_FILE))
  return report


# ------------------------------------------------------------------------------------------------
# The report: table, JSON and plot.


def _mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (0 from one seed: no spread measured)."""
  n = len(values)
  mean = sum(values) / n
  return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def _stats(values) -> dict:
  mean, std = _mean_std(values)
  return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def _aligned_points(evals: dict, arm: str, seeds: list) -> list:
  """[[seed's point i for each seed] for each evaluation point i], checked to be the same steps."""
  columns = list(zip(*(evals[(arm, s)]["points"] for s in seeds)))
  counts = {len(evals[(arm, s)]["points"]) for s in seeds}
  if len(counts) > 1 or any(len({p["step"] for p in at}) > 1 for at in columns):
    raise ValueError(
        f"{arm}: the seeds' checkpoints differ: {[[p['step'] for p in evals[(arm, s)]['points']] for s in seeds]}"
    )
  return columns


def summarise(evals: dict, pretrain: str, arms: list, seeds: list) -> dict:
  """{arm: per-seed results and mean/std per evaluation point}, the reference numbers, effects."""
  out = {"seeds": seeds, "arms": {}, "reference": {}}
  out[pretrain] = {
      "points": [
          {"step": at[0]["step"], "text_ppl": _stats([p["text_ppl"] for p in at])}
          for at in _aligned_points(evals, pretrain, seeds)
      ],
      "per_seed": {str(s): evals[(pretrain, s)]["points"] for s in seeds},
  }
  pre = [evals[(pretrain, s)]["text"] for s in seeds]
  for key, name in (("model_ppl", f"{pretrain}_ppl"), ("unigram_ppl", "unigram_ppl"), ("bigram_ppl", "bigram_ppl")):
    out["reference"][name] = _stats([t[key] for t in pre])
  out["reference"]["digit_fid_real"] = _stats([evals[(arms[0], s)]["digit_fid_real"] for s in seeds])
  shas = {evals[(a, s)]["tokenizer_sha256"] for a in [pretrain] + arms for s in seeds}
  out["same_tokenizer_everywhere"] = len(shas) == 1
  for arm in arms:
    points = [
        {
            "step": at[0]["step"],
            "image_steps": at[0]["image_steps"],
            **{k: _stats([p[k] for p in at]) for k in ("digit_accuracy", "worst_class_accuracy", "digit_fid")},
        }
        for at in _aligned_points(evals, arm, seeds)
    ]
    out["arms"][arm] = {
        "points": points,
        "text_ppl": _stats([evals[(arm, s)]["text"]["model_ppl"] for s in seeds]),
        "per_seed": {
            str(s): {"points": evals[(arm, s)]["points"], "text_ppl": evals[(arm, s)]["text"]["model_ppl"]}
            for s in seeds
        },
    }
  out["effects"] = effects(out, seeds)
  return out


def _final(summary, arm, seed, metric):
  r = summary["arms"][arm]["per_seed"][str(seed)]
  return r["text_ppl"] if metric == "text_ppl" else r["points"][-1][metric]


def effects(summary: dict, seeds: list) -> list:
  """The paper's effects at the end of training: the better arm minus the worse, per seed."""
  out = []
  for name, better, worse, metric, lower in EFFECTS:
    if better not in summary["arms"] or worse not in summary["arms"]:
      continue
    diffs = [_final(summary, better, s, metric) - _final(summary, worse, s, metric) for s in seeds]
    mean, std = _mean_std(diffs)
    out.append(
        {
            "effect": name,
            "arms": [better, worse],
            "metric": metric,
            "difference_mean": mean,
            "difference_std": std,
            "per_seed": diffs,
            # Seeds where the first arm (the paper's choice) is better: lower FID or perplexity,
            # higher accuracy. For (a)-(c), the paper's direction.
            "first_better_seeds": sum((d < 0) if lower else (d > 0) for d in diffs),
        }
    )
  return out


def markdown(summary: dict, pretrain: str, settings: dict) -> str:
  ref = summary["reference"]
  seeds = summary["seeds"]
  pm = lambda d, f="{:.1f}": f"{f.format(d['mean'])} ± {f.format(d['std'])}"  # noqa: E731
  lines = [
      "# Ablations at the embedded default's scale",
      "",
      f"`python benchmarks/ablations.py {settings['command']}`: seeds {', '.join(map(str, seeds))}; "
      "mean ± standard deviation over seeds. Digits: "
      f"{settings['num_per_class']} guided samples per digit at every checkpoint, recognised by the "
      "project's digit classifier; digit-FID against held-out MNIST digits (real training digits at "
      f"this sample count: {pm(ref['digit_fid_real'])}). Text: held-out pydoc perplexity at the end "
      f"({pretrain}: {pm(ref[pretrain + '_ppl'])}; bigram table {pm(ref['bigram_ppl'])}, unigram "
      f"{pm(ref['unigram_ppl'])}).",
      "",
      "| arm | step | image steps | digits recognised | worst digit | digit-FID | text perplexity |",
      "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for p in summary[pretrain]["points"]:
    lines.append(f"| {pretrain} | {p['step']} | 0 | | | | {pm(p['text_ppl'])} |")
  for arm, r in summary["arms"].items():
    for i, p in enumerate(r["points"]):
      last = i == len(r["points"]) - 1
      lines.append(
          f"| {arm} | {p['step']} | {p['image_steps']} | {pm(p['digit_accuracy'], '{:.1%}')} | "
          f"{pm(p['worst_class_accuracy'], '{:.0%}')} | {pm(p['digit_fid'])} | "
          f"{pm(r['text_ppl']) if last else ''} |"
      )
  lines += [
      "",
      "The paper's effects at the end of training (first arm minus second, paired by seed):",
      "",
      "| effect | arms | difference | per seed | seeds where the first arm is better |",
      "|---|---|---:|---|---:|",
  ]
  for e in summary["effects"]:
    f = "{:+.1%}" if e["metric"] == "digit_accuracy" else "{:+.2f}"
    lines.append(
        f"| {e['effect']} | {e['arms'][0]} − {e['arms'][1]} | "
        f"{f.format(e['difference_mean'])} ± {f.format(e['difference_std']).lstrip('+')} | "
        f"{', '.join(f.format(d) for d in e['per_seed'])} | {e['first_better_seeds']} of {len(seeds)} |"
    )
  if not summary["same_tokenizer_everywhere"]:
    lines += ["", "WARNING: the runs do not all have the same tokenizer."]
  return "\n".join(lines) + "\n"


def plot(summary: dict, pretrain: str, path: str) -> None:
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  n = len(summary["seeds"])
  for k, (arm, r) in enumerate(summary["arms"].items()):
    colour = f"C{k}"
    x = [p["image_steps"] for p in r["points"]]
    for ax, key in zip(axes[:2], ("digit_accuracy", "digit_fid")):
      ax.plot(x, [p[key]["mean"] for p in r["points"]], "o-", color=colour, label=arm, markersize=3)
      if key == "digit_fid":
        ax.set_yscale("log")  # from noise (hundreds) down to tens
      ax.fill_between(
          x, [p[key]["min"] for p in r["points"]], [p[key]["max"] for p in r["points"]], color=colour, alpha=0.2
      )
    seeds_ppl = [s["text_ppl"] for s in r["per_seed"].values()]
    axes[2].bar(k, r["text_ppl"]["mean"], color=colour, alpha=0.6)
    axes[2].plot([k] * len(seeds_ppl), seeds_ppl, "k.", markersize=5)
  ref = summary["reference"]
  axes[1].axhline(ref["digit_fid_real"]["mean"], color="grey", ls=":", label="real digits")
  axes[2].axhline(ref[pretrain + "_ppl"]["mean"], color="k", ls="--", label=pretrain)
  axes[2].axhline(ref["bigram_ppl"]["mean"], color="grey", ls=":", label="bigram table")
  axes[0].set(xlabel="image (diffusion) steps", ylabel="digits recognised", title="digit accuracy", ylim=(0, 1))
  axes[1].set(xlabel="image (diffusion) steps", ylabel="digit-FID (lower is better)", title="digit-FID")
  axes[2].set(ylabel="held-out perplexity (lower is better)", title="text perplexity at the end")
  axes[2].set_xticks(range(len(summary["arms"])), list(summary["arms"]), rotation=20)
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"MonoFormer ablations on MNIST + pydoc: mean over {n} seed(s), band and dots: each seed")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(args, cfgs, workdirs: dict, command: str) -> str:
  """Writes ablations.{json,md,png} into args.out; returns the Markdown table."""
  evals = {}
  for key, workdir in workdirs.items():
    with open(os.path.join(workdir, EVAL_FILE)) as f:
      evals[key] = json.load(f)
  summary = summarise(evals, cfgs.PRETRAIN, list(args.arms), list(args.seeds))
  summary["settings"] = {
      "command": command,
      "steps": args.steps,
      "pretrain_steps": args.pretrain_steps,
      "eval_every": args.eval_every,
      "num_per_class": args.num_per_class,
      "test": args.test,
      "workdir": os.path.relpath(args.workdir),  # relative: the committed report names no machine's paths
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "ablations.json"), "w") as f:
    json.dump(summary, f, indent=1)
  table = markdown(summary, cfgs.PRETRAIN, summary["settings"])
  with open(os.path.join(args.out, "ablations.md"), "w") as f:
    f.write(table)
  plot(summary, cfgs.PRETRAIN, os.path.join(args.out, "ablations.png"))
  return table


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
  p.add_argument("--steps", type=int, default=0, help="image arms' training steps (0: the config's)")
  p.add_argument("--pretrain_steps", type=int, default=0, help="text pretraining steps (0: the config's)")
  p.add_argument("--eval_every", type=int, default=0, help="checkpoint interval of the image arms (0: the config's)")
  p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="runs at once (default: cores)")
  p.add_argument("--out", default=os.path.join("benchmarks", "ablations"), help="table, JSON and plot")
  p.add_argument("--workdir", default=os.path.join("runs", "ablations"), help="the runs and their logs")
  p.add_argument("--arms", default="", help="comma-separated subset of the config's arms (default: all)")
  p.add_argument("--num_per_class", type=int, default=20, help="samples per digit at every evaluation")
  p.add_argument("--classifier_cache", default="", help="the digit classifier's cache folder (default: ~/.cache)")
  p.add_argument("--test", action="store_true", help="the configs' test shrinks (the smoke test)")
  p.add_argument("--evaluate", default="", metavar="WORKDIR", help=argparse.SUPPRESS)  # one run (a job)
  p.add_argument("--images", action="store_true", help=argparse.SUPPRESS)  # ... its digits too
  args = p.parse_args(argv)
  if args.evaluate:
    tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)
    evaluate_run(args.evaluate, args.num_per_class, args.classifier_cache, args.images)
    return
  cfgs = ablation_configs()
  args.seeds = [int(s) for s in args.seeds.split(",")]
  args.arms = [a for a in args.arms.split(",") if a] or list(cfgs.ARMS)
  unknown = set(args.arms) - set(cfgs.ARMS)
  if unknown:
    sys.exit(f"unknown arms {sorted(unknown)} (arms: {', '.join(cfgs.ARMS)})")
  if args.jobs < 1:
    sys.exit("--jobs must be >= 1")
  # Subprocesses run from the repository root: paths given relative to here are made absolute.
  args.workdir, args.out = os.path.abspath(args.workdir), os.path.abspath(args.out)
  if args.classifier_cache:
    args.classifier_cache = os.path.abspath(args.classifier_cache)
  check_settings(args)
  env = dict(os.environ)
  # Every run of one model shape compiles the same programs: once, in a cache the runs share.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.workdir, "xla_cache"))
  jobs, workdirs = plan(args, cfgs)
  t0 = time.perf_counter()
  failed = run_jobs(jobs, args.jobs, env)
  if failed:
    sys.exit(f"{len(failed)} jobs failed or were skipped: {', '.join(failed)} (logs in {args.workdir}/logs)")
  command = " ".join(sys.argv[1:] if argv is None else argv)
  print(write_report(args, cfgs, workdirs, command))
  print(f"wrote {args.out}/ablations.{{md,json,png}} ({time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
  main()
