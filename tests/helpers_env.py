"""How the tests run XLA, in this process and in the subprocesses they start (no jax import here:
conftest reads it before jax starts).

Test programs are tiny and most are compiled once and run a few times, so compiling is most of
the suite's time: LLVM's backend optimisations are switched off (`--xla_backend_optimization_level=0`
halved the compile-bound tests) and XLA:CPU's elementwise fusions are emitted by its older, cheaper
emitters (`--xla_cpu_use_fusion_emitters=false`: a 6-step run's compiles 12.5 s -> 5.3 s);
benchmarks/RESULTS.md, "Test suite". Nothing the tests check depends on them: every comparison
runs both sides under the same flags, and the seed sweeps measured the tolerances under them.
Benchmarks and users run XLA's defaults.
"""

import os
import sys

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
SESSION_CACHE_VAR = "MONOFORMER_TEST_XLA_CACHE"


def subprocess_env(devices: int = 0, **extra) -> dict:
  """The environment of a `python -m monoformer_jax...` subprocess: CPU, the test XLA flags,
  `devices` fake CPU devices (0: XLA's default, one), the session's compilation cache. The
  interpreter running the tests comes first on PATH, so that the launch scripts' `python` is
  this one even where its venv was not activated (`.venv/bin/python -m pytest`)."""
  flags = TEST_XLA_FLAGS + (f" --xla_force_host_platform_device_count={devices}" if devices else "")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **{k: str(v) for k, v in extra.items()})
  env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
  return env
