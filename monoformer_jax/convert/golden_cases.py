"""Reads the golden-vector format of the official code (see tests/testdata/model_*/README.txt).

A golden directory holds `config.json` (official field names), `model.safetensors` (official key
names) and `cases.npz`. This module turns the official inputs of one case (collated `input_ids`
with the `<image>` placeholder, NCHW latents) into our batch format, so the same rows go through our
model that went through the official one.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import load_file

from monoformer_jax.convert.monoformer_weights import state_dict_to_params
from monoformer_jax import batch as batch_lib
from monoformer_jax.model.config import ModelConfig, from_official_config

SPECIAL_ORDER = ("<s>", "</s>", "<PAD>", "<image>", "<|im_start|>", "<|im_end|>", "\\n")


def load_golden_dir(path: str) -> tuple[ModelConfig, dict, dict, dict]:
  """Returns (config, params, cases, special token ids) of a golden directory."""
  for name in ("config.json", "model.safetensors", "cases.npz"):
    if not os.path.exists(os.path.join(path, name)):
      raise FileNotFoundError(f"{path}: not a golden model directory (no {name})")
  with open(os.path.join(path, "config.json")) as f:
    official = json.load(f)
  config = from_official_config(official)
  params = state_dict_to_params(load_file(os.path.join(path, "model.safetensors")), config)
  with np.load(os.path.join(path, "cases.npz")) as z:
    cases = {k: z[k] for k in z.files}
  if "special_token_ids" not in cases:
    raise ValueError(f"{path}/cases.npz has no array 'special_token_ids'")
  ids = cases["special_token_ids"]
  if len(ids) != len(SPECIAL_ORDER):
    raise ValueError(
        f"special_token_ids has {len(ids)} entries, expected {len(SPECIAL_ORDER)} ({', '.join(SPECIAL_ORDER)})"
    )
  special = dict(zip(SPECIAL_ORDER, (int(i) for i in ids)))
  return config, params, cases, special


def case_names(cases: dict) -> list[str]:
  return [p for p in ("text", "train", "mixed", "cfg", "sample") if f"{p}_input_ids" in cases]


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.moveaxis(x, -3, -1))


def nhwc_to_nchw(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def build_batch(
    config: ModelConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    merged_len: int,
    special: dict,
    latents_nchw: np.ndarray | None,
    image_rows_train_lm: bool = False,
) -> dict:
  """Official collated rows -> our batch (one sample per row, right-padded to merged_len).

  Pads are dropped (the official merge removes them), the `<image>` placeholder becomes the
  optional t-token plus the image tokens. Text of rows that generate an image gets no LM loss
  (official: L_LM only over text rows).
  """
  b = input_ids.shape[0]
  shape = (config.image_height, config.image_width, config.image_channels)
  batch = batch_lib.empty_batch(b, merged_len, 1, shape)
  image_id = special["<image>"]
  for r in range(b):
    kept = [int(t) for t, keep in zip(input_ids[r], attention_mask[r]) if keep]
    builder = batch_lib.RowBuilder(batch, r, config.num_patches, config.has_t_token)
    if image_id in kept:
      i = kept.index(image_id)
      image = nchw_to_nhwc(latents_nchw[r]).astype(np.float32)
      pieces = [
          ("text", kept[:i], image_rows_train_lm),
          ("image", image, 0),
          ("text", kept[i + 1 :], image_rows_train_lm),
      ]
      pieces = [p for p in pieces if p[0] == "image" or len(p[1])]
    else:
      pieces = [("text", kept, True)]
    builder.add(pieces)
  # The official code numbers every merged position 0..L-1, pads included.
  batch["positions"] = np.broadcast_to(np.arange(merged_len, dtype=np.int32), (b, merged_len)).copy()
  return batch


def merged_length(config: ModelConfig, input_ids: np.ndarray, attention_mask: np.ndarray, special: dict) -> int:
  """Length of the official merged sequence: kept ids, the `<image>` placeholder expanded."""
  image_id = special["<image>"]
  extra = config.num_patches + int(config.has_t_token) - 1
  lengths = [int(m.sum()) + extra * int(image_id in ids[m.astype(bool)]) for ids, m in zip(input_ids, attention_mask)]
  return max(lengths)


def pad_rows(batch: dict, rows: int) -> dict:
  """Appends all-padding rows up to `rows` (rows never see each other, so outputs are unchanged)."""
  b, length = batch["tokens"].shape
  if rows == b:
    return batch
  extra = batch_lib.empty_batch(rows - b, length, batch["images"].shape[1], batch["images"].shape[2:])
  return {k: np.concatenate([v, extra[k]]) for k, v in batch.items()}


def merged_labels(
    batch: dict, labels: np.ndarray, attention_mask: np.ndarray, input_ids: np.ndarray, special: dict
) -> np.ndarray:
  """The official merged labels (B, L) from our batch layout: the collator label of every kept
  text token at the position our merge gave it, -100 on image tokens, the t-token and padding."""
  kinds, seg = batch["kinds"], batch["segment_ids"]
  out = np.full(kinds.shape, -100, np.int64)
  for r in range(labels.shape[0]):
    keep = attention_mask[r].astype(bool)
    text = input_ids[r][keep] != special["<image>"]
    row_labels = labels[r][keep][text]
    where = np.nonzero((kinds[r] == batch_lib.KIND_TEXT) & (seg[r] > 0))[0]
    if len(where) != len(row_labels):
      raise ValueError(f"row {r}: {len(row_labels)} kept text labels but {len(where)} text positions in the merged row")
    out[r, where] = row_labels
  return out


def image_spans(batch: dict) -> np.ndarray:
  """(B, 2) int64 [start, end) of each row's image tokens (the t-token excluded); -1 if none."""
  kinds = batch["kinds"]
  out = np.full((kinds.shape[0], 2), -1, np.int64)
  for r in range(kinds.shape[0]):
    pos = np.nonzero(kinds[r] == batch_lib.KIND_IMAGE)[0]
    if len(pos):
      out[r] = pos.min(), pos.max() + 1
  return out
