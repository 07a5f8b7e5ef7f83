"""The suite's own rules for random inputs: no unseeded generator anywhere in tests/, seeds derived
from test names, printed on failure, and a sweep mode that reruns seeded tests on other seeds."""

import os
import pathlib
import re
import subprocess
import sys
import textwrap

from tests import seeding

TESTS = pathlib.Path(__file__).parent

# Built from pieces, so that this file does not match its own patterns.
_CALL = r"\("
FORBIDDEN = [
    re.compile(r"default_rng" + _CALL + r"\)"),  # an unseeded Generator
    re.compile(r"np\.random\.(rand|randn|randint|normal|uniform)" + _CALL),  # NumPy's global state
    re.compile(
        r"(?<![\w.])random\.(Random" + _CALL + r"\)|(random|randint|randrange|choice"
        r"|choices|shuffle|sample|uniform|gauss)" + _CALL + ")"
    ),  # the stdlib's global one
    re.compile(r"os\.urandom" + _CALL),
    re.compile(r"torch\.(randn|rand|randint|normal)" + _CALL + r"(?![^\n]*generator=)"),
]


def test_no_unseeded_random_input_in_the_tests():
  found = []
  for path in sorted(TESTS.glob("*.py")):
    for number, line in enumerate(path.read_text().splitlines(), 1):
      for pattern in FORBIDDEN:
        if pattern.search(line):
          found.append(f"{path.name}:{number}: {line.strip()}")
  assert not found, "unseeded random inputs (use the `seed` / `rng` fixtures):\n" + "\n".join(found)


def test_the_patterns_catch_what_they_should():
  bad = [
      "x = np.random.default_rng(" + ")",
      "np.random." + "rand(3)",
      "random." + "randint(1, 4)",
      "random." + "Random()",
      "os." + "urandom(8)",
      "torch." + "randn(3, 2)",
  ]
  good = [
      "rng = np.random.default_rng(seed)",
      "rng.normal(size=3)",
      "random.Random(seed)",
      "jax.random.randint(key, (4,), 0, 9)",
      "torch.randn(3, generator=gen)",
  ]
  assert all(any(p.search(s) for p in FORBIDDEN) for s in bad)
  assert not any(p.search(s) for p in FORBIDDEN for s in good)


def test_seeds_are_stable_and_distinct():
  assert seeding.derive("tests/test_x.py::test_a", 0) == seeding.derive("tests/test_x.py::test_a", 0)
  seeds = {seeding.derive(f"tests/test_x.py::test_{i}", k) for i in range(50) for k in range(20)}
  assert len(seeds) == 1000 and all(0 <= s < 2**31 for s in seeds)
  assert seeding.base_name("t.py::f[a-seed3]") == "t.py::f[a]"
  assert seeding.base_name("t.py::f[seed12]") == "t.py::f"
  assert seeding.base_name("t.py::f[seed1-b]") == "t.py::f[b]"


def test_a_failure_names_its_seeds_and_the_sweep_reruns_them(tmp_path):
  """An inner pytest with this suite's conftest: the report of a failing seeded test names its
  seeds and the rerun option; --seed-sweep runs it on other seeds, module fixtures included."""
  (tmp_path / "test_inner.py").write_text(textwrap.dedent("""
      import pytest

      @pytest.fixture(scope="module")
      def data(module_seed):
        return module_seed("data")

      def test_fails(rng, data):
        print("module", data)
        assert rng.random() > 2.0
  """))
  root = TESTS.parent
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root))

  def run(*args):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_inner.py"),
            *args,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

  one = run()
  assert one.returncode == 1, one.stdout[-3000:]
  want = seeding.derive("test_inner.py::test_fails", 0)
  assert f"test: seed {want} (seed index 0)" in one.stdout, one.stdout[-3000:]
  assert "data: seed" in one.stdout and "--seed-offset=0" in one.stdout
  swept = run("--seed-sweep=3", "--seed-offset=5")
  assert "3 failed" in swept.stdout, swept.stdout[-3000:]
  for index in (5, 6, 7):
    assert f"--seed-offset={index}" in swept.stdout
    assert f"test: seed {seeding.derive('test_inner.py::test_fails', index)}" in swept.stdout
  modules = set(re.findall(r"module (\d+)", swept.stdout))
  assert len(modules) == 3, swept.stdout[-3000:]  # the module fixture was rebuilt per seed
