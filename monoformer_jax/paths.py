"""Paths a user gives (a local folder or anything etils.epath reads, `gs://` included) and the
few file operations whose local and bucket forms differ.

Every file the package reads or writes goes through `etils.epath`, so `gs://bucket/run` works
wherever a local folder does. What cannot be written the same way on both:

- Atomic replacement. Locally: write a temporary file, then `os.replace` it (a reader sees the
  old file or the whole new one). On a bucket there is no rename (epath's is a copy then a
  delete), but a single-object write is atomic: the object is written in one go instead.
- NumPy archives: `np.savez` / `np.load` want seekable files, so they go through bytes in memory.

A GCS emulator (fake-gcs-server, used by the tests) is reached through the standard
`STORAGE_EMULATOR_HOST` (and, for orbax's tensorstore, `TENSORSTORE_GCS_HTTP_URL` with
`GOOGLE_AUTH_TOKEN_FOR_TESTING`): see `_use_emulator`.
"""

from __future__ import annotations

import io
import os
import uuid
from typing import Union

import numpy as np
from etils import epath

PathLike = Union[str, os.PathLike]


def _use_emulator() -> None:
  """Points gcsfs at `STORAGE_EMULATOR_HOST`'s JSON API and nothing else, when it is set.

  gcsfs reads the variable itself, but its default file system (gcsfs 2026.x,
  `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`) first asks the gRPC Storage Control API for each bucket's
  layout; an emulator serves no gRPC, so every first access would wait out that call's 60 s
  timeout (or fail fast only when no credentials are found). The plain `GCSFileSystem` speaks
  only the JSON API. An emulator also takes no credentials: anonymous access skips the search
  for application default credentials and the GCE metadata server. Registered by class path,
  so gcsfs is imported only when a `gs://` path is first used.
  """
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if not host:
    return
  # ArrayRecord (TFDS latents) reads gs:// through google-cloud-cpp, whose emulator variable
  # this is.
  os.environ.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", host)
  import fsspec  # pylint: disable=import-outside-toplevel

  for protocol in ("gs", "gcs"):
    fsspec.register_implementation(protocol, "gcsfs.core.GCSFileSystem", clobber=True)
    fsspec.config.conf.setdefault(protocol, {}).setdefault("token", "anon")


_use_emulator()


def is_local(path: PathLike) -> bool:
  """Whether `path` names the local file system (no `scheme://` prefix)."""
  return "://" not in os.fspath(path)


def absolute(path: PathLike) -> str:
  """`path` with a local one made absolute (records of where a run lives; orbax's paths)."""
  path = os.fspath(path)
  return os.path.abspath(os.path.expanduser(path)) if is_local(path) else path


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` so that a reader (or a kill) never sees a half-written file."""
  path = epath.Path(path)
  if not is_local(path):
    path.write_bytes(data)  # one object write: atomic on GCS, where a rename is a copy + delete
    return
  # A unique temporary name: two processes writing the same file never share a temporary one.
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{uuid.uuid4().hex[:8]}")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def write_text_atomic(path: PathLike, text: str) -> None:
  write_bytes_atomic(path, text.encode("utf-8"))


def save_npz(path: PathLike, **arrays) -> None:
  """`np.savez(path, **arrays)`, written atomically (a killed writer leaves no partial file)."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  write_bytes_atomic(path, buf.getvalue())


def load_npz(path: PathLike, allow_pickle: bool = False):
  """`np.load` of a .npz at any epath path (use as a context manager, like np.load's NpzFile).

  A local archive is read member by member, as `np.load` does; a bucket object is read whole
  into memory first (zip reading seeks back and forth, one request per seek on a bucket).
  """
  if is_local(path):
    return np.load(os.fspath(path), allow_pickle=allow_pickle)
  return np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=allow_pickle)


def load_npy(path: PathLike, mmap: bool = False) -> np.ndarray:
  """`np.load` of a .npy; `mmap`: memory-mapped when the file is local (a bucket object is read)."""
  if mmap and is_local(path):
    return np.load(os.fspath(path), mmap_mode="r")
  return np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False)


def save_npy(path: PathLike, array: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, array)
  write_bytes_atomic(path, buf.getvalue())


def list_dir(path: PathLike) -> tuple[list[str], list[str]]:
  """(sub-folder names, file names) of the folder `path`, sorted: one listing request on a bucket,
  where asking each entry whether it is a folder would cost a request per entry."""
  for _, dirs, files in epath.Path(path).walk():
    return sorted(dirs), sorted(files)
  raise FileNotFoundError(f"{path}: no such folder")


def _tree_files(folder: epath.Path, relative: str = ""):
  """(path relative to the top, path) of every file under `folder`. iterdir, not walk: epath's
  walk on gcsfs yields folders without their gs:// scheme."""
  for child in folder.iterdir():
    name = f"{relative}{child.name}"
    if child.is_dir():
      yield from _tree_files(child, name + "/")
    else:
      yield name, child


def copy_tree(src: PathLike, dst: PathLike) -> None:
  """Copies the files under the folder `src` to the same relative paths under `dst` (any two
  file systems: the bytes go through this process)."""
  for relative, path in _tree_files(epath.Path(src)):
    target = epath.Path(dst) / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(path.read_bytes())


def move_tree(src: PathLike, dst: PathLike) -> None:
  """Moves the folder `src` to `dst` (which must not exist): one rename on a local disk; on a
  bucket, where folders are only name prefixes (epath's rename wants `dst`'s parent to exist as
  an object), each object is copied server-side and then `src` is deleted."""
  src, dst = epath.Path(src), epath.Path(dst)
  if is_local(src):
    src.rename(dst)
    return
  for relative, path in _tree_files(src):
    path.copy(dst / relative)
  src.rmtree()
