"""Keep freed host memory in the process, so XLA:CPU steps stop page-faulting (glibc only).

XLA:CPU allocates a step's temporary buffers with malloc from its worker threads. glibc serves
requests that large from fresh mmap'd pages (per-thread arenas cannot hold them) and unmaps them
on free, so every step faults its whole working set back in, zero-filled by the kernel. Measured
on the embedded default (2 cores): 3.6M page faults in 40 s of training and about a quarter of the
CPU time in the kernel. One arena, no mmap and no trimming keep those pages mapped: faults drop
~10x, kernel time ~3x, and a train step is ~15-25% faster (benchmarks/RESULTS.md). The price is
that the process keeps its peak heap (the default job: ~1.4 GB instead of ~1.0 GB).

Applied by every entry point before JAX starts its threads: `tune_for_xla_cpu()`. Controlled by
MONOFORMER_HOST_MALLOC: `auto` (default: only when JAX can run on nothing but the CPU here),
`on`, `off`. On accelerators the host is not in the step's hot path and one shared arena could
slow multi-threaded input pipelines, so `auto` leaves them alone.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import os
import sys

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# Accelerator plugins by the device files their hardware shows under /dev: an installed plugin
# without its hardware (libtpu on a CPU host, to compile for TPUs ahead of time) runs on the CPU.
_ACCELERATORS = (
    (("libtpu", "jax-tpu", "jax_tpu"), ("accel[0-9]*", "vfio/[0-9]*")),
    (("jax-cuda", "jax_cuda", "nvidia-"), ("nvidia[0-9]*",)),
    (("jax-rocm", "jax_rocm"), ("kfd",)),
)
_DEV = "/dev"

_applied = False


def _cpu_only() -> bool:
  """True when JAX will run on the CPU: JAX_PLATFORMS says so, or no installed accelerator plugin
  has its hardware here. Decided without starting JAX (its threads must not exist yet)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return all(p.strip() == "cpu" for p in platforms.split(",") if p.strip())
  names = [(dist.metadata["Name"] or "").lower() for dist in importlib.metadata.distributions()]
  for prefixes, device_files in _ACCELERATORS:
    if any(name.startswith(prefixes) for name in names):
      if any(glob.glob(os.path.join(_DEV, pattern)) for pattern in device_files):
        return False
  return True


def tune_for_xla_cpu(mode: str | None = None) -> bool:
  """Sets glibc malloc to keep freed memory (see the module doc); returns whether it did.

  Call it before the first JAX computation (it must precede the creation of malloc arenas by
  XLA's threads to take full effect); calling it again is a no-op.
  """
  global _applied  # pylint: disable=global-statement  # once per process, before XLA's threads
  mode = (mode or os.environ.get("MONOFORMER_HOST_MALLOC", "auto")).lower()
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"MONOFORMER_HOST_MALLOC={mode!r}: use auto, on or off")
  if _applied:
    return True
  if mode == "off" or not sys.platform.startswith("linux"):
    return False
  if mode == "auto" and not _cpu_only():
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  ok = mallopt(_M_ARENA_MAX, 1) == 1 and mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
  _applied = ok
  return ok
