"""Diagnostic: where the trainer's resident set goes, step by step, from inside the process.

    python benchmarks/memory_probe.py --every 25 [--tracemalloc] [--out probe.csv] -- \
        --config=configs/mnist_tiny.py --workdir=/tmp/w --config.num_train_steps=600 ...

Runs `monoformer_jax.main` in this process with a hook that, every `--every` steps, records
VmRSS / VmHWM (/proc/self/status), glibc's mallinfo2 (heap arena size, bytes in use, bytes free,
mmap'd bytes), the live JAX arrays (count and bytes), Python objects tracked by the gc and, with
--tracemalloc, the Python heap (and the top growth between the first and the last probe).
A measurement aid, not a test.
"""

import argparse
import ctypes
import functools
import gc
import os
import sys
import time
import tracemalloc

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

from monoformer_jax import main as main_lib  # noqa: E402
from monoformer_jax.train import steps as steps_lib  # noqa: E402


class _Mallinfo2(ctypes.Structure):
  _fields_ = [
      (name, ctypes.c_size_t)
      for name in (
          "arena",
          "ordblks",
          "smblks",
          "hblks",
          "hblkhd",
          "usmblks",
          "fsmblks",
          "uordblks",
          "fordblks",
          "keepcost",
      )
  ]


def mallinfo():
  libc = ctypes.CDLL("libc.so.6")
  f = libc.mallinfo2
  f.restype = _Mallinfo2
  m = f()
  return {k: getattr(m, k) for k, _ in _Mallinfo2._fields_}


def malloc_info_xml(path):
  """glibc's malloc_info (free chunks by size, per arena) written to `path`."""
  libc = ctypes.CDLL("libc.so.6")
  libc.fopen.restype = ctypes.c_void_p
  libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
  libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
  libc.fclose.argtypes = (ctypes.c_void_p,)
  fp = libc.fopen(path.encode(), b"w")
  libc.malloc_info(0, fp)
  libc.fclose(fp)


def status(key):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) / 1024
  return float("nan")


class Probe:

  def __init__(self, every, use_tracemalloc, out, malloc_info_path="", trim_every=0):
    self.every, self.tm, self.out, self.malloc_info = every, use_tracemalloc, out, malloc_info_path
    self.trim_every = trim_every
    self.rows, self.first_snap, self.t0 = [], None, time.time()

  def after_step(self, ctx):
    if self.trim_every and ctx.step % self.trim_every == 0:
      t = time.perf_counter()
      ctypes.CDLL("libc.so.6").malloc_trim(0)
      print(f"TRIM step={ctx.step} {1e3 * (time.perf_counter() - t):.1f} ms rss={status('VmRSS'):.1f}", flush=True)
    if ctx.step % self.every:
      return
    arrays = jax.live_arrays()
    m = mallinfo()
    row = {
        "step": ctx.step,
        "s": round(time.time() - self.t0, 1),
        "rss": round(status("VmRSS"), 1),
        "hwm": round(status("VmHWM"), 1),
        "heap_arena": round(m["arena"] / 2**20, 1),
        "in_use": round(m["uordblks"] / 2**20, 1),
        "free": round(m["fordblks"] / 2**20, 1),
        "mmapped": round(m["hblkhd"] / 2**20, 1),
        "jax_arrays": len(arrays),
        "jax_bytes_mb": round(sum(a.nbytes for a in arrays) / 2**20, 1),
        "gc_objects": len(gc.get_objects()),
    }
    if self.tm:
      if not tracemalloc.is_tracing():
        tracemalloc.start(20)
      row["py_traced"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 1)
      if self.first_snap is None:
        self.first_snap = tracemalloc.take_snapshot()
    if self.malloc_info:
      malloc_info_xml(self.malloc_info)
    self.rows.append(row)
    print("PROBE " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)

  def finish(self):
    if self.out:
      with open(self.out, "w") as f:
        keys = list(self.rows[0])
        f.write(",".join(keys) + "\n")
        for r in self.rows:
          f.write(",".join(str(r.get(k, "")) for k in keys) + "\n")
    if self.first_snap is not None:
      diff = tracemalloc.take_snapshot().compare_to(self.first_snap, "traceback")
      print("TRACEMALLOC top growth since the first probe:")
      for s in diff[:10]:
        print(s)
        for line in s.traceback.format()[-14:]:
          print("   ", line)


def _report_step_memory():
  """Prints XLA's memory analysis (temporaries, arguments, outputs) of each compiled train step."""
  compile_step = steps_lib.compile_step

  def wrapped(step_fn, state_shardings, mesh, rules, example_batch):
    run = compile_step(step_fn, state_shardings, mesh, rules, example_batch)
    done = []

    @functools.wraps(run)
    def first_call(state, batch, rng):
      if not done:
        done.append(1)
        with mesh, nn.logical_axis_rules(rules):
          a = run.jitted.lower(state, batch, rng).compile().memory_analysis()
        mb = lambda n: round(n / 2**20, 1)
        shapes = {k: tuple(v.shape) for k, v in batch.items()}
        print(
            f"STEP {shapes} temp={mb(a.temp_size_in_bytes)} MB args={mb(a.argument_size_in_bytes)} MB "
            f"out={mb(a.output_size_in_bytes)} MB alias={mb(a.alias_size_in_bytes)} MB",
            flush=True,
        )
      return run(state, batch, rng)

    first_call.jitted = run.jitted
    return first_call

  steps_lib.compile_step = wrapped


def main():
  argv = sys.argv[1:]
  split = argv.index("--") if "--" in argv else len(argv)
  p = argparse.ArgumentParser()
  p.add_argument("--every", type=int, default=25)
  p.add_argument("--tracemalloc", action="store_true")
  p.add_argument("--out", default="")
  p.add_argument("--trim_every", type=int, default=0, help="call malloc_trim(0) every this many steps")
  p.add_argument("--malloc_info", default="", help="write glibc's malloc_info XML here at each probe (overwritten)")
  args = p.parse_args(argv[:split])
  probe = Probe(args.every, args.tracemalloc, args.out, args.malloc_info, args.trim_every)
  _report_step_memory()
  rc = main_lib.main(argv[split + 1 :], hooks=[probe])
  probe.finish()
  sys.exit(rc)


if __name__ == "__main__":
  main()
