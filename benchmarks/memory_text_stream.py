"""Diagnostic: the resident set of the text data stream alone (no model), batch by batch.

    python benchmarks/memory_text_stream.py [--batches 1500] [--malloc on|off] [--tracemalloc]

Builds the embedded default's text iterator (configs/mnist_tiny.py: pydoc, 16 x 96, packed) as the
trainer does and reads batches, printing VmRSS (/proc/self/status) every 100 batches; with
--tracemalloc, also the top Python allocation growth between batch 100 and the end.
"""

import argparse
import os
import sys
import tempfile
import time
import tracemalloc

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import mnist_tiny  # noqa: E402
from monoformer_jax.data import pipeline, registry  # noqa: E402
from monoformer_jax.data.sources import pydoc_passages  # noqa: E402
from monoformer_jax.data.tokenizer import train_sentencepiece  # noqa: E402
from monoformer_jax.host_memory import tune_for_xla_cpu  # noqa: E402


def status(key="VmRSS"):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) / 1024
  return float("nan")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batches", type=int, default=1500)
  p.add_argument("--malloc", default="on")
  p.add_argument("--tracemalloc", action="store_true")
  p.add_argument("--threads", type=int, default=1)
  args = p.parse_args()
  # Before anything runs (importing starts no allocator threads; see host_memory.py).
  print("malloc tuned:", tune_for_xla_cpu(args.malloc), flush=True)
  c = mnist_tiny.get_config()
  d = c.data
  tok = train_sentencepiece(pydoc_passages(), d.tokenizer_vocab_size, tempfile.mkdtemp())
  it = pipeline.make_text_iterator(
      registry.text_source(d),
      tok,
      batch_size=d.text_batch_size,
      seq_len=d.text_seq_len,
      seed=1,
      packing=d.packing,
      image_shape=(28, 28, 1),
      num_threads=args.threads,
  )
  t0 = time.time()
  snap = None
  for i in range(1, args.batches + 1):
    next(it)
    if i == 100 and args.tracemalloc:
      tracemalloc.start(25)
      snap = tracemalloc.take_snapshot()
    if i % 100 == 0:
      print(f"batch {i} rss {status():.1f} MB hwm {status('VmHWM'):.1f} MB ({time.time() - t0:.0f} s)", flush=True)
  if snap is not None:
    diff = tracemalloc.take_snapshot().compare_to(snap, "traceback")
    for s in diff[:8]:
      print(s)
      for line in s.traceback.format()[-12:]:
        print("   ", line)


if __name__ == "__main__":
  main()
