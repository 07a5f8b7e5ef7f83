"""Pictures in and out of the demo page: a mouse drawing -> a digit as MNIST's look, and images ->
PNG data URLs the page shows.

MNIST's digits were scanned strokes scaled, with their aspect ratio kept, to fit a 20x20 box
(anti-aliased), then placed in the 28x28 field so that their centre of mass sits at its centre
(LeCun et al., "The MNIST database"). A drawing on the page's 280x280 canvas goes through the
same steps, so the model reads what it was trained on rather than a thin, off-centre stroke.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image

# MNIST's digit box inside its 28x28 field.
MNIST_FIELD, MNIST_BOX = 28, 20
# The drawings the page sends: a 280x280 canvas; anything much larger is refused unread.
MAX_DRAWING_SIDE = 1024
MAX_DATA_URL_CHARS = 4_000_000
# Pixels at or under this grey level (of 255) are background, not ink.
INK_THRESHOLD = 16
PNG_PREFIX = "data:image/png;base64,"


class DrawingError(ValueError):
  """A drawing that cannot be read (the reason in the message)."""


def decode_data_url(data_url) -> np.ndarray:
  """A PNG data URL (what a canvas's toDataURL() gives) -> grey levels (H, W) uint8, white ink on
  black; transparent pixels count as black."""
  if not isinstance(data_url, str) or not data_url.startswith(PNG_PREFIX):
    raise DrawingError("image: expected a PNG data URL (data:image/png;base64,...)")
  if len(data_url) > MAX_DATA_URL_CHARS:
    raise DrawingError(f"image: the data URL is over {MAX_DATA_URL_CHARS} characters")
  try:
    raw = base64.b64decode(data_url[len(PNG_PREFIX) :], validate=True)
    with Image.open(io.BytesIO(raw)) as image:
      if image.format != "PNG":
        raise DrawingError(f"image: not a PNG ({image.format})")
      if max(image.size) > MAX_DRAWING_SIDE:
        raise DrawingError(f"image: {image.size[0]}x{image.size[1]} is larger than {MAX_DRAWING_SIDE} a side")
      rgba = image.convert("RGBA")
  except (binascii.Error, OSError, Image.DecompressionBombError) as e:
    raise DrawingError(f"image: cannot read the PNG ({type(e).__name__}: {e})") from None
  pixels = np.asarray(rgba, np.float32)
  grey = pixels[..., :3].mean(axis=-1) * pixels[..., 3] / 255.0
  return np.round(grey).astype(np.uint8)


def mnist_style(grey: np.ndarray, shape=(MNIST_FIELD, MNIST_FIELD)) -> np.ndarray:
  """A drawing (H, W) uint8, white on black -> (shape[0], shape[1]) uint8 as MNIST digits look:
  the ink's bounding box scaled (aspect kept, anti-aliased) into the 20/28 box of the field,
  placed with its centre of mass at the field's centre (moved only as far as keeps it inside)."""
  grey = np.asarray(grey)
  rows, cols = np.nonzero(grey > INK_THRESHOLD)
  if rows.size == 0:
    raise DrawingError("the drawing is empty: draw a digit first")
  crop = grey[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
  height, width = shape
  box = max(1, round(min(height, width) * MNIST_BOX / MNIST_FIELD))
  scale = box / max(crop.shape)
  size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))  # PIL: (w, h)
  digit = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS), np.float32)
  mass = digit.sum()
  if mass <= 0:
    raise DrawingError("the drawing is too faint to read: draw with more ink")
  ys, xs = np.indices(digit.shape)
  centre_y, centre_x = (ys * digit).sum() / mass, (xs * digit).sum() / mass
  # MNIST's centre is pixel (14, 14) of 28 (its digits' mass centres, by pixel index, lie in
  # [13.5, 14.5]): pixel (H/2, W/2) here.
  top = int(np.clip(round(height / 2 - centre_y), 0, height - digit.shape[0]))
  left = int(np.clip(round(width / 2 - centre_x), 0, width - digit.shape[1]))
  field = np.zeros(shape, np.float32)
  field[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
  return np.clip(np.round(field), 0, 255).astype(np.uint8)


def png_data_url(image_hwc: np.ndarray, min_side: int = 112) -> str:
  """One uint8 image (H, W, 1 or 3) as a PNG data URL, enlarged by a whole factor with nearest
  neighbour (pixel art stays sharp) until its shorter side is at least `min_side`."""
  image = np.asarray(image_hwc)
  factor = max(1, -(-min_side // min(image.shape[:2])))
  image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
  return PNG_PREFIX + base64.b64encode(buf.getvalue()).decode("ascii")
