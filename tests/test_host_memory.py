"""host_memory: the malloc tuning puts XLA:CPU-sized buffers on the heap and keeps them there
(what stops the per-step page faults; the fault counts themselves are a benchmark:
benchmarks/host_memory.py, figures in benchmarks/RESULTS.md)."""

import subprocess
import sys
import textwrap

import pytest

from monoformer_jax import host_memory
from tests.helpers_env import subprocess_env

# A 64 MB buffer, as a train step's temporaries are: glibc serves it from mmap (and unmaps it on
# free, so the next step faults it back in) unless tuned; tuned, it comes from the heap, which
# keeps the pages after the free. Read through mallinfo2 (glibc >= 2.33).
_PROGRAM = textwrap.dedent("""
    import ctypes, sys
    from monoformer_jax.host_memory import tune_for_xla_cpu
    applied = tune_for_xla_cpu(sys.argv[1])
    import numpy as np

    class Mallinfo2(ctypes.Structure):
      _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                  "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    buffer = np.ones(16 << 20, np.float32)
    mapped = libc.mallinfo2().hblkhd
    del buffer
    print(applied, mapped, libc.mallinfo2().arena)
""")
BUFFER = 64 << 20


def _malloc_state(mode: str) -> tuple[bool, int, int]:
  out = subprocess.run(
      [sys.executable, "-c", _PROGRAM, mode],
      env=subprocess_env(),
      capture_output=True,
      text=True,
      timeout=300,
      check=True,
  ).stdout.split()
  return out[0] == "True", int(out[1]), int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_tuning_keeps_large_buffers_on_the_heap():
  applied, mapped, heap_after_free = _malloc_state("on")
  assert applied
  assert mapped < BUFFER and heap_after_free >= BUFFER, (mapped, heap_after_free)
  applied, mapped, heap_after_free = _malloc_state("off")
  assert not applied
  assert mapped >= BUFFER and heap_after_free < BUFFER, (mapped, heap_after_free)


def test_modes(monkeypatch):
  with pytest.raises(ValueError, match="MONOFORMER_HOST_MALLOC='sometimes'"):
    host_memory.tune_for_xla_cpu("sometimes")
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert not host_memory._cpu_only()  # pylint: disable=protected-access
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory._cpu_only()  # pylint: disable=protected-access


class _Dist:

  def __init__(self, name):
    self.metadata = {"Name": name}


@pytest.mark.parametrize(
    "installed, device_files, cpu_only",
    [
        (["numpy"], [], True),
        (["libtpu"], [], True),  # libtpu on a CPU host (AOT compiles for TPU slices): still a CPU run
        (["libtpu"], ["accel0"], False),  # a TPU VM (v4, v5e)
        (["libtpu"], ["vfio/0"], False),  # a TPU VM (v5p, v6e)
        (["jax-cuda12-plugin"], [], True),
        (["jax-cuda12-plugin"], ["nvidia0"], False),
        (["numpy"], ["nvidia0"], True),  # a GPU without JAX's CUDA plugin: JAX runs on the CPU
    ],
)
def test_cpu_only_is_decided_by_the_devices_present(tmp_path, monkeypatch, installed, device_files, cpu_only):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(host_memory.importlib.metadata, "distributions", lambda: [_Dist(n) for n in installed])
  monkeypatch.setattr(host_memory, "_DEV", str(tmp_path))
  for name in device_files:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text("")
  assert host_memory._cpu_only() is cpu_only  # pylint: disable=protected-access


# The trimming thread: a freed 64 MB heap block stays resident (the tuning's point) until the
# thread hands its pages back; with the interval 0 there is no thread and it stays.
_TRIM_PROGRAM = textwrap.dedent("""
    import time
    from monoformer_jax.host_memory import tune_for_xla_cpu
    assert tune_for_xla_cpu("on")
    import numpy as np
    def rss_mb():
      return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) // 1024
    buffer = np.ones(16 << 20, np.float32)
    del buffer
    freed = rss_mb()
    time.sleep(1.5)
    print(freed, rss_mb())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
@pytest.mark.parametrize("interval, released", [("0.2", True), ("0", False)])
def test_the_trimming_thread_releases_free_heap_pages(interval, released):
  env = subprocess_env(MONOFORMER_HOST_MALLOC_TRIM_S=interval)
  out = subprocess.run(
      [sys.executable, "-c", _TRIM_PROGRAM], env=env, capture_output=True, text=True, timeout=300, check=True
  )
  freed, later = map(int, out.stdout.split())
  assert (freed - later >= 48) is released, (freed, later)


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "inf"])
def test_a_bad_trim_interval_is_named(monkeypatch, value):
  monkeypatch.setenv("MONOFORMER_HOST_MALLOC_TRIM_S", value)
  with pytest.raises(ValueError, match="MONOFORMER_HOST_MALLOC_TRIM_S"):
    host_memory.trim_interval_s()
