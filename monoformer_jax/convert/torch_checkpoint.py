"""Read PyTorch and safetensors checkpoints into NumPy, without torch and without running file code.

    state = load_state_dict("diffusion_pytorch_model.safetensors")   # or .bin / .pth / .pt
    state = load_state_dict("TinyLlama/")                            # a directory, sharded or not
    state = load_state_dict("model.safetensors.index.json")          # shards merged
    state = load_torch_state_dict("ckpt.pth", key="ema")             # pick a sub-dict

`torch.save` (torch >= 1.6) writes a zip archive `<name>/data.pkl` + `<name>/data/<key>` (raw
storage bytes) + `<name>/byteorder`; older torch wrote a stream of pickles followed by the raw
storages (the "legacy" format, still used by e.g. pytorch-fid's Inception weights); both are
read. A pickle can call any importable function, so `data.pkl` is
read with an unpickler whose `find_class` answers only the handful of globals a tensor
state dict needs (`_ALLOWED_GLOBALS`) and raises `UnsafeCheckpointError` naming anything else:
nothing from the file is executed. Tensors come back as NumPy arrays, copied out of their storage
(views keep their own shape/stride/offset; storages shared by several views are read once).

dtypes: float64/32/16, bfloat16 (as `ml_dtypes.bfloat16`, the dtype JAX uses; call
`.astype(np.float32)` where you want plain NumPy), int64/32/16/8, uint8, bool, complex64/128.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import zipfile
from typing import Any, Callable, Mapping, Optional

import ml_dtypes
import numpy as np
from etils import epath

from monoformer_jax import paths


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The checkpoint's pickle asks for a global outside the tensors-only allow list."""


# Storage class name (as pickled by torch.save) -> NumPy dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}


class _StorageType:
  """Stands in for `torch.FloatStorage` & co.: only its dtype matters."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _StorageRef:
  """A `('storage', type, key, location, numel[, view])` persistent record, not yet read.

  `base_offset` is non-zero only for the legacy format's storage views (a slice of a root storage).
  """

  def __init__(self, dtype: np.dtype, key: str, numel: int, base_offset: int = 0):
    self.dtype, self.key, self.numel, self.base_offset = dtype, key, numel, base_offset


class _PendingTensor:
  """What `_rebuild_tensor_v2` returns while unpickling; turned into an array afterwards.

  Returning a plain class (rather than an ndarray) keeps pickle's BUILD opcode from reaching
  `ndarray.__setstate__` with attacker-chosen state.
  """

  def __init__(self, storage: _StorageRef, offset: int, size: tuple, stride: tuple):
    # int() here, inside the unpickler, so that junk geometry reads as a corrupt file.
    self.storage, self.offset = storage, offset
    self.size, self.stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)

  def __setstate__(self, state):
    raise UnsafeCheckpointError("refusing to set state on a tensor (tensor subclasses unsupported)")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # irrelevant for inference-time weights
  if not isinstance(storage, _StorageRef):
    raise UnsafeCheckpointError(f"tensor storage is a {type(storage).__name__}, not a record")
  return _PendingTensor(storage, int(storage_offset), size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):  # pylint: disable=keyword-arg-before-vararg  # torch's signature
  del requires_grad, backward_hooks, unused
  if not isinstance(data, _PendingTensor):
    raise UnsafeCheckpointError("nn.Parameter wraps something that is not a tensor")
  return data


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED_GLOBALS`; storages become `_StorageRef`s."""

  def __init__(self, file, source: str):
    super().__init__(file)
    self._source = source
    self.storages: dict[str, _StorageRef] = {}  # root key -> record (the legacy reader sizes them)

  def find_class(self, module, name):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise UnsafeCheckpointError(
          f"{self._source}: refusing to load global '{module}.{name}': only tensors, dicts and "
          "plain Python values are allowed in a checkpoint read without torch"
      ) from None

  def persistent_load(self, pid):
    # Zip format: 5 fields. Legacy format: a sixth, (view_key, offset, view_numel) or None.
    if (
        not isinstance(pid, tuple)
        or len(pid) not in (5, 6)
        or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType)
    ):
      raise UnsafeCheckpointError(f"{self._source}: unexpected persistent record {pid!r:.200}")
    _, storage_type, key, _location, numel = pid[:5]
    view = pid[5] if len(pid) == 6 else None
    base_offset = int(view[1]) if view else 0
    ref = _StorageRef(storage_type.dtype, str(key), int(numel), base_offset)
    self.storages.setdefault(ref.key, ref)
    return ref


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
  """The '<name>/' folder holding data.pkl (torch names it after the file, so it varies)."""
  pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
  if not pickles:
    if any(n.endswith("constants.pkl") for n in archive.namelist()):
      raise ValueError(f"{path}: a TorchScript archive (torch.jit.save), not a torch.save file")
    raise ValueError(f"{path}: zip archive without data.pkl; not a torch.save checkpoint")
  return pickles[0][: -len("data.pkl")]


def _zip_storage_bytes(archive: zipfile.ZipFile, prefix: str, path: str):
  """key -> bytes of `<prefix>data/<key>`, with the file and record named on failure."""

  def read(key: str) -> bytes:
    name = f"{prefix}data/{key}"
    try:
      return archive.read(name)
    except KeyError:
      raise ValueError(f"{path}: missing storage record {name!r}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise ValueError(f"{path}: corrupt storage record {name!r} ({e})") from e

  return read


class _StorageReader:
  """Reads each storage once (through `read_bytes(key)`), checking its size against the pickle.

  A storage is dropped after the last tensor using it is copied out (`uses`), so peak memory is
  about the checkpoint's size plus its largest storage, not twice the checkpoint.
  """

  def __init__(self, read_bytes: Callable[[str], bytes], path: str, big_endian: bool, uses: collections.Counter):
    self._read_bytes, self._path, self._big, self._uses = read_bytes, path, big_endian, uses
    self._cache: dict[str, np.ndarray] = {}

  def storage(self, ref: _StorageRef) -> np.ndarray:
    if ref.key not in self._cache:
      name = f"storage {ref.key!r}"
      raw = self._read_bytes(ref.key)
      dtype = ref.dtype.newbyteorder(">") if self._big and ref.dtype.itemsize > 1 else ref.dtype
      if len(raw) != ref.numel * dtype.itemsize:
        raise ValueError(
            f"{self._path}: {name} holds {len(raw)} bytes, the pickle expects {ref.numel} x {dtype.itemsize}"
        )
      self._cache[ref.key] = np.frombuffer(raw, dtype=dtype)
    return self._cache[ref.key]

  def tensor(self, pending: _PendingTensor) -> np.ndarray:
    storage = self.storage(pending.storage)
    size, stride = pending.size, pending.stride
    offset = pending.offset + pending.storage.base_offset
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or offset < 0:
      raise ValueError(f"{self._path}: invalid tensor geometry size={size} stride={stride}")
    if 0 not in size:
      # Bounds check before as_strided, which would otherwise read past the buffer.
      last = offset + sum((n - 1) * s for n, s in zip(size, stride))
      if last >= storage.size:
        raise ValueError(
            f"{self._path}: tensor size={size} stride={stride} offset={offset} "
            f"overruns storage {pending.storage.key!r} of {storage.size} elements"
        )
      view = np.lib.stride_tricks.as_strided(
          storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride], writeable=False
      )
    else:
      view = np.zeros(size, storage.dtype)
    tensor = np.array(view, dtype=storage.dtype.newbyteorder("="), copy=True)
    self._uses[pending.storage.key] -= 1
    if self._uses[pending.storage.key] <= 0:
      self._cache.pop(pending.storage.key, None)
    return tensor


def _count_storage_uses(obj: Any, uses: collections.Counter) -> collections.Counter:
  if isinstance(obj, _PendingTensor):
    uses[obj.storage.key] += 1
  elif isinstance(obj, dict):
    for value in obj.values():
      _count_storage_uses(value, uses)
  elif isinstance(obj, (list, tuple)):
    for value in obj:
      _count_storage_uses(value, uses)
  return uses


def _materialize(obj: Any, reader: _StorageReader) -> Any:
  if isinstance(obj, _PendingTensor):
    return reader.tensor(obj)
  if isinstance(obj, dict):
    return type(obj)((k, _materialize(v, reader)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialize(v, reader) for v in obj)
  if isinstance(obj, (_StorageRef, _StorageType)):
    raise ValueError("bare storages in a checkpoint are unsupported; save tensors instead")
  return obj


def _unpickle(f, path: str, what: str, unpickler: Optional[_RestrictedUnpickler] = None) -> Any:
  try:
    return (unpickler or _RestrictedUnpickler(f, path)).load()
  except UnsafeCheckpointError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
    raise ValueError(f"{path}: corrupt {what} ({type(e).__name__}: {e})") from e


def _load_zip(path: str) -> Any:
  try:
    with epath.Path(path).open("rb") as raw, zipfile.ZipFile(raw) as archive:
      prefix = _archive_prefix(archive, path)
      names = set(archive.namelist())
      big_endian = f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() == b"big"
      with archive.open(f"{prefix}data.pkl") as f:
        obj = _unpickle(f, path, "data.pkl")
      reader = _StorageReader(
          _zip_storage_bytes(archive, prefix, path), path, big_endian, _count_storage_uses(obj, collections.Counter())
      )
      return _materialize(obj, reader)
  except zipfile.BadZipFile as e:
    raise ValueError(f"{path}: truncated or corrupt zip archive ({e})") from e


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _load_legacy(path: str) -> Any:
  """The pre-1.6 format: five pickles (magic, protocol, sys_info, object, storage keys), then
  each storage as an 8-byte element count followed by its raw bytes, in key order."""
  with epath.Path(path).open("rb") as f:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if _unpickle(f, path, "header") != _LEGACY_MAGIC:
      raise ValueError(f"{path}: a pickle without torch's magic number; not a torch.save file")
    protocol = _unpickle(f, path, "header")
    if protocol != _LEGACY_PROTOCOL:
      raise ValueError(f"{path}: unsupported legacy PyTorch protocol {protocol!r}")
    sys_info = _unpickle(f, path, "header")
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    unpickler = _RestrictedUnpickler(f, path)
    obj = _unpickle(f, path, "object pickle", unpickler)
    keys = _unpickle(f, path, "storage key list")
    if not isinstance(keys, list):
      raise ValueError(f"{path}: corrupt storage key list")
    remaining = size - f.tell()
    raw = {}
    for key in map(str, keys):
      if key not in unpickler.storages:
        raise ValueError(f"{path}: storage {key!r} listed but never used by a tensor")
      header = f.read(8)
      numel = int.from_bytes(header, "little" if little else "big")
      nbytes = numel * unpickler.storages[key].dtype.itemsize
      remaining -= 8 + nbytes
      if len(header) < 8 or remaining < 0:  # checked before reading: numel may be garbage
        raise ValueError(f"{path}: truncated; storage {key!r} runs past the end of the file")
      raw[key] = f.read(nbytes)
  missing = sorted(set(unpickler.storages) - set(raw))
  if missing:
    raise ValueError(f"{path}: missing storage record(s) {missing[:5]}")
  reader = _StorageReader(raw.pop, path, not little, _count_storage_uses(obj, collections.Counter()))
  return _materialize(obj, reader)


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
  """The whole object `torch.save` wrote, with tensors as NumPy arrays (nested dicts kept).

  Reads the zip format (torch >= 1.6) and the legacy pickle-stream format (older torch, or
  `_use_new_zipfile_serialization=False`); the pre-0.4 tar format is refused.
  """
  path = os.fspath(path)
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"no such checkpoint file: {path!r}")
  with epath.Path(path).open("rb") as f:
    is_zip = zipfile.is_zipfile(f)
  if is_zip:
    return _load_zip(path)
  with epath.Path(path).open("rb") as f:
    head = f.read(512)
  if head.startswith(b"PK"):
    raise ValueError(f"{path}: truncated or corrupt zip archive (no central directory)")
  if head[:1] == b"\x80":
    return _load_legacy(path)
  if head[257:262] == b"ustar":
    raise ValueError(
        f"{path}: unsupported legacy tar-format PyTorch checkpoint (torch < 0.4); "
        "re-save it with torch.save(torch.load(path), new_path) under torch >= 1.6"
    )
  raise ValueError(f"{path}: not a PyTorch checkpoint (starts with {head[:4]!r})")


# Checked in order when a checkpoint wraps its weights (training scripts, Lightning, EMA copies).
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "ema")


def flatten_state_dict(tree: Mapping, sep: str = ".") -> dict[str, np.ndarray]:
  """Nested dicts of arrays -> {'a.b.c': array}; non-array leaves (epochs, configs) are dropped."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, np.ndarray):
      flat[str(key)] = value
    elif isinstance(value, Mapping):
      flat.update({f"{key}{sep}{k}": v for k, v in flatten_state_dict(value, sep).items()})
  return flat


def load_torch_state_dict(path: str | os.PathLike, key: Optional[str] = None) -> dict[str, np.ndarray]:
  """A flat {name: array} state dict from a torch.save file.

  `key` picks a sub-dict (dotted for nesting, e.g. "checkpoint.ema"). Without it, a top-level
  dict holding no arrays but one of `_WRAPPER_KEYS` ("state_dict", "model", ...) is unwrapped;
  whatever remains is flattened with '.'-joined names.
  """
  obj = load_torch_checkpoint(path)
  if key is not None:
    for part in key.split("."):
      if not isinstance(obj, Mapping) or part not in obj:
        raise KeyError(f"{os.fspath(path)}: no {part!r} in the checkpoint (looking up {key!r})")
      obj = obj[part]
  while isinstance(obj, Mapping) and not any(isinstance(v, np.ndarray) for v in obj.values()):
    wrapper = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if wrapper is None:
      break
    obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{os.fspath(path)}: holds a {type(obj).__name__}, not a dict of tensors")
  return flatten_state_dict(obj)


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  import safetensors.numpy  # pylint: disable=import-outside-toplevel

  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"no such checkpoint file: {path!r}")
  try:
    if paths.is_local(path):
      return dict(safetensors.numpy.load_file(path))
    return dict(safetensors.numpy.load(epath.Path(path).read_bytes()))  # safetensors reads local files only
  except Exception as e:  # safetensors raises its own SafetensorError for bad headers/sizes
    raise ValueError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from e


def _load_index(index_path: str) -> dict[str, np.ndarray]:
  """Merges the shards named by a `*.index.json` weight_map, checking every key is found."""
  try:
    weight_map = json.loads(epath.Path(index_path).read_text())["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{index_path}: not a sharded-checkpoint index ({e!r})") from e
  folder = os.path.dirname(index_path)
  merged: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = os.path.join(folder, shard)
    if not epath.Path(shard_path).is_file():
      raise FileNotFoundError(f"{index_path}: shard {shard!r} not found in {folder!r}")
    for name, value in _load_single_file(shard_path).items():
      if name in merged:
        raise ValueError(f"{index_path}: tensor {name!r} appears in more than one shard")
      merged[name] = value
  missing = sorted(k for k in weight_map if k not in merged)
  if missing:
    raise ValueError(
        f"{index_path}: tensors listed in the index but absent from their shards: "
        f"{missing[:5]}{' ...' if len(missing) > 5 else ''}"
    )
  return merged


def _load_single_file(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".index.json"):
    return _load_index(path)
  if path.endswith(".safetensors"):
    return _load_safetensors(path)
  if path.endswith((".bin", ".pth", ".pt", ".ckpt")):
    return load_torch_state_dict(path)
  raise ValueError(
      f"{path}: unknown checkpoint extension (want .safetensors, .bin, .pth, .pt, "
      ".ckpt, *.index.json or a directory)"
  )


# Well-known single-file names, best first; a directory is searched in this order.
_KNOWN_FILES = (
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin",
)
_FALLBACK_PATTERNS = ("*.safetensors.index.json", "*.safetensors", "*.bin.index.json", "*.bin", "*.pth", "*.pt")


def _pick_in_directory(folder: str) -> str:
  for name in _KNOWN_FILES:
    if epath.Path(folder, name).is_file():
      return os.path.join(folder, name)
  for pattern in _FALLBACK_PATTERNS:
    found = sorted(os.path.join(folder, p.name) for p in epath.Path(folder).glob(pattern))
    if len(found) == 1:
      return found[0]
    if len(found) > 1:
      raise ValueError(
          f"{folder}: several {pattern} files and no index to say which to load: "
          f"{[os.path.basename(p) for p in found]}; pass one file"
      )
  raise FileNotFoundError(f"{folder}: no checkpoint (.safetensors, .bin, .pth, .pt or index json)")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A flat {name: array} dict from a file (.safetensors/.bin/.pth/.pt/index json) or directory."""
  path = os.fspath(path)
  if epath.Path(path).is_dir():
    path = _pick_in_directory(path)
  elif not epath.Path(path).exists():
    raise FileNotFoundError(f"no such checkpoint file or directory: {path!r}")
  return _load_single_file(path)
