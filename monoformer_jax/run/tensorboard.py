"""TensorBoard event files (tensorboardX) in a local folder or at any etils.epath path.

tensorboardX appends records to an open local file. Its own `gs://` writer needs
google-cloud-storage's client and its own credentials, and breaks on close when that is missing
(it needs credentials of its own). A bucket object cannot be appended to, so for a non-local log folder the event
file is kept in memory and the whole file is written as one object on every flush (tensorboardX
flushes every `flush_secs`, and on `flush()` / `close()`): a single-object write is atomic, so a
reader (TensorBoard, or a resumed run) sees an earlier complete file, never a torn one, and
nothing is written to the local disk. Event files are small (scalars, a few sample grids).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Optional

from etils import epath

from monoformer_jax import paths


class _EpathRecordFile:
  """The file object tensorboardX's RecordWriter writes to: bytes in memory, written out whole."""

  def __init__(self, path: str):
    self.path = epath.Path(path)
    self.buffer = io.BytesIO()
    self.written = 0  # bytes already in the object: a flush with nothing new writes nothing

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    if self.buffer.tell() != self.written:
      self.path.write_bytes(self.buffer.getvalue())
      self.written = self.buffer.tell()

  def close(self) -> None:
    self.flush()


class _EpathWriterFactory:
  """tensorboardX's writer-factory protocol (`record_writer.register_writer_factory`)."""

  def open(self, path: str) -> _EpathRecordFile:
    return _EpathRecordFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _register(logdir: str) -> None:
  """Routes tensorboardX's files under `logdir`'s scheme (e.g. `gs`) through epath (replacing
  tensorboardX's own writer for that scheme, in this process)."""
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel

  record_writer.register_writer_factory(logdir.split("://")[0], _EpathWriterFactory())


@contextlib.contextmanager
def _without_torch():
  """tensorboardX imports torch wherever it is installed (~7 s a process) only to accept torch
  tensors, and carries on without it: we log floats and NumPy arrays, so it is not offered."""
  if "torch" in sys.modules:  # already paid for
    yield
    return
  sys.modules["torch"] = None  # `import torch` raises ImportError while this stands
  try:
    yield
  finally:
    del sys.modules["torch"]


def has_events(logdir) -> bool:
  """Whether the folder `logdir` holds event files (of an earlier run in it)."""
  path = epath.Path(logdir)
  return path.is_dir() and any(p.name.startswith("events.") for p in path.iterdir())


def summary_writer(logdir, purge_step: Optional[int] = None, filename_suffix: str = ""):
  """A tensorboardX `SummaryWriter` writing event files into `logdir` (local or any epath path).

  `purge_step` as in tensorboardX: the new file starts with a SessionLog.START at that step,
  which makes TensorBoard hide earlier files' events from that step on. `filename_suffix` keeps
  a second writer opened within the same second (file names hold the time in seconds) from
  writing over the first one's file.
  """
  with _without_torch():
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel  # only on use

  logdir = os.fspath(logdir)
  if not paths.is_local(logdir):
    _register(logdir)
  return SummaryWriter(logdir, purge_step=purge_step, filename_suffix=filename_suffix)
