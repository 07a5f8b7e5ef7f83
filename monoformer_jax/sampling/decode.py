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

The cache grows in buckets (`cache_size_for`: at least MIN_CACHE_SLOTS, then powers of two, capped
at what the call can need) instead of being allocated for the whole call up front: every decode
step attends over, and the model's layer stack copies, the whole buffer, so a step at position p
costs O(bucket(p)) rather than O(prompt + max_new_tokens). The loop stops when its buffer is full;
the host pads the cache to the next bucket (one copy) and resumes. Each bucket size compiles the
loop once; calls that fit in MIN_CACHE_SLOTS never grow. The state is donated to the loop, so XLA
updates the cache in place instead of copying it in at every call.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from monoformer_jax.sampling import cache as cache_lib
from monoformer_jax.sampling.tokens import TokenSampling, choose_tokens
from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.monoformer import MonoFormer

MIN_CACHE_SLOTS = 256


def cache_size_for(needed: int, total: int) -> int:
  """The cache bucket holding `needed` slots: max(MIN_CACHE_SLOTS, next power of two), <= total."""
  return min(int(total), max(MIN_CACHE_SLOTS, 1 << max(int(needed) - 1, 0).bit_length()))


def text_batch(tokens, segment_ids, positions) -> dict:
  zeros = jnp.zeros_like(tokens)
  return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions, "kinds": zeros, "patch_index": zeros}


def pad_prompts(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded (B, P) int32 ids (pad 0) and the lengths (B,). Every prompt needs >= 1 token."""
  if len(prompts) == 0:  # a list or an array
    raise ValueError("no prompts given")
  lengths = np.array([len(p) for p in prompts], np.int32)
  if (lengths < 1).any():
    raise ValueError(
        f"empty prompt at row(s) {np.nonzero(lengths < 1)[0].tolist()} (a prompt needs at least one token, e.g. <s>)"
    )
  ids = np.zeros((len(prompts), int(lengths.max())), np.int32)
  for r, p in enumerate(prompts):
    ids[r, : len(p)] = np.asarray(p, np.int32)
  return ids, lengths


def to_host(tree):
  """Device values as numpy, on every process: an array sharded over several hosts (a multi-host
  mesh) is all-gathered first, which every process must call alike (sampling is collective)."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(one, tree)


def mesh_context(mesh, rules):
  """Mesh + logical axis rules for tracing (the model's activation constraints need both)."""
  if mesh is None:
    return contextlib.nullcontext()
  stack = contextlib.ExitStack()
  stack.enter_context(mesh)
  stack.enter_context(nn.logical_axis_rules(rules))
  return stack


@functools.partial(jax.jit, static_argnames=("config", "cache_size", "max_new_tokens"))
def prefill(
    params,
    ids,
    lengths,
    sample_ids,
    prompt_inputs=None,
    *,
    config: ModelConfig,
    cache_size: int,
    max_new_tokens: int,
) -> dict:
  """Writes every prompt token but the last into a fresh cache; returns the decode state.

  `prompt_inputs` (prompts that hold input images): the prompts' `kinds` and `patch_index` (B, P)
  and their `input_features` (B, K, Q, D), laid out as batch.py describes."""
  b, p = ids.shape
  cache = cache_lib.constrain_cache(cache_lib.init_cache(config, b, cache_size))
  if p > 1:
    slots = jnp.arange(p - 1, dtype=jnp.int32)[None, :]
    seg = (slots < (lengths - 1)[:, None]).astype(jnp.int32)
    pos = jnp.broadcast_to(slots, (b, p - 1))
    batch = text_batch(ids[:, :-1], seg, pos)
    if prompt_inputs is not None:
      batch.update(
          kinds=prompt_inputs["kinds"][:, :-1],
          patch_index=prompt_inputs["patch_index"][:, :-1],
          input_features=prompt_inputs["input_features"],
      )
    out = MonoFormer(config).apply(
        {"params": params},
        batch,
        cache=cache,
        cache_index=0,
        return_logits=False,
        return_image=False,
    )
    cache = cache_lib.constrain_cache(out["cache"])
  rows = jnp.arange(b)
  return {
      "cache": cache,
      "index": jnp.asarray(p - 1, jnp.int32),  # next slot to write, shared by the rows
      "next_token": ids[rows, lengths - 1],  # chosen, not yet in the cache
      "position": (lengths - 1).astype(jnp.int32),  # RoPE position of next_token
      "generated": jnp.zeros((b, max_new_tokens), jnp.int32),
      "num_generated": jnp.zeros((b,), jnp.int32),
      "done": jnp.zeros((b,), bool),
      "images_drawn": jnp.zeros((b,), jnp.int32),
      "sample_ids": sample_ids.astype(jnp.int32),
  }


def cache_slots(state: dict) -> int:
  return state["cache"]["meta"]["segment_ids"].shape[1]


@functools.partial(jax.jit, static_argnames=("size",))
def grow_cache(state: dict, *, size: int) -> dict:
  """The state with its cache padded to `size` slots (new slots empty: segment 0, image_id -1)."""
  cache = state["cache"]
  extra = size - cache["meta"]["segment_ids"].shape[1]
  if extra < 0:
    raise ValueError(f"cannot shrink a cache of {size + (-extra)} slots to {size}")
  pad_kv = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, extra), (0, 0)))  # noqa: E731
  grown = {
      "layers": {k: pad_kv(v) for k, v in cache["layers"].items()},
      "meta": {
          "segment_ids": jnp.pad(cache["meta"]["segment_ids"], ((0, 0), (0, extra))),
          "image_id": jnp.pad(cache["meta"]["image_id"], ((0, 0), (0, extra)), constant_values=-1),
      },
  }
  return dict(state, cache=cache_lib.constrain_cache(grown))


def ensure_room(state: dict, needed: int, total: int) -> dict:
  """Grows the cache (to its bucket) when fewer than `needed` slots follow state['index']."""
  index = int(to_host(state["index"]))
  if index + needed <= cache_slots(state):
    return state
  if index + needed > total:
    raise RuntimeError(f"the cache would need {index + needed} slots, more than the {total} this call sized it for")
  return grow_cache(state, size=cache_size_for(index + needed, total))


def _pending_image(state, image_token: int):
  return (~state["done"]) & (state["next_token"] == image_token)


@functools.partial(
    jax.jit,
    static_argnames=("config", "sampling", "stop_tokens", "image_token", "max_images"),
    donate_argnames=("state",),
)
def decode_until(
    params,
    state: dict,
    rng,
    *,
    config: ModelConfig,
    sampling: TokenSampling,
    stop_tokens: tuple = (),
    image_token: int = -1,
    max_images: int = 0,
) -> dict:
  """Decodes until every row is done, the cache is full, or (image_token >= 0) a live row is
  about to feed it. `state` is donated (its buffers are reused for the result).

  A row is done after a stop token or `max_new_tokens` (the width of state['generated']). With
  image_token >= 0, a row that has drawn `max_images` images can no longer choose it.
  """
  model = MonoFormer(config)
  b, max_new = state["generated"].shape
  rows = jnp.arange(b)

  size = cache_slots(state)

  def cond(s):
    go = jnp.any(~s["done"]) & (s["index"] < size)
    if image_token >= 0:
      go = go & ~jnp.any(_pending_image(s, image_token))
    return go

  def body(s):
    live = ~s["done"]
    batch = text_batch(s["next_token"][:, None], live.astype(jnp.int32)[:, None], s["position"][:, None])
    out = model.apply({"params": params}, batch, cache=s["cache"], cache_index=s["index"], return_image=False)
    logits = out["logits"][:, 0]
    if image_token >= 0:
      logits = logits.at[:, image_token].set(
          jnp.where(s["images_drawn"] >= max_images, -jnp.inf, logits[:, image_token])
      )
    keys = jax.vmap(lambda i, k: jax.random.fold_in(jax.random.fold_in(rng, i), k))(s["sample_ids"], s["num_generated"])
    chosen = choose_tokens(logits, keys, sampling)
    n = s["num_generated"]
    generated = (
        s["generated"]
        .at[rows, jnp.minimum(n, max_new - 1)]
        .set(jnp.where(live, chosen, s["generated"][rows, jnp.minimum(n, max_new - 1)]))
    )
    n = n + live.astype(jnp.int32)
    stop = jnp.zeros((b,), bool)
    for t in stop_tokens:
      stop = stop | (chosen == t)
    return dict(
        s,
        cache=cache_lib.constrain_cache(out["cache"]),
        index=s["index"] + 1,
        next_token=jnp.where(live, chosen, s["next_token"]),
        position=s["position"] + live.astype(jnp.int32),
        generated=generated,
        num_generated=n,
        done=s["done"] | (live & (stop | (n >= max_new))),
    )

  return jax.lax.while_loop(cond, body, state)


def prefill_rows(params, config: ModelConfig, ids, lengths, sample_ids, prompt_inputs, max_new_tokens: int, total: int):
  """`prefill` of padded prompt rows (`pad_prompts`' host arrays; `sample_ids` default 0..B-1)
  into a cache sized for `total` slots at most (`cache_size_for`)."""
  sample_ids = np.arange(len(ids)) if sample_ids is None else np.asarray(sample_ids)
  return prefill(
      params,
      jnp.asarray(ids),
      jnp.asarray(lengths),
      jnp.asarray(sample_ids),
      prompt_inputs,
      config=config,
      cache_size=cache_size_for(ids.shape[1], total),
      max_new_tokens=max_new_tokens,
  )


def generate_tokens(
    params,
    config: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: TokenSampling = TokenSampling(),
    rng: Optional[jax.Array] = None,
    stop_tokens: Sequence[int] = (),
    sample_ids=None,
    mesh=None,
    rules=None,
    prompt_inputs: Optional[dict] = None,
) -> list[list[int]]:
  """Continuations of token-id prompts (each starts with <s> for LLaMA-style models).

  Returns one list of new ids per prompt, the stop token included when one was produced.
  `prompt_inputs`: see `prefill` (prompts with input images must all have the same length, the
  last token text: the image tokens' places are fixed by `kinds`). With
  `mesh` (and logical axis `rules`), the cache and activations are sharded by their logical axes;
  params should already be placed on that mesh.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  ids, lengths = pad_prompts(prompts)
  total = ids.shape[1] - 1 + max_new_tokens
  if int(lengths.max()) + max_new_tokens > config.max_position_embeddings:
    raise ValueError(
        f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) "
        f"exceed the model's max_position_embeddings={config.max_position_embeddings}"
    )
  rng = jax.random.key(0) if rng is None else rng
  with mesh_context(mesh, rules):
    state = prefill_rows(params, config, ids, lengths, sample_ids, prompt_inputs, max_new_tokens, total)
    while True:
      state = decode_until(
          params, state, rng, config=config, sampling=sampling, stop_tokens=tuple(int(t) for t in stop_tokens)
      )
      if to_host(state["done"]).all():
        break
      state = ensure_room(state, 1, total)  # the loop stopped on a full cache
  generated, counts = to_host((state["generated"], state["num_generated"]))
  return [[int(t) for t in generated[r, : counts[r]]] for r in range(len(prompts))]
