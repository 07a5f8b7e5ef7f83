"""Classifier-free guidance on a doubled batch [conditional; unconditional].

Modes:
  'eps'             (default) guide every prediction channel (the first C of 2C with learned sigma,
                    all of them otherwise); the variance channels come from the conditional half.
  'official_first3' the official forward_with_cfg: ONLY output channels 0..2 are guided and the
                    rest pass through unguided per row. It is DiT's "reproducibility" quirk and is
                    meaningful only for 4-channel latents, but it is what the released checkpoint's
                    FID was measured with.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

CFG_MODES = ("eps", "official_first3")


def guided_channel_count(num_output_channels: int, mode: str = "eps", learn_sigma: bool = True) -> int:
  if mode == "eps":
    if learn_sigma and num_output_channels % 2:
      raise ValueError(f"learn_sigma output must have an even channel count, got {num_output_channels}")
    return num_output_channels // 2 if learn_sigma else num_output_channels
  if mode == "official_first3":
    return min(3, num_output_channels)
  raise ValueError(f"unknown guidance mode {mode!r}; one of {CFG_MODES}")


def guided_output(out_cond, out_uncond, scale, mode: str = "eps", learn_sigma: bool = True):
  """uncond + scale * (cond - uncond) on the guided channels, the conditional output elsewhere."""
  n = guided_channel_count(out_cond.shape[-1], mode, learn_sigma)
  guided = out_uncond[..., :n] + scale * (out_cond[..., :n] - out_uncond[..., :n])
  return jnp.concatenate([guided, out_cond[..., n:]], axis=-1)


def forward_with_cfg(model_fn: Callable, x_t, t, scale, mode: str = "official_first3", learn_sigma: bool = True):
  """The official forward_with_cfg on a doubled batch (B = 2 * half), for parity.

  x_t's second half is IGNORED (replaced by its first half); one batched model call; the guided
  channels are written to both halves and the others stay per row. Returns (B, ..., C_out).
  """
  half = x_t.shape[0] // 2
  combined = jnp.concatenate([x_t[:half], x_t[:half]], axis=0)
  out = model_fn(combined, t)
  cond, uncond = out[:half], out[half:]
  n = guided_channel_count(out.shape[-1], mode, learn_sigma)
  guided = uncond[..., :n] + scale * (cond[..., :n] - uncond[..., :n])
  return jnp.concatenate(
      [jnp.concatenate([guided, cond[..., n:]], axis=-1), jnp.concatenate([guided, uncond[..., n:]], axis=-1)], axis=0
  )


def cfg_denoise_fn(model_fn: Callable, scale, mode: str = "eps", learn_sigma: bool = True):
  """A guided denoise_fn(x_t, model_t) on B samples from a doubled-batch model function.

  model_fn(x (2B, ...), model_t (2B,)) -> (2B, ..., C_out) must condition rows [0, B) and leave
  rows [B, 2B) unconditional (the caller binds the two prompts). The sampler then only carries the
  B conditional samples, which is what the official loop effectively computes for them.
  """

  def denoise_fn(x_t, model_t):
    batch = x_t.shape[0]
    out = model_fn(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([model_t, model_t], axis=0))
    return guided_output(out[:batch], out[batch:], scale, mode, learn_sigma)

  return denoise_fn


def guided_denoise_fn(cond_fn: Callable, uncond_fn: Callable, scale, mode: str = "eps", learn_sigma: bool = True):
  """Guidance from two separate calls (when the two branches cannot share a batch)."""

  def denoise_fn(x_t, model_t):
    return guided_output(cond_fn(x_t, model_t), uncond_fn(x_t, model_t), scale, mode, learn_sigma)

  return denoise_fn
