"""Page faults of a repeated XLA:CPU step with and without the malloc tuning (host_memory.py).

    python benchmarks/host_memory.py [--runs 8]

Prints the minor page faults of each run of a jitted step whose temporaries are 16 MB buffers,
tuned and untuned, one fresh process each (results in benchmarks/RESULTS.md). A measurement,
not a test: the counts depend on what else the machine is doing.
"""

import argparse
import subprocess
import sys
import textwrap

_PROGRAM = textwrap.dedent("""
    import resource, sys
    from monoformer_jax.host_memory import tune_for_xla_cpu
    applied = tune_for_xla_cpu(sys.argv[1])
    import jax, jax.numpy as jnp
    x = jax.random.normal(jax.random.key(0), (2048, 2048))
    f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T + 1.0) * jnp.sin(x) + jnp.cos(x) * x))
    f(x).block_until_ready()
    faults = []
    for _ in range(int(sys.argv[2])):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, *faults)
""")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", type=int, default=8)
  args = parser.parse_args()
  for mode in ("on", "off"):
    out = subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode, str(args.runs)], capture_output=True, text=True, check=True
    ).stdout.split()
    faults = [int(v) for v in out[1:]]
    print(f"tuning {mode}: faults per run {faults} (median {sorted(faults)[len(faults) // 2]})")


if __name__ == "__main__":
  main()
