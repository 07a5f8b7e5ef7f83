"""The entry points' persistent compilation cache (monoformer_jax/compilation_cache.py): where it
goes, that a second `sample` call loads every program the first compiled and draws the same
images, in a local folder and in a bucket, and that an unusable folder is a warning, not a failure."""

import os

import jax
import numpy as np
import pytest

from monoformer_jax import compilation_cache
from tests.gcs_emulator import BUCKET, gcs  # noqa: F401  pylint: disable=unused-import  # the fixture
from tests.helpers import run_module, shared_tiny_run
from tests.helpers_env import subprocess_env

ENV = compilation_cache.ENV_VAR


def test_where_the_cache_goes():
  resolve = compilation_cache.resolve_cache_dir
  home = os.path.join(os.path.expanduser("~"), ".cache", "monoformer_jax", "xla")
  assert resolve({}, None) == home
  assert resolve({"XDG_CACHE_HOME": "/xdg"}, None) == "/xdg/monoformer_jax/xla"
  assert resolve({ENV: " "}, None) == home  # blank is unset
  # The user's own JAX cache (its config, or its variable before JAX read it) comes next ...
  assert resolve({"JAX_COMPILATION_CACHE_DIR": "/env"}, None) == "/env"
  assert resolve({"JAX_COMPILATION_CACHE_DIR": "/env"}, "/config") == "/config"
  # ... and ours before both; `off` sets none.
  assert resolve({ENV: "gs://b/xla", "JAX_COMPILATION_CACHE_DIR": "/env"}, "/config") == "gs://b/xla"
  assert resolve({ENV: "Off"}, "/config") is None


def test_off_and_an_unusable_folder_leave_jax_as_it_was(tmp_path, monkeypatch):
  before = jax.config.jax_compilation_cache_dir  # the test session's own cache
  monkeypatch.setenv(ENV, "off")
  assert compilation_cache.enable_compilation_cache() is None
  (tmp_path / "a_file").write_text("not a folder")
  monkeypatch.setenv(ENV, str(tmp_path / "a_file" / "xla"))
  with pytest.warns(UserWarning, match=r"compilation cache .*a_file/xla.* is unusable .*compiling without it"):
    assert compilation_cache.enable_compilation_cache() is None
  assert jax.config.jax_compilation_cache_dir == before


HIT, MISS = "Persistent compilation cache hit", "PERSISTENT COMPILATION CACHE MISS"


def _sample_twice(run_dir, out_dir, cache, list_entries, extra_env=None):
  """Two `sample` calls with the cache at `cache`, JAX saying what it loaded (hit) and what it
  compiled (miss): [(hits, misses, entries after the call, the images drawn)] for each."""
  env = subprocess_env(
      **(extra_env or {}),
      **{ENV: cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"},
      JAX_LOG_COMPILES="1",
      JAX_EXPLAIN_CACHE_MISSES="1",
  )
  env.pop("JAX_COMPILATION_CACHE_DIR")  # not the session's cache: this test's own
  calls = []
  for call in range(2):
    out = os.path.join(out_dir, f"call{call}.npz")
    proc = run_module("-m", "monoformer_jax.sample", f"--workdir={run_dir}", "--classes=3,7", f"--out={out}", env=env)
    calls.append((proc.stderr.count(HIT), proc.stderr.count(MISS), list_entries(), np.load(out)["images"]))
  return calls


def _assert_second_call_loads_all(calls):
  (hits1, misses1, entries1, images1), (hits2, misses2, entries2, images2) = calls
  assert hits1 == 0 and misses1 >= 3, (hits1, misses1)  # a fresh cache: everything compiled ...
  assert len(entries1) == misses1 and all(name.endswith("-cache") for name in entries1), entries1  # ... and stored
  assert (hits2, misses2) == (misses1, 0)  # the second call compiles nothing
  assert entries2 == entries1
  np.testing.assert_array_equal(images1, images2)  # and the loaded programs draw the same images


@pytest.mark.slow
def test_a_second_sample_call_loads_every_program(tmp_path, tmp_path_factory):
  cache = tmp_path / "cache"
  calls = _sample_twice(shared_tiny_run(tmp_path_factory), str(tmp_path), str(cache), lambda: sorted(os.listdir(cache)))
  _assert_second_call_loads_all(calls)


@pytest.mark.slow
def test_the_cache_in_a_bucket(gcs, tmp_path, tmp_path_factory):  # noqa: F811
  calls = _sample_twice(
      shared_tiny_run(tmp_path_factory),
      str(tmp_path),
      f"gs://{BUCKET}/xla",
      lambda: sorted(name.rsplit("/", 1)[-1] for name in gcs.list("xla/")),
      extra_env=gcs.env,
  )
  _assert_second_call_loads_all(calls)
