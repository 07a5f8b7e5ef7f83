"""The model's input format: per-token arrays with static shapes.

A batch is a dict of arrays. Every row is a sequence of length L (static) that can hold one sample or
several packed samples. Text tokens, generated-image tokens and (for the `add_before_image_tokens`
conditioning variant) one "t-token" per image are laid out in the row in the order the official code
builds its merged sequence:

    <s> prompt... <|im_start|> [t-token] <P image tokens> <|im_end|> \\n </s>

Keys (B rows, L positions, M image slots per row, P = patches per image):

  tokens       int32 (B, L)   text token ids; any value (use 0) at image / t-token / pad positions.
  segment_ids  int32 (B, L)   0 = padding, 1, 2, ... = which packed sample of the row a token belongs
                              to. Attention never crosses segments.
  positions    int32 (B, L)   RoPE position of the token inside its sample (0, 1, ...). The official
                              code numbers text, t-token and image tokens consecutively (1-D RoPE over
                              the whole merged sequence).
  kinds        int32 (B, L)   KIND_TEXT, KIND_IMAGE (a generated image's patch token: bidirectional
                              among the tokens of the same image), KIND_T_TOKEN or KIND_INPUT_IMAGE
                              (a token of an image the model reads: image understanding).
  patch_index  int32 (B, L)   for KIND_IMAGE: m * P + p, the flat index of the patch in the row's
                              M * P patches (m = image slot, p = raster patch index); for KIND_T_TOKEN:
                              m * P (so the image slot is patch_index // P); for KIND_INPUT_IMAGE:
                              k * Q + q (input slot k, its q-th of Q tokens); 0 elsewhere.
  images       float (B, M, H, W, C)  images / latents (NHWC). Clean x0 in data batches; the model
                              itself is fed noisy x_t through its `images` argument.
  image_mask   bool  (B, M)   the slot holds a real image (diffusion loss is taken on these only).
  labels       int32 (B, M)   class id per image slot (only for the optional DiT-style label
                              embedding; `num_classes` means "no label", the CFG null class).
  targets      int32 (B, L)   next-token target of each position (already shifted: the token that
                              follows this one in the same sample).
  loss_mask    float32 (B, L) 1 where `targets` is trained on (the LM loss), else 0.

Only in batches with input images (K input slots; their encoder turns each into Q tokens):

  input_images  float (B, K, H', W', C')  the images read, as the data gives them (pixels or
                              latents); the train step's encoder (vision/encoders.py) turns them
                              into `input_features` (B, K, Q, D) before the model sees the batch.
  input_mask    bool  (B, K)  the input slot holds a real image.

Helpers here build rows from simple host-side descriptions; the data pipelines use them.
"""

from __future__ import annotations

import numpy as np

KIND_TEXT = 0
KIND_IMAGE = 1
KIND_T_TOKEN = 2
KIND_INPUT_IMAGE = 3

SEQUENCE_KEYS = ("tokens", "segment_ids", "positions", "kinds", "patch_index", "targets", "loss_mask")
IMAGE_KEYS = ("images", "image_mask", "labels")
INPUT_KEYS = ("input_images", "input_mask")


def empty_batch(
    batch_size: int, seq_len: int, num_image_slots: int, image_shape, num_input_slots: int = 0, input_shape=()
) -> dict:
  """All-padding batch of the given static shapes (host NumPy); the input-image keys only with
  `num_input_slots` > 0."""
  b, l, m = batch_size, seq_len, num_image_slots
  inputs = {}
  if num_input_slots:
    inputs = {
        "input_images": np.zeros((b, num_input_slots, *input_shape), np.float32),
        "input_mask": np.zeros((b, num_input_slots), bool),
    }
  return inputs | {
      "tokens": np.zeros((b, l), np.int32),
      "segment_ids": np.zeros((b, l), np.int32),
      "positions": np.zeros((b, l), np.int32),
      "kinds": np.zeros((b, l), np.int32),
      "patch_index": np.zeros((b, l), np.int32),
      "targets": np.zeros((b, l), np.int32),
      "loss_mask": np.zeros((b, l), np.float32),
      "images": np.zeros((b, m, *image_shape), np.float32),
      "image_mask": np.zeros((b, m), bool),
      "labels": np.zeros((b, m), np.int32),
  }


class RowBuilder:
  """Appends samples to one row of a batch (host side, NumPy).

  A sample is a list of pieces: ("text", ids, train), ("image", image_array, label) (an image to
  generate) or ("input", image_array, None) (an image to read). Image pieces expand to an optional
  t-token plus `num_patches` image tokens, input pieces to `input_tokens` tokens. Positions restart
  at 0 for every sample and segment ids count samples from 1.
  """

  def __init__(self, batch: dict, row: int, num_patches: int, t_token: bool, input_tokens: int = 0):
    self.batch, self.row, self.num_patches, self.t_token = batch, row, num_patches, t_token
    self.input_tokens = input_tokens
    self.cursor = 0
    self.segment = 0
    self.image_slot = 0
    self.input_slot = 0

  @property
  def seq_len(self) -> int:
    return self.batch["tokens"].shape[1]

  def _piece_length(self, kind: str, value) -> int:
    if kind == "text":
      return len(value)
    if kind == "input":
      return self.input_tokens
    return self.num_patches + int(self.t_token)

  def sample_length(self, pieces) -> int:
    return sum(self._piece_length(kind, value) for kind, value, _ in pieces)

  def fits(self, pieces, num_images: int = 0) -> bool:
    slots = self.batch["image_mask"].shape[1]
    num_inputs = sum(1 for p in pieces if p[0] == "input")
    input_slots = self.batch["input_mask"].shape[1] if "input_mask" in self.batch else 0
    return (
        self.cursor + self.sample_length(pieces) <= self.seq_len
        and self.image_slot + num_images <= slots
        and self.input_slot + num_inputs <= input_slots
    )

  def add(self, pieces) -> None:
    """Appends one sample. Raises ValueError if it does not fit in the row."""
    num_images = sum(1 for p in pieces if p[0] == "image")
    if not self.fits(pieces, num_images):
      raise ValueError(
          f"sample of {self.sample_length(pieces)} tokens / {num_images} images does not fit in row "
          f"{self.row} (length {self.seq_len}, {self.cursor} used)"
      )
    b, r = self.batch, self.row
    self.segment += 1
    pos = 0
    # (position in row, token id or -1, train flag) of every text token, to derive targets.
    text_slots = []
    for kind, value, extra in pieces:
      if kind == "text":
        ids = np.asarray(value, np.int32)
        n = len(ids)
        sl = slice(self.cursor, self.cursor + n)
        b["tokens"][r, sl] = ids
        b["kinds"][r, sl] = KIND_TEXT
        for i in range(n):
          text_slots.append((self.cursor + i, int(ids[i]), bool(extra)))
      elif kind == "input":
        k = self.input_slot
        self.input_slot += 1
        b["input_images"][r, k] = value
        b["input_mask"][r, k] = True
        n = self.input_tokens
        sl = slice(self.cursor, self.cursor + n)
        b["kinds"][r, sl] = KIND_INPUT_IMAGE
        b["patch_index"][r, sl] = k * n + np.arange(n, dtype=np.int32)
        text_slots.append((None, -1, False))
      else:
        m = self.image_slot
        self.image_slot += 1
        b["images"][r, m] = value
        b["image_mask"][r, m] = True
        b["labels"][r, m] = int(extra) if extra is not None else 0
        n = self.num_patches + int(self.t_token)
        sl = slice(self.cursor, self.cursor + n)
        kinds = np.full((n,), KIND_IMAGE, np.int32)
        index = m * self.num_patches + np.arange(n, dtype=np.int32) - int(self.t_token)
        if self.t_token:
          kinds[0] = KIND_T_TOKEN
          index[0] = m * self.num_patches
        b["kinds"][r, sl] = kinds
        b["patch_index"][r, sl] = index
        text_slots.append((None, -1, False))  # an image breaks the next-token chain
      b["positions"][r, sl] = np.arange(pos, pos + n)
      b["segment_ids"][r, sl] = self.segment
      pos += n
      self.cursor += n
    # Next-token targets: a text token predicts the following text token of the same sample when
    # the two are adjacent in the sequence (no image in between) and the target token is trained.
    for (p0, _, _), (p1, t1, train1) in zip(text_slots[:-1], text_slots[1:]):
      if p0 is None or p1 is None or p1 != p0 + 1:
        continue
      b["targets"][r, p0] = t1
      b["loss_mask"][r, p0] = float(train1)
