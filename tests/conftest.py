"""Test-wide settings: 8 fake CPU devices (sharding tests), strict rank promotion, seeds, and
compiles that cost less (tests/helpers_env.py: TEST_XLA_FLAGS, one compilation cache per session)."""

import os
import shutil
import tempfile

from tests.helpers_env import SESSION_CACHE_VAR, TEST_XLA_FLAGS

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from monoformer_jax.host_memory import tune_for_xla_cpu  # noqa: E402

tune_for_xla_cpu()  # as every entry point does: XLA:CPU steps without page-fault storms

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests import seeding  # noqa: E402

TESTDATA = pathlib.Path(__file__).parent / "testdata"
_OWNS_CACHE = pytest.StashKey[str]()
MIN_CACHED_COMPILE_S = 0.1


def pytest_addoption(parser):
  group = parser.getgroup("seeds", "random inputs (tests/seeding.py)")
  group.addoption(
      "--seed-offset", type=int, default=0, help="seed index of every seeded test (0: the suite's own inputs)"
  )
  group.addoption(
      "--seed-sweep", type=int, default=0, help="run every seeded test under N seed indices (offset .. offset+N-1)"
  )
  group.addoption(
      "--tolerance-log", default="", help="append how much of its tolerance every assert_allclose used to FILE"
  )


def pytest_configure(config):
  if config.getoption("tolerance_log"):
    seeding.log_tolerances(config.getoption("tolerance_log"))
  # One persistent XLA compilation cache for the session: the xdist workers and every subprocess
  # the tests start (they inherit the variable) compile a given program once. Made by the
  # controlling process (before it starts the workers), fresh every session, removed at the end.
  if not os.environ.get(SESSION_CACHE_VAR):
    os.environ[SESSION_CACHE_VAR] = tempfile.mkdtemp(prefix="monoformer_xla_cache_")
    config.stash[_OWNS_CACHE] = os.environ[SESSION_CACHE_VAR]
  # Programs that compile in over 0.1 s are kept: under the test flags a train step of the test
  # config compiles in 0.1-0.5 s (benchmarks/RESULTS.md, "Test suite").
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[SESSION_CACHE_VAR]
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(MIN_CACHED_COMPILE_S)
  jax.config.update("jax_compilation_cache_dir", os.environ[SESSION_CACHE_VAR])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_CACHED_COMPILE_S)


def pytest_unconfigure(config):
  if _OWNS_CACHE in config.stash:
    shutil.rmtree(config.stash[_OWNS_CACHE], ignore_errors=True)


def pytest_generate_tests(metafunc):
  sweep = metafunc.config.getoption("seed_sweep")
  if sweep and "seed_index" in metafunc.fixturenames:
    offset = metafunc.config.getoption("seed_offset")
    metafunc.parametrize(
        "seed_index", range(offset, offset + sweep), indirect=True, scope="module", ids=lambda i: f"seed{i}"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  outcome = yield
  report = outcome.get_result()
  if report.failed:
    section = seeding.report_section(item)
    if section:
      report.sections.append(("seeds", section))


@pytest.fixture(scope="module")
def seed_index(request):
  return getattr(request, "param", request.config.getoption("seed_offset"))


@pytest.fixture
def seed(request, seed_index):
  """This test's seed (see tests/seeding.py)."""
  value = seeding.derive(seeding.base_name(request.node.nodeid), seed_index)
  seeding.record(request.node, "test", value, seed_index)
  return value


@pytest.fixture
def rng(seed):
  return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def module_seed(request, seed_index):
  """module_seed(label) -> the seed of a module-scoped fixture's random input."""

  def get(label: str) -> int:
    value = seeding.derive(f"{request.node.nodeid}::{label}", seed_index)
    seeding.record(request.node, label, value, seed_index)
    return value

  return get


@pytest.fixture(scope="session")
def testdata():
  return TESTDATA
