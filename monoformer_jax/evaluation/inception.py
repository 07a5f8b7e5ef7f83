"""The FID Inception-v3 in Flax Linen (NHWC).

This is the network the standard FID code uses (TensorFlow's 2015-12-05 Inception graph, as ported to
PyTorch by `pytorch-fid`), not torchvision's ImageNet Inception-v3. It differs from the latter in:
  * the average-pool branches of the A, C and first E blocks ignore padded zeros
    (`count_include_pad=False`, TensorFlow's pooling semantics);
  * the last E block (`Mixed_7c`) pools its pool branch with a 3x3 *max* pool;
  * the classifier has 1008 outputs (the 2015 graph's label space).
Input images of any size are resized to 299x299 with bilinear interpolation using half-pixel centres
and edge clamping (PyTorch's `F.interpolate(mode='bilinear', align_corners=False)`, no antialiasing),
then mapped from [0, 1] to [-1, 1].

Parameter names follow the PyTorch module names (`Mixed_5b/branch1x1/conv/kernel`, ...) so that
`inception_convert` is a plain renaming plus transposes. Batch-norm statistics live in the
`batch_stats` collection; the model always runs batch norm in inference mode.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008  # pt_inception-2015-12-05 keeps TF's 1008-way classifier.
BN_EPSILON = 1e-3


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 matrix M with resized = M @ signal, as align_corners=False bilinear.

  Output pixel i samples the source at (i + 0.5) * in/out - 0.5, clamped below at 0; its neighbours
  are floor(src) and min(floor(src) + 1, in - 1). No antialiasing, so downsampling skips pixels
  exactly as the reference does. The coordinate arithmetic reproduces PyTorch's CPU kernel bit for
  bit: a float32 scale, the source coordinate rounded to float32 once (a fused multiply-add), and
  float32 weights. Plain float64 coordinates would differ from it by up to ~1e-4 of a pixel step.
  """
  scale = np.float64(np.float32(in_size) / np.float32(out_size))
  src = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0.0))
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo.astype(np.float32)
  matrix = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lo), np.float32(1.0) - frac)
  np.add.at(matrix, (rows, hi), frac)
  return matrix


def preprocess(images: jax.Array, resize: bool = True) -> jax.Array:
  """uint8 [0, 255] or float [0, 1] NHWC images -> float32 NHWC in [-1, 1], 299x299 if resize."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / 255.0
  else:
    x = images.astype(jnp.float32)
  _, height, width, _ = images.shape
  if resize and (height, width) != (INPUT_SIZE, INPUT_SIZE):
    # Separable resize as two small matmuls: static matrices, exact reference arithmetic.
    rows = jnp.asarray(bilinear_resize_matrix(height, INPUT_SIZE))
    cols = jnp.asarray(bilinear_resize_matrix(width, INPUT_SIZE))
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=hi)
    x = jnp.einsum("pw,nowc->nopc", cols, x, precision=hi)
  return 2.0 * x - 1.0


def _pad(padding: int | tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  return ((ph, ph), (pw, pw))


class BasicConv(nn.Module):
  """Conv (no bias) -> batch norm (inference, eps 1e-3) -> ReLU."""

  features: int
  kernel: tuple[int, int] = (1, 1)
  stride: int = 1
  padding: int | tuple[int, int] = 0
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(
        self.features,
        self.kernel,
        strides=(self.stride, self.stride),
        padding=_pad(self.padding),
        use_bias=False,
        precision=self.precision,
        name="conv",
    )(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x):
  # TensorFlow semantics: padded zeros do not count in the average.
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int, pad: int = 0):
  return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda name, *a, **k: BasicConv(*a, precision=self.precision, name=name, **k)
    b1 = conv("branch1x1", 64)(x)
    b5 = conv("branch5x5_1", 48)(x)
    b5 = conv("branch5x5_2", 64, (5, 5), padding=2)(b5)
    b3 = conv("branch3x3dbl_1", 64)(x)
    b3 = conv("branch3x3dbl_2", 96, (3, 3), padding=1)(b3)
    b3 = conv("branch3x3dbl_3", 96, (3, 3), padding=1)(b3)
    bp = conv("branch_pool", self.pool_features)(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17 (Mixed_6a); identical in the FID and torchvision variants."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda name, *a, **k: BasicConv(*a, precision=self.precision, name=name, **k)
    b3 = conv("branch3x3", 384, (3, 3), stride=2)(x)
    bd = conv("branch3x3dbl_1", 64)(x)
    bd = conv("branch3x3dbl_2", 96, (3, 3), padding=1)(bd)
    bd = conv("branch3x3dbl_3", 96, (3, 3), stride=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda name, *a, **k: BasicConv(*a, precision=self.precision, name=name, **k)
    c7 = self.channels_7x7
    b1 = conv("branch1x1", 192)(x)
    b7 = conv("branch7x7_1", c7)(x)
    b7 = conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
    b7 = conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
    bd = conv("branch7x7dbl_1", c7)(x)
    bd = conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
    bd = conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
    bd = conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
    bd = conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
    bp = conv("branch_pool", 192)(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8 (Mixed_7a)."""

  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda name, *a, **k: BasicConv(*a, precision=self.precision, name=name, **k)
    b3 = conv("branch3x3_1", 192)(x)
    b3 = conv("branch3x3_2", 320, (3, 3), stride=2)(b3)
    b7 = conv("branch7x7x3_1", 192)(x)
    b7 = conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = conv("branch7x7x3_4", 192, (3, 3), stride=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (average pool branch, pads excluded) and Mixed_7c (`max_pool=True`)."""

  max_pool: bool = False
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda name, *a, **k: BasicConv(*a, precision=self.precision, name=name, **k)
    b1 = conv("branch1x1", 320)(x)
    b3 = conv("branch3x3_1", 384)(x)
    b3 = jnp.concatenate(
        [conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3), conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)],
        axis=-1,
    )
    bd = conv("branch3x3dbl_1", 448)(x)
    bd = conv("branch3x3dbl_2", 384, (3, 3), padding=1)(bd)
    bd = jnp.concatenate(
        [
            conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
            conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd),
        ],
        axis=-1,
    )
    # The FID graph max-pools here in its last block (a quirk of that graph; kept for parity).
    pooled = _max_pool_3x3(x, 1, pad=1) if self.max_pool else _avg_pool_3x3_same(x)
    bp = conv("branch_pool", 192)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """Returns {'pool': (N, 2048) float32, 'logits': (N, num_classes) float32}.

  `images`: (N, H, W, 3), uint8 in [0, 255] or float in [0, 1]. With `resize_input` (the default, as in
  the standard FID code) any H, W is resized to 299x299 first.
  """

  num_classes: int = NUM_CLASSES
  resize_input: bool = True
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images):
    p = self.precision
    conv = lambda name, *a, **k: BasicConv(*a, precision=p, name=name, **k)
    x = preprocess(images, resize=self.resize_input)
    x = conv("Conv2d_1a_3x3", 32, (3, 3), stride=2)(x)
    x = conv("Conv2d_2a_3x3", 32, (3, 3))(x)
    x = conv("Conv2d_2b_3x3", 64, (3, 3), padding=1)(x)
    x = _max_pool_3x3(x, 2)
    x = conv("Conv2d_3b_1x1", 80)(x)
    x = conv("Conv2d_4a_3x3", 192, (3, 3))(x)
    x = _max_pool_3x3(x, 2)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, precision=p, name=name)(x)
    x = InceptionB(precision=p, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, precision=p, name=name)(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, precision=p, name="fc")(pool)
    return {"pool": pool, "logits": logits}


def abstract_variables(model: FIDInceptionV3 | None = None):
  """Shapes of the model's variables ({'params', 'batch_stats'}) without computing anything."""
  model = model or FIDInceptionV3()
  images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.uint8)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), images)


class InceptionFeatures:
  """Batched, jitted feature extraction: numpy images in, numpy {'pool', 'logits'} out.

  Every call runs in fixed-size batches (the last one zero-padded) so one compilation per input
  image size serves a whole dataset.
  """

  def __init__(self, variables, batch_size: int = 50, model: FIDInceptionV3 | None = None):
    self.model = model or FIDInceptionV3()
    self.variables = variables
    self.batch_size = int(batch_size)
    self._apply = jax.jit(self.model.apply)

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected images of shape (N, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f"expected uint8 [0, 255] or float [0, 1] images, got dtype {images.dtype}")
    outputs = {"pool": [], "logits": []}
    # A set smaller than one batch is not padded up to it (that would be wasted compute).
    batch_size = max(1, min(self.batch_size, len(images)))
    for start in range(0, len(images), batch_size):
      batch = images[start : start + batch_size]
      real = len(batch)
      if real < batch_size:
        pad = np.zeros((batch_size - real, *batch.shape[1:]), batch.dtype)
        batch = np.concatenate([batch, pad])
      result = self._apply(self.variables, batch)
      for key, parts in outputs.items():
        parts.append(np.asarray(result[key][:real], np.float32))
    dims = {"pool": POOL_DIM, "logits": self.model.num_classes}
    return {k: (np.concatenate(v) if v else np.zeros((0, dims[k]), np.float32)) for k, v in outputs.items()}
