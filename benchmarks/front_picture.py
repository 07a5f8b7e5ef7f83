"""The README's front picture (docs/images/front.png), from the shipped weights: digits that
`pretrained:mnist_tiny` drew (a column per class 0-9, ROWS rows) and, beside them, a held-out
MNIST digit (one all_in_one never trained on) with what `pretrained:all_in_one` answers when asked
which digit it is.

    python benchmarks/front_picture.py [--out docs/images/front.png]

Deterministic (fixed seeds, the run's default sampler, greedy reading): the same PNG on every run. About
35 s on 2 CPU cores (AMD EPYC).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from monoformer_jax.host_memory import tune_for_xla_cpu  # noqa: E402

tune_for_xla_cpu()  # before JAX's first computation (see host_memory.py)

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from monoformer_jax.data import mnist  # noqa: E402
from monoformer_jax.inference import InferenceModel  # noqa: E402
from monoformer_jax.run.images import to_uint8  # noqa: E402

ROWS = 4
SEED = 0
READ_CLASS = 7  # the digit shown read: the first held-out one of this class
ZOOM, GAP, MARGIN = 2, 4, 24  # the grid's digits: 28 px drawn 56 px, 4 px apart
READ_ZOOM = 6  # the digit read: 168 px
INK, GREY, WHITE = (20, 20, 20), (110, 110, 110), (255, 255, 255)


def drawn_digits(model) -> np.ndarray:
  """uint8 (ROWS, 10, 28, 28): row r holds sample r of every class, in class order."""
  images, _ = model.sample_classes(list(model.class_names), ROWS, seed=SEED)
  pixels = to_uint8(model.decode(images))[..., 0]
  return pixels.reshape(10, ROWS, *pixels.shape[1:]).transpose(1, 0, 2, 3)


def held_out_digit() -> np.ndarray:
  """uint8 (28, 28, 1): the first held-out digit of READ_CLASS (the split the runs did not train on)."""
  digits, labels = mnist.load_mnist5k()
  _, held = mnist.split_indices(len(digits))
  return digits[held[labels[held] == READ_CLASS][0]]


def tile(pixels: np.ndarray, zoom: int) -> Image.Image:
  """A 28x28 digit as the model draws and reads it (white on black, as MNIST), `zoom` times larger."""
  img = Image.fromarray(pixels.reshape(pixels.shape[:2]))
  return img.resize((img.width * zoom, img.height * zoom), Image.NEAREST)


def centred(draw, x_mid, y, text, font, fill):
  width = draw.textlength(text, font=font)
  draw.text((x_mid - width / 2, y), text, font=font, fill=fill)


def compose(grid: np.ndarray, digit: np.ndarray, question: str, answer: str) -> Image.Image:
  name, note, answer_font = (ImageFont.load_default(size=s) for s in (20, 15, 22))
  cell = 28 * ZOOM + GAP
  grid_w, grid_h = 10 * cell - GAP, ROWS * cell - GAP
  titles = (("pretrained:mnist_tiny", "draws digits 0-9"), ("pretrained:all_in_one", "reads a held-out digit"))
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  read_w = int(max(28 * READ_ZOOM, probe.textlength(titles[1][0], font=name), probe.textlength(question, font=note)))
  top = MARGIN + 52  # under the titles
  width = MARGIN + grid_w + 2 * MARGIN + read_w + MARGIN
  height = top + 22 + max(grid_h, 28 * READ_ZOOM + 70) + MARGIN
  page = Image.new("RGB", (width, height), WHITE)
  draw = ImageDraw.Draw(page)
  x0 = MARGIN + grid_w + 2 * MARGIN  # the reading panel
  for x, (title, what) in zip((MARGIN, x0), titles):
    draw.text((x, MARGIN), title, font=name, fill=INK)
    draw.text((x, MARGIN + 26), what, font=note, fill=GREY)
  for k in range(10):  # the class above each column
    centred(draw, MARGIN + k * cell + 14 * ZOOM, top, str(k), note, GREY)
  for r in range(ROWS):
    for k in range(10):
      page.paste(tile(grid[r, k], ZOOM), (MARGIN + k * cell, top + 22 + r * cell))
  draw.line([(x0 - MARGIN, MARGIN), (x0 - MARGIN, height - MARGIN)], fill=(225, 225, 225), width=1)
  mid = x0 + read_w // 2
  page.paste(tile(digit, READ_ZOOM), (mid - 14 * READ_ZOOM, top + 22))
  below = top + 22 + 28 * READ_ZOOM + 12
  centred(draw, mid, below, question, note, GREY)
  centred(draw, mid, below + 24, f'"{answer.strip()}"', answer_font, INK)
  return page


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=os.path.join("docs", "images", "front.png"))
  args = p.parse_args()
  grid = drawn_digits(InferenceModel.from_workdir("pretrained:mnist_tiny"))
  reader = InferenceModel.from_workdir("pretrained:all_in_one")
  digit = held_out_digit()
  question = reader.run_config.data.understand_question
  (answer,) = reader.describe(digit[None], question)
  page = compose(grid, digit, question, answer)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  page.save(args.out, optimize=True)
  print(f"{args.out}: {page.width}x{page.height}; asked {question!r} about a held-out {READ_CLASS}: {answer!r}")


if __name__ == "__main__":
  main()
