"""Host memory over a long run: the resident set of `main` on the embedded default, step by step.

    python benchmarks/soak.py [--steps 3000] [--warmup_steps 500] [--config configs/mnist_tiny.py] \
        [--config.x=y ...]      # any other flag goes to the training command

Starts the README's training command as a child process (fresh workdir, checkpoints, logs and
the final samples as configured, `--config.num_train_steps=STEPS`), reads its resident set
(VmRSS in /proc/PID/status) every half second and the step it reports on each log line, and
prints one JSON line: the RSS right after `warmup_steps` (compiles, the first checkpoint save and
the data pipeline's buffers are in by then), its peak and its value at the last logged step, the
growth from warm-up to the end in percent, and the peak of every window of `warmup_steps` steps
after warm-up with the growth from the first window's peak to the last's. A measurement, not a test (results in
benchmarks/RESULTS.md); Linux only.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mib(pid: int) -> float:
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  raise RuntimeError(f"no VmRSS for process {pid}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--warmup_steps", type=int, default=500)
  parser.add_argument("--config", default="configs/mnist_tiny.py")
  parser.add_argument("--trace", default="", help="also write (seconds, step, RSS MiB) rows to this CSV")
  args, overrides = parser.parse_known_args()

  with tempfile.TemporaryDirectory() as workdir:
    cmd = [
        sys.executable,
        "-m",
        "monoformer_jax.main",
        f"--config={args.config}",
        f"--workdir={workdir}",
        f"--config.num_train_steps={args.steps}",
        *overrides,
    ]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    step = [0]
    tail = []

    def read_steps():
      for line in proc.stdout:
        tail.append(line)
        del tail[:-40]
        found = re.match(r"step (\d+)/", line)
        if found:
          step[0] = int(found.group(1))

    reader = threading.Thread(target=read_steps, daemon=True)
    reader.start()
    trace, t0 = [], time.perf_counter()
    while proc.poll() is None:
      try:
        trace.append((time.perf_counter() - t0, step[0], rss_mib(proc.pid)))
      except (FileNotFoundError, ProcessLookupError, RuntimeError):
        break
      time.sleep(0.5)
    proc.wait()
    reader.join(timeout=10)
  if proc.returncode != 0:
    sys.exit(f"training failed (exit {proc.returncode}):\n{''.join(tail)}")
  if args.trace:
    with open(args.trace, "w") as f:
      f.write("seconds,step,rss_mib\n" + "".join(f"{t:.1f},{s},{r:.1f}\n" for t, s, r in trace))
  after_warmup = [r for _, s, r in trace if s >= args.warmup_steps]
  training = [r for _, s, r in trace if args.warmup_steps <= s < args.steps]
  start, end = after_warmup[0], training[-1]
  # The allocator hands memory back between steps when not tuned: single readings swing by 15%,
  # so the peak of each window of `warmup_steps` steps is what shows growth.
  windows = {}
  for _, s, r in trace:
    if args.warmup_steps <= s < args.steps:
      key = (s - args.warmup_steps) // args.warmup_steps
      windows[key] = max(windows.get(key, 0.0), r)
  peaks = [round(windows[k], 1) for k in sorted(windows)]
  print(
      json.dumps(
          {
              "steps": args.steps,
              "overrides": overrides,
              "warmup_steps": args.warmup_steps,
              "rss_after_warmup_mib": round(start, 1),
              "rss_last_logged_step_mib": round(end, 1),
              "rss_peak_mib": round(max(r for _, _, r in trace), 1),
              "growth_pct": round(100 * (end - start) / start, 2),
              "max_growth_during_training_pct": round(100 * (max(training) - start) / start, 2),
              "window_peaks_mib": peaks,
              "window_peak_growth_pct": round(100 * (peaks[-1] - peaks[0]) / peaks[0], 2),
              "wall_s": round(trace[-1][0], 1),
          }
      )
  )


if __name__ == "__main__":
  main()
