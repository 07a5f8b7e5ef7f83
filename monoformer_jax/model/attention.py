"""The attention core, softmax(q k^T / sqrt(d) + mask) v, with a choice of implementation.

`model.attention` picks one:
  einsum  two batched matmuls over the materialised (Lq x Lk) boolean mask; every backend, every
          shape, the reference the others are tested against;
  xla     `jax.nn.dot_product_attention(implementation="xla")`: the same mathematics through JAX's
          own op (XLA fuses it its own way);
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's fused flash attention on
          NVIDIA GPUs, the mask passed as an additive bias; only bf16 / fp16, head_dim a multiple
          of 8 up to 256 (Hopper), and even lengths when training with a bias (cuDNN's rules);
  pallas  our flash kernels for this mask (model/flash_attention.py): the mask never
          materialised, key blocks no query of a block can see skipped; Mosaic on TPU, Pallas'
          interpreter elsewhere (exact but slow: for tests);
  auto    pallas on TPU; cudnn on GPUs where cuDNN takes the shape (bf16 / fp16 training and
          prefill), einsum for the rest (float32, single-token decode); einsum on CPU.
          benchmarks/attention_check.py checks cuDNN against the einsum on a GPU (RESULTS.md,
          "On an accelerator").
A query whose every key is masked (padding) reads no NaN: einsum and xla average all values
uniformly (a finite large negative, as Hugging Face), cudnn lets it see every key; nothing reads
such a query's output.
"""

from __future__ import annotations

import contextlib
import threading

import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax.model import flash_attention

Array = jax.Array

IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn", "pallas")
_TARGET = threading.local()


@contextlib.contextmanager
def compiling_for(platform: str):
  """Trace for `platform` rather than the default backend: ahead-of-time compiles for TPU on a
  CPU host (tools/compile_for) pick the TPU kernels, compiled by Mosaic, not interpreted."""
  previous = getattr(_TARGET, "platform", None)
  _TARGET.platform = platform
  try:
    yield
  finally:
    _TARGET.platform = previous


def target_platform() -> str:
  return getattr(_TARGET, "platform", None) or jax.default_backend()


def cudnn_unsupported(dtype, head_dim: int, q_len: int, k_len: int) -> str:
  """Why cuDNN's fused attention cannot run this shape ('' when it can), by JAX's own checks
  (jax._src.cudnn.fused_attention_stablehlo.check_is_flash_attention, Hopper limits)."""
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"cuDNN's flash attention takes bfloat16 / float16, not {jnp.dtype(dtype).name}"
  if head_dim % 8 or head_dim > 256:
    return f"head_dim={head_dim} is not a multiple of 8 up to 256"
  if q_len % 2 or k_len % 2:
    return f"lengths {q_len} x {k_len}: cuDNN wants even lengths with a mask"
  return ""


def resolve(impl: str, dtype, head_dim: int, q_len: int, k_len: int) -> str:
  """The implementation `impl` means for these static shapes on the default backend."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={impl!r} is not one of {IMPLEMENTATIONS}")
  if impl != "auto":
    if impl == "cudnn":
      why = cudnn_unsupported(dtype, head_dim, q_len, k_len)
      if why:
        raise ValueError(f"model.attention='cudnn' cannot run this shape: {why} (use 'auto')")
    return impl
  platform = target_platform()
  if platform == "tpu":
    return "pallas"
  if platform == "gpu" and not cudnn_unsupported(dtype, head_dim, q_len, k_len):
    return "cudnn"
  return "einsum"


def _einsum(q: Array, k: Array, v: Array, mask: Array) -> Array:
  b, lq, h, d = q.shape
  kvh, s_len = k.shape[1], k.shape[2]
  groups = h // kvh
  # HF repeat_kv: query head i reads kv head i // groups. The groups are folded into the query
  # axis so both products are plain (batch, kv_head)-batched matmuls on every backend.
  qh = q.reshape(b, lq, kvh, groups, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, groups * lq, d)
  scores = jnp.einsum("bkqd,bksd->bkqs", qh, k).astype(jnp.float32) * (1.0 / float(np.sqrt(d)))
  scores = scores.reshape(b, kvh, groups, lq, s_len)
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).reshape(b, kvh, groups * lq, s_len)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, v).reshape(b, kvh, groups, lq, d)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d)


def attend(q: Array, k: Array, v: Array, mask, impl: str = "einsum", block: int = 128) -> Array:
  """q (B, Lq, H, D); k, v (B, KVH, Lk, D), the cache's layout; mask (B, Lq, Lk) boolean, or for
  pallas the spans of model/mask.kernel_spans. Returns (B, Lq, H, D) in q's dtype."""
  impl = resolve(impl, q.dtype, q.shape[-1], q.shape[1], k.shape[2])
  if impl == "pallas":
    interpret = target_platform() != "tpu"
    return flash_attention.flash_attention(q, k, v, mask, block_q=block, block_k=block, interpret=interpret)
  if impl == "einsum":
    return _einsum(q, k, v, mask)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # BTNH, as jax.nn takes it
  if impl == "cudnn":
    # cuDNN's gradient of a row with no visible key is NaN: such a query (padding, whose output
    # nothing reads) sees every key instead.
    mask = mask | ~jnp.any(mask, axis=-1, keepdims=True)
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=impl).astype(q.dtype)
