"""Test-wide settings: 8 fake CPU devices (sharding tests), strict rank promotion."""
import os

# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from monoformer_jax.host_memory import tune_for_xla_cpu  # noqa: E402

tune_for_xla_cpu()  # as every entry point does: XLA:CPU steps without page-fault storms

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

import pathlib  # noqa: E402

import pytest  # noqa: E402

TESTDATA = pathlib.Path(__file__).parent / "testdata"


@pytest.fixture(scope="session")
def testdata():
  return TESTDATA
