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

The file is hostile until proven otherwise, and memory stays bounded by its size: each pickle's
opcodes are walked (`_check_pickle`) before the C unpickler sees them, because that unpickler
allocates whatever sizes and memo indices a file declares; every size the pickle declares (a
storage's bytes, a tensor's elements) is checked against the bytes actually in the file before
anything is allocated; a zip member with an unsafe name ('../x', '/etc/x') is refused, though
nothing is ever extracted. A bad file raises ValueError (`UnsafeCheckpointError` is one too)
naming the file and the problem.

dtypes: float64/32/16, bfloat16 (as `ml_dtypes.bfloat16`, the dtype JAX uses; call
`.astype(np.float32)` where you want plain NumPy), int64/32/16/8, uint8, bool, complex64/128.
"""

from __future__ import annotations

import collections
import io
import json
import math
import os
import pickle
import pickletools
import re
import struct
import zipfile
from typing import Any, Callable, Mapping, Optional

import ml_dtypes
import numpy as np
from etils import epath

from monoformer_jax import paths


class UnsafeCheckpointError(pickle.UnpicklingError, ValueError):
  """The checkpoint's pickle asks for what a tensors-only reader never does: a global outside the
  allow list, an opcode torch.save does not write, state set on an allowed global.

  Also a ValueError, so callers that report bad input files (ValueError) report this one alike.
  """


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


def _refuse_state(obj, state):
  """`__setstate__` of everything the unpickler hands out: pickle's BUILD opcode calls it with
  file-chosen state; without it BUILD would set attributes, on objects shared across loads too."""
  del state
  raise UnsafeCheckpointError(f"refusing to set state on {obj!r} (BUILD on a global or a storage)")


class _StorageType:
  """Stands in for `torch.FloatStorage` & co.: only its dtype matters."""

  __slots__ = ("name", "dtype")
  __setstate__ = _refuse_state

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _StorageRef:
  """A `('storage', type, key, location, numel[, view])` persistent record, not yet read.

  `base_offset` is non-zero only for the legacy format's storage views (a slice of a root storage).
  """

  __slots__ = ("dtype", "key", "numel", "base_offset")
  __setstate__ = _refuse_state

  def __init__(self, dtype: np.dtype, key: str, numel: int, base_offset: int = 0):
    self.dtype, self.key, self.numel, self.base_offset = dtype, key, numel, base_offset

  def __repr__(self) -> str:
    return f"storage {self.key!r}"


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


class _Callable:
  """An allowed function or class as the unpickler sees it: calls go through, BUILD is refused.

  Handing out the function itself would let BUILD set its attributes (`__defaults__`, ...),
  changing how every later checkpoint in the process loads.
  """

  __slots__ = ("_fn", "_name")
  __setstate__ = _refuse_state

  def __init__(self, fn: Callable, name: str):
    self._fn, self._name = fn, name

  def __call__(self, *args):
    return self._fn(*args)

  def __repr__(self) -> str:
    return self._name


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _Callable(_rebuild_tensor_v2, "torch._utils._rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"): _Callable(_rebuild_parameter, "torch._utils._rebuild_parameter"),
    ("collections", "OrderedDict"): _Callable(collections.OrderedDict, "collections.OrderedDict"),
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}

# Opcodes that torch.save's pickles (protocol 2) and plain Python values use. Not here: INST, OBJ,
# NEWOBJ and NEWOBJ_EX (they instantiate classes; tensors and dicts come through REDUCE), EXT1/2/4
# (copyreg's extension registry) and protocol 5's out-of-band buffers.
_ALLOWED_OPCODES = frozenset(
    "PROTO FRAME STOP MARK POP POP_MARK DUP NONE NEWTRUE NEWFALSE INT BININT BININT1 BININT2 LONG LONG1 LONG4 "
    "FLOAT BINFLOAT STRING BINSTRING SHORT_BINSTRING UNICODE SHORT_BINUNICODE BINUNICODE BINUNICODE8 BINBYTES "
    "SHORT_BINBYTES BINBYTES8 BYTEARRAY8 EMPTY_LIST APPEND APPENDS LIST EMPTY_TUPLE TUPLE TUPLE1 TUPLE2 TUPLE3 "
    "EMPTY_DICT DICT SETITEM SETITEMS EMPTY_SET ADDITEMS FROZENSET PUT BINPUT LONG_BINPUT MEMOIZE GET BINGET "
    "LONG_BINGET GLOBAL STACK_GLOBAL REDUCE BUILD PERSID BINPERSID".split()
)
_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")
_MAX_PICKLE_LINE = 1 << 20  # protocol-0 text arguments (GLOBAL names, INT, UNICODE) end at a newline
_MAX_NESTING = 100  # state dicts nest a few levels; a deeper object is a crafted one


def _global_refusal(source: str, module: str, name: str) -> UnsafeCheckpointError:
  return UnsafeCheckpointError(
      f"{source}: refusing to load global '{module}.{name}': only tensors, dicts and "
      "plain Python values are allowed in a checkpoint read without torch"
  )


def _check_pickle(f, path: str, what: str) -> None:
  """Walks the opcodes of the pickle at `f`'s position to its STOP, without building anything.

  The C unpickler trusts what a file declares: a memo index of 2**28 makes it allocate and zero
  2 GB, a BINBYTES8 of 10**12 bytes makes it allocate 10**12 bytes before reading any. pickletools
  reads each argument from the bytes actually present (a length past the end is an error, not an
  allocation); here only `_ALLOWED_OPCODES` may appear, GLOBAL names must be allowed, and memo
  indices must come in the order a pickler writes them (0, 1, 2, ...).
  """
  memo_size = 0
  try:
    for opcode, arg, pos in pickletools.genops(f):
      name = opcode.name
      if name not in _ALLOWED_OPCODES:
        raise UnsafeCheckpointError(
            f"{path}: refusing pickle opcode {name} at byte {pos} of the {what}: torch.save never writes it"
        )
      if name == "GLOBAL":
        module, _, attr = arg.partition(" ")
        if (module, attr) not in _ALLOWED_GLOBALS:
          raise _global_refusal(path, module, attr)
      elif name in _MEMO_PUTS:
        if not 0 <= arg <= memo_size:
          raise UnsafeCheckpointError(
              f"{path}: memo index {arg} at byte {pos} of the {what} is out of sequence "
              f"(next would be {memo_size}); the unpickler would allocate memory for every index below it"
          )
        memo_size = max(memo_size, arg + 1)
      elif name == "MEMOIZE":
        memo_size += 1
  except UnsafeCheckpointError:
    raise
  except (ValueError, EOFError, struct.error, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: corrupt {what} ({type(e).__name__}: {e})") from e


class _BoundedReader:
  """A file seen up to byte `end`, for `_check_pickle`: a read never asks the file for more than is
  there (a buffered file allocates the size it is asked for), a line is at most _MAX_PICKLE_LINE."""

  def __init__(self, f, end: int):
    self._f, self._end = f, end

  def read(self, n: int = -1) -> bytes:
    left = max(0, self._end - self._f.tell())
    return self._f.read(left if n is None or n < 0 else min(n, left))

  def readline(self) -> bytes:
    return self._f.readline(max(0, min(_MAX_PICKLE_LINE, self._end - self._f.tell())))

  def tell(self) -> int:
    return self._f.tell()


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only `_ALLOWED_GLOBALS`; storages become `_StorageRef`s."""

  def __init__(self, file, source: str):
    super().__init__(file)
    self._source = source
    self.storages: dict[str, _StorageRef] = {}  # root key -> record (the legacy reader sizes them)

  def find_class(self, module, name):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except (KeyError, TypeError):  # TypeError: unhashable names from a crafted STACK_GLOBAL
      raise _global_refusal(self._source, module, name) from None

  def persistent_load(self, pid):
    # Zip format: 5 fields. Legacy format: a sixth, (view_key, offset, view_numel) or None.
    if (
        not isinstance(pid, tuple)
        or len(pid) not in (5, 6)
        or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType)
        or not isinstance(pid[2], (str, int))
        or type(pid[4]) is not int  # pylint: disable=unidiomatic-typecheck  # not bool, nor int subclasses
        or (len(pid) == 6 and pid[5] is not None and not (isinstance(pid[5], tuple) and len(pid[5]) == 3))
    ):
      # The record's type, not its repr: a crafted record can nest deeper than repr recurses.
      raise UnsafeCheckpointError(f"{self._source}: unexpected persistent record (a {type(pid).__name__})")
    _, storage_type, key, _location, numel = pid[:5]
    view = pid[5] if len(pid) == 6 else None
    base_offset = int(view[1]) if view else 0
    ref = _StorageRef(storage_type.dtype, str(key), int(numel), base_offset)
    self.storages.setdefault(ref.key, ref)
    return ref


def _is_unsafe_name(name: str) -> bool:
  """Absolute ('/x', 'C:x', '\\x') or climbing ('../x', 'a/../../x'): what an extractor could write
  outside its folder. torch.save writes '<name>/data.pkl', '<name>/data/0', ..."""
  return name.startswith("/") or "\\" in name or bool(re.match(r"[A-Za-z]:", name)) or ".." in name.split("/")


# Deflate cannot expand data more than 1032-fold: a member declaring more is lying about its size.
_MAX_DEFLATE_RATIO = 1032


def _check_members(archive: zipfile.ZipFile, path: str, file_size: int) -> dict[str, zipfile.ZipInfo]:
  """name -> ZipInfo, after checking every member's name and declared size.

  Nothing is ever extracted, but a member named '../x' or '/x' is never written by torch.save:
  the file was crafted, and is refused whole. A member's declared size must fit the bytes the
  archive holds (uncompressed) or could expand to (deflate), so reading it allocates no more.
  """
  members = {}
  for info in archive.infolist():
    name = info.filename
    if _is_unsafe_name(name):
      raise ValueError(
          f"{path}: unsafe member name {name!r} in the zip archive (absolute or with '..'); refusing the file"
      )
    if name in members:
      raise ValueError(f"{path}: member {name!r} appears twice in the zip archive")
    if info.compress_type == zipfile.ZIP_STORED:
      fits = info.file_size == info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
      fits = info.file_size <= _MAX_DEFLATE_RATIO * info.compress_size + 64
    else:
      raise ValueError(f"{path}: member {name!r} uses zip compression method {info.compress_type} (torch.save stores)")
    if not fits or info.header_offset + info.compress_size > file_size:
      raise ValueError(
          f"{path}: member {name!r} declares {info.file_size} bytes ({info.compress_size} stored), "
          f"more than the {file_size}-byte archive holds"
      )
    members[name] = info
  return members


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
  """The '<name>/' folder holding data.pkl (torch names it after the file, so it varies)."""
  pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
  if not pickles:
    if any(n.endswith("constants.pkl") for n in archive.namelist()):
      raise ValueError(f"{path}: a TorchScript archive (torch.jit.save), not a torch.save file")
    raise ValueError(f"{path}: zip archive without data.pkl; not a torch.save checkpoint")
  return pickles[0][: -len("data.pkl")]


def _zip_storage_bytes(archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], prefix: str, path: str):
  """(key, nbytes the pickle expects) -> bytes of `<prefix>data/<key>`, with the file and record
  named on failure; the member's size is checked before it is read."""

  def read(key: str, nbytes: int) -> bytes:
    name = f"{prefix}data/{key}"
    if name not in members:
      raise ValueError(f"{path}: missing storage record {name!r}")
    if members[name].file_size != nbytes:
      raise ValueError(f"{path}: storage {key!r} holds {members[name].file_size} bytes, the pickle expects {nbytes}")
    try:
      return archive.read(members[name])
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:
      raise ValueError(f"{path}: corrupt storage record {name!r} ({e})") from e

  return read


class _StorageReader:
  """Reads each storage once (through `read_bytes(key)`), checking its size against the pickle.

  A storage is dropped after the last tensor using it is copied out (`uses`), so peak memory is
  about the checkpoint's size plus its largest storage, not twice the checkpoint.
  """

  def __init__(self, read_bytes: Callable[[str, int], bytes], path: str, big_endian: bool, uses: collections.Counter):
    self._read_bytes, self._path, self._big, self._uses = read_bytes, path, big_endian, uses
    self._cache: dict[str, np.ndarray] = {}

  def storage(self, ref: _StorageRef) -> np.ndarray:
    if ref.key not in self._cache:
      name = f"storage {ref.key!r}"
      if ref.numel < 0:
        raise ValueError(f"{self._path}: {name} declares {ref.numel} elements")
      raw = self._read_bytes(ref.key, ref.numel * ref.dtype.itemsize)
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
    if len(size) != len(stride) or any(s < 0 for s in size + stride) or offset < 0 or len(size) > 64:
      raise ValueError(f"{self._path}: invalid tensor geometry size={str(size):.200} stride={str(stride):.200}")
    count = math.prod(size)
    if count > storage.size:
      # The copy would allocate more than the file holds: an expanded (stride 0) or crafted tensor.
      raise ValueError(
          f"{self._path}: tensor size={size} has {count} elements, more than its storage "
          f"{pending.storage.key!r} holds ({storage.size}); refusing to allocate it"
      )
    try:
      if count:
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
    except OverflowError as e:  # a stride or dimension beyond NumPy's index range
      raise ValueError(f"{self._path}: invalid tensor geometry size={size} stride={stride} ({e})") from e
    tensor = np.array(view, dtype=storage.dtype.newbyteorder("="), copy=True)
    self._uses[pending.storage.key] -= 1
    if self._uses[pending.storage.key] <= 0:
      self._cache.pop(pending.storage.key, None)
    return tensor


_CONTAINERS = (dict, list, tuple)
_INTERNAL = (_StorageRef, _StorageType, _Callable)


class _Walk:
  """Checks the unpickled object and counts each distinct tensor per storage (`uses`).

  A pickle's memo can share one list between many places (a list of two copies of a list of two
  copies ... is 2**60 paths in 60 small objects) or make a list contain itself: each object is
  visited once (`done`), a cycle (`active`: the objects being visited) or nesting beyond
  _MAX_NESTING is refused here, rather than found as a RecursionError or an endless copy later.
  """

  def __init__(self, path: str):
    self.path, self.uses = path, collections.Counter()
    self._done, self._active = set(), set()

  def visit(self, obj: Any, depth: int = 0, hashed: bool = False) -> None:
    """`hashed`: obj is (inside) a dict key or a set element, where no tensor can be converted."""
    if id(obj) in self._done:
      return
    if id(obj) in self._active:
      raise ValueError(f"{self.path}: a {type(obj).__name__} that contains itself; not a checkpoint")
    if depth > _MAX_NESTING:
      raise ValueError(f"{self.path}: objects nested more than {_MAX_NESTING} deep; not a checkpoint")
    if isinstance(obj, _INTERNAL) or (hashed and isinstance(obj, _PendingTensor)):
      raise ValueError(f"{self.path}: a bare {obj!r} in the checkpoint is unsupported; save tensors instead")
    if isinstance(obj, _PendingTensor):
      self.uses[obj.storage.key] += 1
    elif isinstance(obj, (*_CONTAINERS, set, frozenset)):
      self._active.add(id(obj))
      if isinstance(obj, dict):
        for key, value in dict.items(obj):
          self.visit(key, depth + 1, hashed=True)
          self.visit(value, depth + 1, hashed)
      else:
        for value in obj:
          self.visit(value, depth + 1, hashed or isinstance(obj, (set, frozenset)))
      self._active.discard(id(obj))
    self._done.add(id(obj))


def _materialize(obj: Any, reader: _StorageReader, done: dict) -> Any:
  """Tensors -> arrays, containers rebuilt; an object met again (memo sharing) is converted once
  (`done`: id -> result). Runs after `_Walk`, which refused cycles and deep nesting."""
  if not isinstance(obj, (_PendingTensor, *_CONTAINERS)):
    return obj
  if id(obj) not in done:
    if isinstance(obj, _PendingTensor):
      result = reader.tensor(obj)
    elif isinstance(obj, dict):
      # dict.items, not obj.items: BUILD may have set an instance attribute 'items' on an OrderedDict.
      result = type(obj)((k, _materialize(v, reader, done)) for k, v in dict.items(obj))
    else:
      result = type(obj)(_materialize(v, reader, done) for v in obj)
    done[id(obj)] = result
  return done[id(obj)]


def _tensors_to_arrays(obj: Any, reader_for: Callable[[collections.Counter], _StorageReader], path: str) -> Any:
  walk = _Walk(path)
  walk.visit(obj)
  return _materialize(obj, reader_for(walk.uses), {})


def _unpickle(data: bytes, path: str, what: str) -> tuple[Any, _RestrictedUnpickler]:
  """(object, unpickler) from the bytes of one pickle that `_check_pickle` has walked."""
  unpickler = _RestrictedUnpickler(io.BytesIO(data), path)
  try:
    return unpickler.load(), unpickler
  except UnsafeCheckpointError as e:
    if str(e).startswith(path):
      raise
    raise UnsafeCheckpointError(f"{path}: {e}") from e
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
    raise ValueError(f"{path}: corrupt {what} ({type(e).__name__}: {e})") from e
  except (MemoryError, RecursionError, OverflowError) as e:  # what the opcode walk did not foresee
    raise ValueError(f"{path}: refusing {what}: {type(e).__name__} while unpickling") from e


def _read_pickle(f, end: int, path: str, what: str) -> tuple[Any, _RestrictedUnpickler]:
  """The pickle at `f`'s position (which ends up after it), walked then unpickled from memory."""
  start = f.tell()
  _check_pickle(_BoundedReader(f, end), path, what)
  stop = f.tell()
  f.seek(start)
  return _unpickle(f.read(stop - start), path, what)


def _load_zip(path: str) -> Any:
  try:
    with epath.Path(path).open("rb") as raw:
      size = raw.seek(0, os.SEEK_END)
      raw.seek(0)
      with zipfile.ZipFile(raw) as archive:
        members = _check_members(archive, path, size)
        prefix = _archive_prefix(archive, path)
        big_endian = False
        if f"{prefix}byteorder" in members:
          with archive.open(members[f"{prefix}byteorder"]) as f:
            big_endian = f.read(16).strip() == b"big"
        data = archive.read(members[f"{prefix}data.pkl"])  # its size was checked against the file
        obj, _ = _read_pickle(io.BytesIO(data), len(data), path, "data.pkl")
        storage_bytes = _zip_storage_bytes(archive, members, prefix, path)
        return _tensors_to_arrays(obj, lambda uses: _StorageReader(storage_bytes, path, big_endian, uses), path)
  except (zipfile.BadZipFile, EOFError, struct.error, NotImplementedError) as e:
    raise ValueError(f"{path}: truncated or corrupt zip archive ({type(e).__name__}: {e})") from e


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _load_legacy(path: str) -> Any:
  """The pre-1.6 format: five pickles (magic, protocol, sys_info, object, storage keys), then
  each storage as an 8-byte element count followed by its raw bytes, in key order."""
  with epath.Path(path).open("rb") as f:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    if _read_pickle(f, size, path, "header")[0] != _LEGACY_MAGIC:
      raise ValueError(f"{path}: a pickle without torch's magic number; not a torch.save file")
    protocol = _read_pickle(f, size, path, "header")[0]
    if protocol != _LEGACY_PROTOCOL:
      raise ValueError(f"{path}: unsupported legacy PyTorch protocol {protocol!r:.100}")
    sys_info = _read_pickle(f, size, path, "header")[0]
    little = not isinstance(sys_info, dict) or dict.get(sys_info, "little_endian", True)
    obj, unpickler = _read_pickle(f, size, path, "object pickle")
    keys = _read_pickle(f, size, path, "storage key list")[0]
    if not isinstance(keys, list) or not all(isinstance(k, (str, int)) for k in keys):
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
  # Sizes were checked against the file while reading; the reader compares them with the pickle's.
  read = lambda key, nbytes: raw.pop(key)
  return _tensors_to_arrays(obj, lambda uses: _StorageReader(read, path, not little, uses), path)


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


def _check_safetensors_header(path: str) -> None:
  """The 8-byte header length must leave room for the header in the file (safetensors' own error,
  'header too large', names neither the length nor the file size)."""
  with epath.Path(path).open("rb") as f:
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    prefix = f.read(8)
  if len(prefix) < 8:
    raise ValueError(f"{path}: {size} bytes, too short for a safetensors file (8-byte header length first)")
  length = int.from_bytes(prefix, "little")
  if length > size - 8:
    raise ValueError(
        f"{path}: safetensors header length {length} is more than the {size - 8} bytes the file holds after it"
    )


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  import safetensors.numpy  # pylint: disable=import-outside-toplevel

  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"no such checkpoint file: {path!r}")
  _check_safetensors_header(path)
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
  except (ValueError, KeyError, TypeError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
    raise ValueError(f"{index_path}: not a sharded-checkpoint index ({type(e).__name__}: {e})") from e
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise ValueError(f"{index_path}: weight_map is not a {{tensor name: shard file name}} object")
  for shard in set(weight_map.values()):
    # Shards sit in the index's folder: '../x' or '/x' would have files from elsewhere read.
    if _is_unsafe_name(shard):
      raise ValueError(f"{index_path}: shard name {shard!r} points outside the index's folder")
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
