"""Next-token losses of the model, shared by the train steps, the evaluators and the parity
checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def token_cross_entropy(logits: Array, targets: Array) -> Array:
  """Per-token cross-entropy in float32, (B, L)."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return logz - picked


def lm_loss(logits: Array, targets: Array, loss_mask: Array) -> tuple[Array, Array]:
  """Mean next-token cross-entropy over the masked tokens (HF's mean over non-ignored labels).

  Returns (loss, number of tokens). A batch with no trained token gives loss 0, as the official
  code does for image-only batches.
  """
  total, count = lm_loss_sum(logits, targets, loss_mask)
  return total / jnp.maximum(count, 1.0), count


def lm_loss_sum(logits: Array, targets: Array, loss_mask: Array) -> tuple[Array, Array]:
  """(sum of next-token cross-entropy over the masked tokens, number of those tokens).

  The additive form of `lm_loss`: sums over micro-batches add up to the full batch's, so a
  gradient-accumulated step can divide by the whole batch's token count once.
  """
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(token_cross_entropy(logits, targets) * mask), jnp.sum(mask)
