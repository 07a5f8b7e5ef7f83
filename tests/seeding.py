"""Every random input of the tests comes from a seed derived from the test's name.

A test takes the `seed` fixture (an int) or `rng` (a NumPy Generator on that seed); a module-scoped
fixture takes `module_seed` and calls it with a label (`module_seed("params")`). The seed is a
hash of the test's (or module's) name and label with the *seed index*, 0 by default, so the suite
gives the same verdict on the same code every time, and a failure names the seeds it used (a
report section "seeds") with the option that reproduces it.

Checking a test on other inputs (the seed sweep, not run by CI):

    python -m pytest tests/test_fid.py --seed-sweep=200        # every seeded test, indices 0..199
    python -m pytest tests/test_x.py --seed-offset=7           # the whole file on index 7

`--seed-sweep=N` parametrizes every test that uses a seed (directly or through a module fixture)
over the indices offset .. offset+N-1 (ids `seedK`); module fixtures are rebuilt per index, and a
compiled function whose shapes do not change is compiled once for all of them.
"""

from __future__ import annotations

import re
import zlib

import numpy as np
import pytest

_SEEDS = pytest.StashKey[list]()
_SWEEP_ID = re.compile(r"-seed\d+(?=[\]-])|(?<=\[)seed\d+-|\[seed\d+\]")


def derive(name: str, index: int) -> int:
  """A 31-bit seed from a name and a seed index (stable across runs, platforms, processes)."""
  return int(np.random.SeedSequence([zlib.crc32(name.encode()), int(index)]).generate_state(1)[0] >> 1)


def base_name(nodeid: str) -> str:
  """The node id without the sweep's `seedK` parameter (so index 0 of a sweep is the plain run)."""
  return _SWEEP_ID.sub("", nodeid)


def record(node, label: str, seed: int, index: int) -> None:
  node.stash.setdefault(_SEEDS, []).append((label, seed, index))


def report_section(item) -> str | None:
  """The seeds a failed test used (its own and its module's fixtures'), and how to rerun them."""
  callspec = getattr(item, "callspec", None)
  index = (
      callspec.params["seed_index"]
      if callspec and "seed_index" in callspec.params
      else item.config.getoption("seed_offset")
  )
  used = {}
  for node in item.listchain():  # the module's fixtures, then the test's own
    used.update({label: seed for label, seed, i in node.stash.get(_SEEDS, []) if i == index})
  if not used:
    return None
  lines = [f"{label}: seed {seed} (seed index {index})" for label, seed in used.items()]
  lines.append(f"reproduce: python -m pytest '{base_name(item.nodeid)}' --seed-offset={index}")
  return "\n".join(lines)


def log_tolerances(path: str) -> None:
  """Wraps np.testing.assert_allclose to append, for every call, how much of its tolerance the
  worst element used (1.0 = at the limit) to `path` as JSON lines; `python -m tests.seeding
  PATH` summarises a sweep's log (worst use per assertion over every seed)."""
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  original = np.testing.assert_allclose

  def checked(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
    try:
      a = np.asarray(actual, np.float64)
      d = np.asarray(desired, np.float64)
      err = np.abs(a - d)
      allowed = atol + rtol * np.abs(d)
      finite = np.isfinite(err)
      used = float(np.max(np.where(finite, err / np.maximum(allowed, 1e-300), 0.0), initial=0.0))
      frame = sys._getframe(1)  # pylint: disable=protected-access
      test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
      with open(path, "a") as f:
        f.write(
            json.dumps(
                {
                    "test": base_name(test),
                    "sweep_id": test,
                    "where": f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}",
                    "used": used,
                    "max_abs": float(np.max(err, initial=0.0)),
                    "rtol": float(rtol),
                    "atol": float(atol),
                }
            )
            + "\n"
        )
    except Exception:  # pylint: disable=broad-except  # logging must never change a verdict
      pass
    return original(actual, desired, rtol, atol, *args, **kwargs)

  np.testing.assert_allclose = checked


def summarise(path: str) -> list[dict]:
  """Per assertion (test without its seed index, file:line): runs, worst use of the tolerance."""
  import json  # pylint: disable=import-outside-toplevel

  rows = {}
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      key = (r["test"], r["where"])
      row = rows.setdefault(
          key,
          {
              "test": r["test"],
              "where": r["where"],
              "calls": 0,
              "worst_used": 0.0,
              "worst_abs": 0.0,
              "rtol": r["rtol"],
              "atol": r["atol"],
          },
      )
      row["calls"] += 1
      if r["used"] >= row["worst_used"]:
        row.update(worst_used=r["used"], worst_abs=r["max_abs"], rtol=r["rtol"], atol=r["atol"])
  return sorted(rows.values(), key=lambda r: -r["worst_used"])


if __name__ == "__main__":
  import sys  # pylint: disable=import-outside-toplevel

  for row in summarise(sys.argv[1]):
    print(
        f"{row['worst_used']:8.3f}  {row['calls']:5d}  abs {row['worst_abs']:.3g}  "
        f"rtol {row['rtol']:.3g} atol {row['atol']:.3g}  {row['test']}  {row['where']}"
    )
