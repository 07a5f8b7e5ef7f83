"""Text generation with a key/value cache: one prefill, then a compiled `lax.while_loop`.

Batches of prompts of different lengths are RIGHT-padded. All rows write into the cache at one
shared index (the padding slots have segment id 0, so no query ever sees them), while each row's
RoPE position continues from its own length: row r's k-th new token has position len_r + k, as if
it had been written right after its prompt. The prefill takes every prompt token but the last;
the loop then feeds one chosen-but-unwritten token per row and step (`next_token`), so the first
step already covers the prompt's last token and a prompt ending in `<|im_start|>` is seen by the
image phase (inference/interleaved.py) before anything is fed.

Sampling keys are fold_in(fold_in(rng, sample_id), k) for a row's k-th token, so a row's text does
not depend on the batch it was generated in.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from monoformer_jax.inference import cache as cache_lib
from monoformer_jax.inference.tokens import TokenSampling, choose_tokens
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.monoformer import MonoFormer


def text_batch(tokens, segment_ids, positions) -> dict:
  zeros = jnp.zeros_like(tokens)
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions, "kinds": zeros,
          "patch_index": zeros}


def pad_prompts(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded (B, P) int32 ids (pad 0) and the lengths (B,). Every prompt needs >= 1 token."""
  if not len(prompts):
    raise ValueError("no prompts given")
  lengths = np.array([len(p) for p in prompts], np.int32)
  if (lengths < 1).any():
    raise ValueError(f"empty prompt at row(s) {np.nonzero(lengths < 1)[0].tolist()} (a prompt "
                     "needs at least one token, e.g. <s>)")
  ids = np.zeros((len(prompts), int(lengths.max())), np.int32)
  for r, p in enumerate(prompts):
    ids[r, :len(p)] = np.asarray(p, np.int32)
  return ids, lengths


def mesh_context(mesh, rules):
  """Mesh + logical axis rules for tracing (the model's activation constraints need both)."""
  if mesh is None:
    return contextlib.nullcontext()
  stack = contextlib.ExitStack()
  stack.enter_context(mesh)
  stack.enter_context(nn.logical_axis_rules(rules))
  return stack


@functools.partial(jax.jit, static_argnames=("config", "cache_size", "max_new_tokens"))
def prefill(params, ids, lengths, sample_ids, *, config: ModelConfig, cache_size: int,
            max_new_tokens: int) -> dict:
  """Writes every prompt token but the last into a fresh cache; returns the decode state."""
  b, p = ids.shape
  cache = cache_lib.constrain_cache(cache_lib.init_cache(config, b, cache_size))
  if p > 1:
    slots = jnp.arange(p - 1, dtype=jnp.int32)[None, :]
    seg = (slots < (lengths - 1)[:, None]).astype(jnp.int32)
    pos = jnp.broadcast_to(slots, (b, p - 1))
    out = MonoFormer(config).apply({"params": params}, text_batch(ids[:, :-1], seg, pos),
                                   cache=cache, cache_index=0, return_logits=False,
                                   return_image=False)
    cache = cache_lib.constrain_cache(out["cache"])
  rows = jnp.arange(b)
  return {
      "cache": cache,
      "index": jnp.asarray(p - 1, jnp.int32),           # next slot to write, shared by the rows
      "next_token": ids[rows, lengths - 1],              # chosen, not yet in the cache
      "position": (lengths - 1).astype(jnp.int32),       # RoPE position of next_token
      "generated": jnp.zeros((b, max_new_tokens), jnp.int32),
      "num_generated": jnp.zeros((b,), jnp.int32),
      "done": jnp.zeros((b,), bool),
      "images_drawn": jnp.zeros((b,), jnp.int32),
      "sample_ids": sample_ids.astype(jnp.int32),
  }


def _pending_image(state, image_token: int):
  return (~state["done"]) & (state["next_token"] == image_token)


@functools.partial(jax.jit, static_argnames=("config", "sampling", "stop_tokens", "image_token",
                                             "max_images"))
def decode_until(params, state: dict, rng, *, config: ModelConfig, sampling: TokenSampling,
                 stop_tokens: tuple = (), image_token: int = -1, max_images: int = 0) -> dict:
  """Decodes until every row is done, or (image_token >= 0) a live row is about to feed it.

  A row is done after a stop token or `max_new_tokens` (the width of state['generated']). With
  image_token >= 0, a row that has drawn `max_images` images can no longer choose it.
  """
  model = MonoFormer(config)
  b, max_new = state["generated"].shape
  rows = jnp.arange(b)

  def cond(s):
    go = jnp.any(~s["done"])
    if image_token >= 0:
      go = go & ~jnp.any(_pending_image(s, image_token))
    return go

  def body(s):
    live = ~s["done"]
    batch = text_batch(s["next_token"][:, None], live.astype(jnp.int32)[:, None],
                       s["position"][:, None])
    out = model.apply({"params": params}, batch, cache=s["cache"], cache_index=s["index"],
                      return_image=False)
    logits = out["logits"][:, 0]
    if image_token >= 0:
      logits = logits.at[:, image_token].set(
          jnp.where(s["images_drawn"] >= max_images, -jnp.inf, logits[:, image_token]))
    keys = jax.vmap(lambda i, k: jax.random.fold_in(jax.random.fold_in(rng, i), k))(
        s["sample_ids"], s["num_generated"])
    chosen = choose_tokens(logits, keys, sampling)
    n = s["num_generated"]
    generated = s["generated"].at[rows, jnp.minimum(n, max_new - 1)].set(
        jnp.where(live, chosen, s["generated"][rows, jnp.minimum(n, max_new - 1)]))
    n = n + live.astype(jnp.int32)
    stop = jnp.zeros((b,), bool)
    for t in stop_tokens:
      stop = stop | (chosen == t)
    return dict(s, cache=cache_lib.constrain_cache(out["cache"]), index=s["index"] + 1,
                next_token=jnp.where(live, chosen, s["next_token"]),
                position=s["position"] + live.astype(jnp.int32), generated=generated,
                num_generated=n, done=s["done"] | (live & (stop | (n >= max_new))))

  return jax.lax.while_loop(cond, body, state)


def generate_tokens(params, config: ModelConfig, prompts: Sequence[Sequence[int]], *,
                    max_new_tokens: int, sampling: TokenSampling = TokenSampling(),
                    rng: Optional[jax.Array] = None, stop_tokens: Sequence[int] = (),
                    sample_ids=None, mesh=None, rules=None) -> list[list[int]]:
  """Continuations of token-id prompts (each starts with <s> for LLaMA-style models).

  Returns one list of new ids per prompt, the stop token included when one was produced. With
  `mesh` (and logical axis `rules`), the cache and activations are sharded by their logical axes;
  params should already be placed on that mesh.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  ids, lengths = pad_prompts(prompts)
  size = ids.shape[1] - 1 + max_new_tokens
  if int(lengths.max()) + max_new_tokens > config.max_position_embeddings:
    raise ValueError(f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) "
                     f"exceed the model's max_position_embeddings={config.max_position_embeddings}")
  rng = jax.random.key(0) if rng is None else rng
  sample_ids = np.arange(len(prompts)) if sample_ids is None else np.asarray(sample_ids)
  with mesh_context(mesh, rules):
    state = prefill(params, jnp.asarray(ids), jnp.asarray(lengths), jnp.asarray(sample_ids),
                    config=config, cache_size=size, max_new_tokens=max_new_tokens)
    state = decode_until(params, state, rng, config=config, sampling=sampling,
                         stop_tokens=tuple(int(t) for t in stop_tokens))
  generated, counts = jax.device_get((state["generated"], state["num_generated"]))
  return [[int(t) for t in generated[r, :counts[r]]] for r in range(len(prompts))]
