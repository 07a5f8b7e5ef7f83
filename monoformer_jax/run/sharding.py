"""Meshes and logical-axis sharding rules.

The model names every weight and main activation with logical axes; the config's rules map those
names onto the mesh axes ('data', 'fsdp', 'tensor'):
  * data:   pure data parallelism (parameters replicated),
  * fsdp:   data parallelism with parameters and optimizer state sharded (ZeRO-3 / FSDP),
  * tensor: Megatron-style model parallelism (attention heads and the MLP hidden dimension split).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None). Parameters shard 'embed' over fsdp and the head /
# hidden dimensions over tensor; activations shard the batch over data and fsdp.
DEFAULT_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("cond", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("patch", None),
    ("patch_out", None),
    ("freq", None),
    ("embed_out", None),
    ("classes", None),
)


def mesh_shape(spec: dict, num_devices: int) -> tuple[int, int, int]:
  """Resolves {'data': d, 'fsdp': f, 'tensor': t} with at most one -1 ('the rest')."""
  sizes = [int(spec[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices cannot be split into {dict(zip(MESH_AXES, sizes))}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, {num_devices} are available"
    )
  return tuple(sizes)


def make_mesh(spec: dict, devices: Sequence[Any] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(spec, len(devices))
  try:
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel

    grid = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except  # CPU / odd topologies: plain order
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def rules_from_config(rules) -> tuple:
  """Config rules (a list of [name, axis-or-list-or-None]) -> flax rules."""
  out = []
  for name, axes in rules:
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
    out.append((name, axes))
  return tuple(out)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    return mesh.shape[axes]
  return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh, name: str = "") -> PartitionSpec:
  """Drops mesh axes from dimensions they do not divide (those dimensions are replicated)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is not None and dim % _axis_size(mesh, axes):
      logging.info("sharding: %s dim %d not divisible by %s; replicated", name, dim, axes)
      axes = None
    fitted.append(axes)
  return PartitionSpec(*fitted)


def logical_shardings(boxed_abstract, mesh: Mesh, rules) -> Any:
  """NamedShardings for a pytree of boxed (LogicallyPartitioned) abstract values."""
  logical = nn.get_partition_spec(boxed_abstract)
  mesh_specs = nn.logical_to_mesh(logical, rules)
  values = nn.unbox(boxed_abstract)
  paths = jax.tree_util.tree_flatten_with_path(values)[0]
  flat_specs = jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  out = [
      NamedSharding(mesh, fit_spec(s, v.shape, mesh, jax.tree_util.keystr(p))) for (p, v), s in zip(paths, flat_specs)
  ]
  return jax.tree.unflatten(jax.tree.structure(values), out)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dimension over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Host-local numpy batch (this process's rows) -> global jax arrays sharded over the batch."""
  return {
      k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
      for k, v in local_batch.items()
  }
