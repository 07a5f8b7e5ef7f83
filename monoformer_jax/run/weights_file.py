"""A run's weights as one safetensors file (the weights-only export), written and read back sharded.

Keys are the parameter paths joined by '/' (`layers_0/attn/q_proj/kernel`); values keep the dtype
they were written in. Reading places every tensor straight onto its target sharding: each device
reads only the slice it holds (safetensors maps the file), cast to the asked dtype, so a model
larger than one device's memory opens across several.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from etils import epath
from safetensors import safe_open

from monoformer_jax import paths

SEPARATOR = "/"


def flatten(params) -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested dict of arrays."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    out[SEPARATOR.join(str(k.key) for k in path)] = leaf
  return out


def save_weights(path, params, dtype=None, metadata: dict | None = None) -> int:
  """Writes `params` (host or device arrays) to the safetensors file `path`, cast to `dtype`
  when given; returns the bytes of the tensors. The file appears whole or not at all."""
  arrays = {}
  for key, value in flatten(params).items():
    value = np.asarray(jax.device_get(value))
    arrays[key] = np.ascontiguousarray(value if dtype is None else value.astype(jnp.dtype(dtype)))
  meta = {"format": "monoformer_jax", **(metadata or {})}
  if paths.is_local(path):  # streamed to disk: no second copy of the weights in memory
    tmp = f"{path}.tmp"
    safetensors.numpy.save_file(arrays, tmp, metadata=meta)
    os.replace(tmp, path)
  else:
    paths.write_bytes_atomic(path, safetensors.numpy.save(arrays, metadata=meta))
  return sum(a.nbytes for a in arrays.values())


def load_weights(path, abstract_params):
  """The weights of `path` as device arrays with the shapes, dtypes and shardings of
  `abstract_params` (jax.ShapeDtypeStruct leaves with shardings). Missing, extra and misshapen
  tensors are named in one ValueError."""
  # safetensors maps local files; a bucket's file comes down once.
  source = path if paths.is_local(path) else epath.Path(path).read_bytes()
  wanted = flatten(abstract_params)
  with _open(source) as f:
    stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    problems = [
        f"{k}: file {stored.get(k, 'missing')} vs model {tuple(a.shape)}"
        for k, a in sorted(wanted.items())
        if stored.get(k) != tuple(a.shape)
    ]
    problems += [f"{k}: not in the model" for k in sorted(set(stored) - set(wanted))]
    if problems:
      raise ValueError(
          f"{path} holds a model of another shape than its config ({len(problems)} tensors differ: "
          + "; ".join(problems[:6])
          + ")"
      )
    placed = {k: _place(f.get_slice(k), a) for k, a in wanted.items()}
  leaves = [placed[k] for k in wanted]
  return jax.tree.unflatten(jax.tree.structure(abstract_params), leaves)


def _open(source):
  if isinstance(source, (bytes, bytearray)):
    return _InMemory(safetensors.numpy.load(bytes(source)))
  return safe_open(str(source), framework="numpy")


def _place(tensor, abstract):
  dtype = jnp.dtype(abstract.dtype)
  return jax.make_array_from_callback(
      tuple(abstract.shape), abstract.sharding, lambda index: np.asarray(tensor[index]).astype(dtype)
  )


class _InMemory:
  """safe_open's reading interface over tensors already in memory (a file from a bucket)."""

  def __init__(self, tensors: dict):
    self._tensors = tensors

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def keys(self):
    return list(self._tensors)

  def get_slice(self, key):
    return _Slice(self._tensors[key])


class _Slice:

  def __init__(self, array):
    self._array = array

  def get_shape(self):
    return list(self._array.shape)

  def __getitem__(self, index):
    return self._array[index]
