"""Batched log-likelihood scoring: the engine under the multiple-choice and perplexity evaluators.

A request is `(ids, num_scored)`: a token sequence and how many of its last tokens to score. Its
result is  sum_{j >= len(ids) - num_scored} log p(ids[j] | ids[:j])  under the model (and whether
every scored token is also the model's greedy choice, as lm-eval-harness reports).

How requests become batches, so one compiled program serves many requests:
  * A request longer than `max_len + 1` tokens keeps its last `max_len + 1` (the model sees at most
    `max_len` inputs), as the harness truncates.
  * Requests are packed several to a row (segment ids keep them apart; RoPE positions restart at 0
    in each), rows of up to `pack_len` positions; a longer request gets a row of its own.
  * Each row's length is rounded up to a bucket (powers of two from `min_bucket`, capped at
    `max_len`): one compile per bucket. Rows are grouped by bucket into batches of a fixed number
    of rows, the last batch padded with empty rows, so every batch of a bucket has the same shape.
  * A batch is sharded over a 1-D mesh of the local devices (axis "batch"); parameters are
    replicated. Every row is computed on its own, so results do not depend on the device count
    (beyond float32 rounding: XLA picks its kernels by the per-device shape).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from monoformer_jax.model.config import ModelConfig
from monoformer_jax.model.monoformer import MonoFormer
from monoformer_jax.model.losses import token_cross_entropy

Request = tuple  # (ids: sequence of int, num_scored: int)


def _score_rows(model: MonoFormer, params, tokens, segment_ids, positions, targets):
  """Per-position log p(target) and greedy flag, (B, L) each."""
  zeros = jnp.zeros_like(tokens)
  batch = {"tokens": tokens, "segment_ids": segment_ids, "positions": positions, "kinds": zeros, "patch_index": zeros}
  logits = model.apply({"params": params}, batch, return_image=False)["logits"]
  logprob = -token_cross_entropy(logits, targets)
  greedy = jnp.argmax(logits, axis=-1) == targets
  return logprob, greedy


def _bucket(length: int, min_bucket: int, max_len: int) -> int:
  size = min_bucket
  while size < length:
    size *= 2
  return min(size, max(max_len, length))


def _pack(lengths: Sequence[int], pack_len: int) -> list[list[int]]:
  """Rows of request indices. Longest first; each row is topped up with the shortest that fit.

  Linear time (two pointers over the sorted lengths) and close to first-fit-decreasing for the
  short, similar-length requests of the benchmarks.
  """
  order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
  rows, lo, hi = [], 0, len(order) - 1
  while lo <= hi:
    row = [order[lo]]
    used = lengths[order[lo]]
    lo += 1
    while lo <= hi and used + lengths[order[hi]] <= pack_len:
      row.append(order[hi])
      used += lengths[order[hi]]
      hi -= 1
    rows.append(row)
  return rows


class LoglikelihoodScorer:
  """Scores requests with a MonoFormer's LM head (`score(requests) -> (sums, greedy)`).

  Args:
    model_config, params: the model (params as `MonoFormer.apply` takes them).
    max_len: most input positions per request (default: the model's max_position_embeddings).
    batch_size: rows per batch, rounded up to a multiple of the device count.
    pack_len: row length that short requests are packed into.
    min_bucket: smallest row length compiled.
    devices: the devices to shard over (default: all local devices).
  """

  def __init__(
      self,
      model_config: ModelConfig,
      params,
      *,
      max_len: Optional[int] = None,
      batch_size: int = 16,
      pack_len: int = 256,
      min_bucket: int = 16,
      devices: Optional[Sequence[jax.Device]] = None,
  ):
    self.max_len = int(max_len or model_config.max_position_embeddings)
    self.pack_len = min(int(pack_len), self.max_len)
    self.min_bucket = min(int(min_bucket), self.max_len)
    devices = list(devices) if devices is not None else jax.local_devices()
    self.mesh = Mesh(np.array(devices), ("batch",))
    self.rows_per_batch = -(-int(batch_size) // len(devices)) * len(devices)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    rows = NamedSharding(self.mesh, PartitionSpec("batch"))
    self.params = jax.device_put(params, replicated)
    model = MonoFormer(model_config)
    self._fn = jax.jit(
        lambda p, *arrays: _score_rows(model, p, *arrays),
        in_shardings=(replicated, rows, rows, rows, rows),
        out_shardings=rows,
    )
    self.num_batches = 0  # batches run so far (for reports and tests)
    self.num_rows = 0  # packed rows (of requests) scored so far, padding rows not counted

  def _prepare(self, requests: Sequence[Request]) -> list[tuple[np.ndarray, int]]:
    out = []
    for k, (ids, num_scored) in enumerate(requests):
      ids = np.asarray(ids, np.int32).reshape(-1)
      num_scored = int(num_scored)
      if num_scored < 1 or num_scored >= len(ids):
        raise ValueError(
            f"request {k}: scores {num_scored} of {len(ids)} tokens; it needs at "
            "least one token of context and one token to score"
        )
      if num_scored > self.max_len:
        raise ValueError(f"request {k}: {num_scored} scored tokens do not fit the model's max_len={self.max_len}")
      out.append((ids[-(self.max_len + 1) :], num_scored))
    return out

  def score(self, requests: Sequence[Request]) -> tuple[np.ndarray, np.ndarray]:
    """(sums float64 (N,), greedy bool (N,)) for N requests, in the order given."""
    prepared = self._prepare(requests)
    sums = np.zeros(len(prepared), np.float64)
    greedy = np.zeros(len(prepared), bool)
    if not prepared:
      return sums, greedy
    lengths = [len(ids) - 1 for ids, _ in prepared]  # the last token is only ever a target
    by_bucket: dict[int, list[list[int]]] = {}
    for row in _pack(lengths, self.pack_len):
      size = _bucket(sum(lengths[i] for i in row), self.min_bucket, self.max_len)
      by_bucket.setdefault(size, []).append(row)
    for size in sorted(by_bucket):
      rows = by_bucket[size]
      pending = []
      for start in range(0, len(rows), self.rows_per_batch):
        chunk = rows[start : start + self.rows_per_batch]
        arrays, spans = self._build(chunk, prepared, size)
        pending.append((self._fn(self.params, *arrays), spans))  # dispatch before fetching
        self.num_batches += 1
        self.num_rows += len(chunk)
      for (logprob, is_greedy), spans in pending:
        logprob, is_greedy = np.asarray(logprob, np.float64), np.asarray(is_greedy)
        for k, r, lo, hi in spans:
          sums[k] = logprob[r, lo:hi].sum()
          greedy[k] = bool(is_greedy[r, lo:hi].all())
    return sums, greedy

  def _build(self, chunk, prepared, size):
    """Host arrays of one batch, plus (request, row, first, end) of each request's scored span."""
    shape = (self.rows_per_batch, size)
    tokens, segment_ids = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    positions, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    spans = []
    for r, row in enumerate(chunk):
      cursor = 0
      for segment, k in enumerate(row, start=1):
        ids, num_scored = prepared[k]
        n = len(ids) - 1
        sl = slice(cursor, cursor + n)
        tokens[r, sl], targets[r, sl] = ids[:-1], ids[1:]
        segment_ids[r, sl] = segment
        positions[r, sl] = np.arange(n)
        spans.append((k, r, cursor + n - num_scored, cursor + n))
        cursor += n
    return (tokens, segment_ids, positions, targets), spans
