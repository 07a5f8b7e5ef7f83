"""A persistent XLA compilation cache for the command-line entry points.

Each process compiles its programs afresh: the first 26 steps of the embedded default's
`all_in_one` job take 38 s, of which ~24 s are compiles; a `sample` call takes ~7 s, ~3 of them
compiling (2 cores, benchmarks/RESULTS.md). JAX can keep compiled executables on disk, keyed by
the program, its shardings, the backend, the XLA flags and the versions of jax and jaxlib, so a
second run with the same shapes (a resume after preemption, the next `sample` or `evaluate`
call) loads them instead: 15 s instead of 38 s, 3.7 s instead of 6.7 s. XLA:CPU checks the
instruction set an entry was compiled for on loading and recompiles on a mismatch, so one cache
may be shared by machines with different CPUs.

Where (`MONOFORMER_COMPILATION_CACHE`):
  unset        the user's own JAX cache if one is set (`jax_compilation_cache_dir` or
               `JAX_COMPILATION_CACHE_DIR`), else `$XDG_CACHE_HOME/monoformer_jax/xla`
               (`~/.cache/monoformer_jax/xla`);
  a path       that folder, local or a bucket (`gs://...`, through etils.epath);
  off          none from us (a cache the user set for JAX stays theirs).
Programs that compile in under a second are not stored (JAX's default threshold). The cache is
never a reason to fail: a folder that cannot be made is one warning, and the run compiles as
usual; so is an entry XLA:CPU will not load (on some AVX-512 CPUs jax 0.10 refuses every entry
with an "XLA:CPU AOT result ... machine feature" log line, jax-ml/jax#38445: `off` quiets it).
Benchmarks do not call this (they time compiles).
"""

from __future__ import annotations

import os
import warnings
from typing import Mapping, Optional

import jax
from etils import epath

from monoformer_jax import paths

ENV_VAR = "MONOFORMER_COMPILATION_CACHE"


def default_cache_dir(environ: Mapping[str, str]) -> str:
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "monoformer_jax", "xla")


def resolve_cache_dir(environ: Mapping[str, str], jax_cache_dir: Optional[str]) -> Optional[str]:
  """The folder to cache in (None: none), from the environment and JAX's own setting."""
  setting = environ.get(ENV_VAR, "").strip()
  if setting.lower() == "off":
    return None
  return setting or jax_cache_dir or environ.get("JAX_COMPILATION_CACHE_DIR") or default_cache_dir(environ)


def enable_compilation_cache() -> Optional[str]:
  """Points JAX's persistent compilation cache at the folder the module doc describes; returns
  it, or None (turned off, or the folder could not be made). Call it before the first compile."""
  path = resolve_cache_dir(os.environ, jax.config.jax_compilation_cache_dir)
  if path is None:
    return None
  path = paths.absolute(path)  # `~/...` and relative folders as the user meant them
  try:
    epath.Path(path).mkdir(parents=True, exist_ok=True)
  except OSError as e:  # a read-only home, a bucket out of reach: compile as usual
    warnings.warn(f"compilation cache {path!r} is unusable ({e}); compiling without it ({ENV_VAR}=off hides this)")
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  return path
