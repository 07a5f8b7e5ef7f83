"""Directories of samples for FID (`fid_samples`): chunks `samples_<start>.npz` (images uint8,
labels, indices) and a `manifest.json` that records how they were drawn, read back whole and
checked (a missing or wrong chunk is named, never silently scored)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from etils import epath

from monoformer_jax import paths

MANIFEST = "manifest.json"
# The sampling scheme of the chunks: 2 = labels from their own key stream, noise and prompts
# through monoformer_jax.sampling.classes (the images InferenceModel gives for that index).
SCHEME = 2


def chunk_path(out_dir: str, start: int) -> str:
  return os.path.join(out_dir, f"samples_{start:09d}.npz")


def chunk_indices(start: int, chunk: int, num_samples: int) -> np.ndarray:
  return np.arange(start, min(start + chunk, num_samples))


def read_manifest(out_dir: str) -> dict | None:
  path = epath.Path(out_dir) / MANIFEST
  if not path.exists():
    return None
  return json.loads(path.read_text())


# What makes two runs' samples different; num_samples may grow on resume, workdir may move.
_MUST_MATCH = ("scheme", "seed", "chunk", "use_ema", "step")


def check_and_write_manifest(out_dir: str, manifest: dict, must_match=_MUST_MATCH) -> None:
  """Refuses to resume a directory made with other settings (`must_match`: by default another
  seed / chunk / weights); records num_samples."""
  old = read_manifest(out_dir)
  if old is not None:
    changed = {k: (old.get(k), manifest[k]) for k in must_match if old.get(k) != manifest[k]}
    if changed:
      raise ValueError(
          f"{out_dir} holds samples made with other settings ("
          + ", ".join(f"{k}: {a!r} on disk, {b!r} now" for k, (a, b) in sorted(changed.items()))
          + "); use another --out_dir or the same settings"
      )
  if jax.process_index() == 0:
    paths.write_text_atomic(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))


def chunk_is_complete(path: str, expected: np.ndarray) -> bool:
  """Whether a chunk on disk holds exactly the expected indices (a run with a smaller
  num_samples leaves a short last chunk, which a larger one must redo)."""
  if not epath.Path(path).exists():
    return False
  with paths.load_npz(path) as z:
    return np.array_equal(z["indices"], expected)


def draw_missing_chunks(
    out_dir: str, num_samples: int, chunk: int, num_devices: int, draw, share: tuple[int, int] | None = None
) -> list[str]:
  """Draws and writes this process's missing chunks; returns the paths of all chunks.

  Chunk c (`chunk` consecutive indices) is this process's when c mod count = index (`share`:
  (index, count), default this JAX process's) and it is not complete on disk. `draw(indices,
  padded)` -> (uint8 images, labels) of `indices`, drawn as one batch of `padded` (the indices
  padded to a multiple of `num_devices` with the last one). A chunk is written last: on disk it
  is complete, or absent."""
  index, count = share or (jax.process_index(), jax.process_count())
  starts = list(range(0, num_samples, chunk))
  for c, start in enumerate(starts):
    path = chunk_path(out_dir, start)
    idx = chunk_indices(start, chunk, num_samples)
    if c % count != index or chunk_is_complete(path, idx):
      continue
    padded = np.concatenate([idx, np.full(((-len(idx)) % num_devices,), idx[-1])])
    images, labels = draw(idx, padded)
    paths.save_npz(path, images=images, labels=labels, indices=idx)
  return [chunk_path(out_dir, s) for s in starts]


def _span(indices: np.ndarray) -> str:
  return f"{indices[0]}..{indices[-1]}" if len(indices) else "none"


def load_samples(
    out_dir: str, num_samples: int | None = None, chunk: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """All samples 0..num_samples-1 of a sample directory, in index order: (images, labels).

  num_samples and chunk default to the directory's manifest. Every chunk of the run must be on
  disk and hold exactly its indices, so each index appears once; otherwise a ValueError names
  the missing chunks or the wrong ones (scoring an incomplete set would bias the FID silently).
  """
  if not epath.Path(out_dir).is_dir():
    raise FileNotFoundError(f"no such sample directory {out_dir}")
  manifest = read_manifest(out_dir) or {}
  num_samples = num_samples or manifest.get("num_samples")
  chunk = chunk or manifest.get("chunk")
  if not num_samples or not chunk:
    found = len(list(epath.Path(out_dir).glob("samples_*.npz")))
    raise ValueError(
        f"{out_dir}: no {MANIFEST} (found {found} samples_*.npz); pass num_samples "
        "and chunk to check the chunks against"
    )
  missing, wrong, parts = [], [], []
  for start in range(0, num_samples, chunk):
    path = chunk_path(out_dir, start)
    expected = chunk_indices(start, chunk, num_samples)
    if not epath.Path(path).exists():
      missing.append(f"{os.path.basename(path)} (samples {_span(expected)})")
      continue
    with paths.load_npz(path) as z:
      part = {k: z[k] for k in ("images", "labels", "indices")}
    if not np.array_equal(part["indices"], expected) or not (
        len(part["images"]) == len(part["labels"]) == len(expected)
    ):
      wrong.append(
          f"{os.path.basename(path)} holds samples {_span(part['indices'])} "
          f"({len(part['images'])} images), expected {_span(expected)}"
      )
    parts.append(part)
  if missing or wrong:
    problems = ([f"{len(missing)} missing chunk(s): " + ", ".join(missing)] if missing else []) + (
        [f"{len(wrong)} wrong chunk(s): " + "; ".join(wrong)] if wrong else []
    )
    raise ValueError(
        f"{out_dir}: incomplete samples for num_samples={num_samples}, chunk={chunk}: " + ". ".join(problems)
    )
  order = np.concatenate([p["indices"] for p in parts])
  assert np.array_equal(order, np.arange(num_samples))  # implied by the per-chunk check
  return (np.concatenate([p["images"] for p in parts]), np.concatenate([p["labels"] for p in parts]))
