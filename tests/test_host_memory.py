"""host_memory: the malloc tuning keeps XLA:CPU's per-step buffers mapped (fewer page faults)."""
import os
import subprocess
import sys
import textwrap

import pytest

from monoformer_jax import host_memory
from tests.helpers_env import subprocess_env

# A jitted step whose temporaries (16 MB each) are more than glibc serves from its arenas, run 8
# times. Compiled with XLA's default flags (the measured step is what users run).
_PROGRAM = textwrap.dedent("""
    import resource, sys
    from monoformer_jax.host_memory import tune_for_xla_cpu
    applied = tune_for_xla_cpu(sys.argv[1])
    import jax, jax.numpy as jnp
    x = jax.random.normal(jax.random.key(0), (2048, 2048))
    f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T + 1.0) * jnp.sin(x) + jnp.cos(x) * x))
    f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(RUNS):
      f(x).block_until_ready()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")
RUNS = 8


def _faults(mode: str) -> tuple[bool, int]:
  env = dict(subprocess_env(), XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-c", _PROGRAM.replace("RUNS", str(RUNS)), mode], env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_tuning_cuts_page_faults_of_repeated_steps():
  applied, tuned = _faults("on")
  not_applied, plain = _faults("off")
  assert applied and not not_applied
  # Untuned, every run faults its temporaries back in (~8.7k faults per run here, ~0.5k tuned);
  # tuned, the pages stay mapped.
  assert plain > RUNS * 3000, plain
  assert tuned * 3 < plain, (tuned, plain)


def test_modes(monkeypatch):
  with pytest.raises(ValueError, match="MONOFORMER_HOST_MALLOC='sometimes'"):
    host_memory.tune_for_xla_cpu("sometimes")
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert not host_memory._cpu_only()  # pylint: disable=protected-access
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory._cpu_only()  # pylint: disable=protected-access
