"""Host memory over a long run: the resident set of `main` on the embedded default, step by step.

    python benchmarks/soak.py [--steps 3000] [--warmup_steps 500] [--config configs/mnist_tiny.py] \
        [--window_steps N] [--trace T.csv] [--config.x=y ...]   # other flags go to the training
    python benchmarks/soak.py --from_trace T.csv [--steps ...]     # summarize a saved trace again

Starts the README's training command as a child process (fresh workdir, checkpoints, logs and
the final samples as configured, `--config.num_train_steps=STEPS`), reads its resident set
(VmRSS in /proc/PID/status) every half second and the step it reports on each log line, and
prints one JSON line: the RSS right after `warmup_steps` (compiles, the first checkpoint save and
the data pipeline's buffers are in by then), its peak and its value at the last logged step, the
growth from warm-up to the end in percent, the peak and the floor of every window of
`window_steps` steps after warm-up (default: `warmup_steps`) with the growth from the first
window's to the last's, and the CPU time (user, system) and minor page faults per step after
warm-up. A measurement, not a test (results in
benchmarks/RESULTS.md); Linux only. MONOFORMER_HOST_MALLOC / MONOFORMER_HOST_MALLOC_TRIM_S in the
environment reach the child (monoformer_jax/host_memory.py).
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


def cpu_and_faults(pid: int) -> tuple[float, float, int]:
  """(user CPU s, system CPU s, minor page faults) of process `pid` so far (/proc/PID/stat)."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  tick = os.sysconf("SC_CLK_TCK")
  # After the ")" that ends the command name: state is field 3, minflt 10, utime 14, stime 15.
  return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7])


def read_trace(path: str) -> list[tuple]:
  """Rows of a --trace CSV: (seconds, step, RSS MiB[, user s, system s, minor faults])."""
  with open(path) as f:
    next(f)
    return [tuple(float(v) if i != 1 else int(v) for i, v in enumerate(line.strip().split(","))) for line in f]


def summarize(trace: list[tuple], steps: int, warmup_steps: int, window_steps: int) -> dict:
  """The JSON summary of a trace (see the module doc)."""
  after_warmup = [r for _, s, r, *_ in trace if s >= warmup_steps]
  training = [r for _, s, r, *_ in trace if warmup_steps <= s < steps]
  start, end = after_warmup[0], training[-1]
  # The allocator hands memory back between steps when not tuned (and the tuned heap's free
  # pages are handed back every few seconds, host_memory.py): single readings swing by 15-25%,
  # so the peak of each window of `window_steps` steps is what shows growth; the floor of each
  # window (its lowest reading: right after a release) follows the memory in use.
  peaks, floors = {}, {}
  for _, s, r, *_ in trace:
    if warmup_steps <= s < steps:
      key = (s - warmup_steps) // window_steps
      peaks[key] = max(peaks.get(key, 0.0), r)
      floors[key] = min(floors.get(key, float("inf")), r)
  peaks = [round(peaks[k], 1) for k in sorted(peaks)]
  floors = [round(floors[k], 1) for k in sorted(floors)]
  out = {
      "steps": steps,
      "warmup_steps": warmup_steps,
      "window_steps": window_steps,
      "rss_after_warmup_mib": round(start, 1),
      "rss_last_logged_step_mib": round(end, 1),
      "rss_peak_mib": round(max(r for _, _, r, *_ in trace), 1),
      "growth_pct": round(100 * (end - start) / start, 2),
      "max_growth_during_training_pct": round(100 * (max(training) - start) / start, 2),
      "window_peaks_mib": peaks,
      "window_peak_growth_pct": round(100 * (peaks[-1] - peaks[0]) / peaks[0], 2),
      "window_peak_max_growth_pct": round(100 * (max(peaks) - peaks[0]) / peaks[0], 2),
      "window_floors_mib": floors,
      "window_floor_growth_pct": round(100 * (floors[-1] - floors[0]) / floors[0], 2),
  }
  # CPU time and page faults per step after warm-up: what keeping (or releasing) the heap costs,
  # less sensitive to other work on the machine than the wall clock.
  measured = [row for row in trace if len(row) == 6 and warmup_steps <= row[1] < steps]
  if measured:
    first, last = measured[0], measured[-1]
    per_step = max(last[1] - first[1], 1)
    out.update(
        user_cpu_ms_per_step=round(1e3 * (last[3] - first[3]) / per_step, 1),
        system_cpu_ms_per_step=round(1e3 * (last[4] - first[4]) / per_step, 1),
        minor_faults_per_step=round((last[5] - first[5]) / per_step),
    )
  out["wall_s"] = round(trace[-1][0], 1)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--warmup_steps", type=int, default=500)
  parser.add_argument("--window_steps", type=int, default=0, help="steps per window (default: warmup_steps)")
  parser.add_argument("--config", default="configs/mnist_tiny.py")
  parser.add_argument(
      "--trace", default="", help="also write (seconds, step, RSS MiB, user s, system s, minor faults) rows to this CSV"
  )
  parser.add_argument("--from_trace", default="", help="summarize this --trace CSV instead of training")
  args, overrides = parser.parse_known_args()
  window_steps = args.window_steps or args.warmup_steps
  if args.from_trace:
    print(json.dumps(summarize(read_trace(args.from_trace), args.steps, args.warmup_steps, window_steps)))
    return

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
        trace.append((time.perf_counter() - t0, step[0], rss_mib(proc.pid), *cpu_and_faults(proc.pid)))
      except (FileNotFoundError, ProcessLookupError, RuntimeError, IndexError):
        break
      time.sleep(0.5)
    proc.wait()
    reader.join(timeout=10)
  if proc.returncode != 0:
    sys.exit(f"training failed (exit {proc.returncode}):\n{''.join(tail)}")
  if args.trace:
    with open(args.trace, "w") as f:
      f.write("seconds,step,rss_mib,user_s,system_s,minor_faults\n")
      f.write("".join(f"{t:.1f},{s},{r:.1f},{u:.2f},{y:.2f},{m}\n" for t, s, r, u, y, m in trace))
  summary = summarize(trace, args.steps, args.warmup_steps, window_steps)
  summary.update(
      overrides=overrides,
      malloc=os.environ.get("MONOFORMER_HOST_MALLOC", "auto"),
      trim_interval_s=os.environ.get("MONOFORMER_HOST_MALLOC_TRIM_S", "default"),
  )
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
