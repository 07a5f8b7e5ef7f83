"""Peak host memory of `sample` on a ~70M-parameter run against the `test` model's.

    python benchmarks/open_memory.py --work /tmp/open_memory [--repeats 3] [--code DIR]

Makes two runs at step 0 (`--config.num_train_steps=0`: initialised and saved, nothing trained):
the `mnist_tiny.py:test` model, and the same with width 1024, 12 layers, 16 heads and an FFN of
2816. Then, alternating, times `python -m monoformer_jax.sample --classes 3 --num_per_class 1`
on each in a fresh process and reads its peak resident set (`/usr/bin/time -v`). Reports the
big run's EMA bytes, each peak, and the big peak's excess over the small one in EMA-weight
units (the bar: at most 1.5). `--code DIR` runs another checkout's package (the code before a
change, for the figure it is compared with). A measurement, not a test.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = (
    "--config.model.hidden_size=1024",
    "--config.model.num_layers=12",
    "--config.model.num_heads=16",
    "--config.model.intermediate_size=2816",
)


def _env(code: str) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=code, MONOFORMER_COMPILATION_CACHE="off")


def make_run(work: str, name: str, extra, code: str) -> str:
  path = os.path.join(work, name)
  if not os.path.isdir(os.path.join(path, "checkpoints")):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "monoformer_jax.main",
            "--config=configs/mnist_tiny.py:test",
            f"--workdir={path}",
            "--config.num_train_steps=0",
            *extra,
        ],
        cwd=code,
        env=_env(code),
        check=True,
        capture_output=True,
    )
  return path


def peak_rss(run: str, code: str, out: str) -> tuple[float, float]:
  """(peak resident set in bytes, wall seconds) of one `sample` call."""
  proc = subprocess.run(
      [
          "/usr/bin/time",
          "-v",
          sys.executable,
          "-m",
          "monoformer_jax.sample",
          f"--workdir={run}",
          "--classes=3",
          "--num_per_class=1",
          f"--out={out}",
      ],
      cwd=code,
      env=_env(code),
      capture_output=True,
      text=True,
      check=True,
  )
  kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
  h, m, s = re.search(
      r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr
  ).groups()
  return kb * 1024.0, int(h or 0) * 3600 + int(m) * 60 + float(s)


def ema_bytes(run: str) -> int:
  """Bytes of the run's EMA weights (float32), from the parameter count of its config."""
  code = (
      "import jax, json, sys; from monoformer_jax.run.config import model_config_from, read_run_config;"
      "from monoformer_jax.model.monoformer import init_params;"
      "c = model_config_from(read_run_config(sys.argv[1]));"
      "import flax.linen as nn;"
      "p = nn.unbox(jax.eval_shape(lambda: init_params(c, jax.random.key(0))));"
      "print(sum(x.size for x in jax.tree.leaves(p)))"
  )
  out = subprocess.run([sys.executable, "-c", code, run], cwd=ROOT, env=_env(ROOT), capture_output=True, text=True)
  return 4 * int(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--work", required=True)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--code", default=ROOT, help="the checkout whose package runs (default: this one)")
  args = p.parse_args()
  os.makedirs(args.work, exist_ok=True)
  small = make_run(args.work, "small", (), args.code)
  big = make_run(args.work, "big", BIG, args.code)
  peaks = {"small": [], "big": []}
  seconds = {"small": [], "big": []}
  for _ in range(args.repeats):
    for name, run in (("small", small), ("big", big)):
      rss, wall = peak_rss(run, args.code, os.path.join(args.work, f"{name}.npz"))
      peaks[name].append(rss)
      seconds[name].append(wall)
  ema = ema_bytes(big)
  small_peak, big_peak = statistics.median(peaks["small"]), statistics.median(peaks["big"])
  report = {
      "code": args.code,
      "big_ema_bytes": ema,
      "peak_rss_small": peaks["small"],
      "peak_rss_big": peaks["big"],
      "seconds_small": seconds["small"],
      "seconds_big": seconds["big"],
      "excess_over_small_in_ema_units": (big_peak - small_peak) / ema,
  }
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
