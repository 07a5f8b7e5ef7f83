"""Held-out text perplexity of a run against unigram and bigram models with the same tokenizer.

Used by benchmarks/mnist_quality.py. Every model predicts the same tokens: each held-out passage
is `<s> text </s>` and all tokens after `<s>` are scored.
"""

from __future__ import annotations

import collections
import math

import jax
import jax.numpy as jnp
import numpy as np


def passages_ids(tokenizer, texts, max_len):
  out = []
  for t in texts:
    ids = [tokenizer.bos_id] + tokenizer.encode(t) + [tokenizer.eos_id]
    out.append(ids[:max_len])
  return out


def unigram_bigram_nll(train_ids, test_ids, vocab_size, bigram_weight=0.7):
  """Mean NLL (nats/token) of an add-one unigram and of a bigram interpolated with it."""
  uni = np.ones(vocab_size)
  bi = collections.defaultdict(collections.Counter)
  for ids in train_ids:
    for a, b in zip(ids[:-1], ids[1:]):
      uni[b] += 1
      bi[a][b] += 1
  p_uni = uni / uni.sum()
  nll_u, nll_b, n = 0.0, 0.0, 0
  for ids in test_ids:
    for a, b in zip(ids[:-1], ids[1:]):
      nll_u -= math.log(p_uni[b])
      row = bi.get(a)
      total = sum(row.values()) if row else 0
      p_bi = row[b] / total if total else 0.0
      p = bigram_weight * p_bi + (1 - bigram_weight) * p_uni[b] if total else p_uni[b]
      nll_b -= math.log(p)
      n += 1
  return nll_u / n, nll_b / n, n


def model_nll(config, params, test_ids, seq_len, batch_size=32):
  """Mean NLL of our model on the same tokens (teacher forcing, one passage per row)."""
  from monoformer_jax import batch as batch_lib
  from monoformer_jax.model.monoformer import MonoFormer
  from monoformer_jax.model.losses import token_cross_entropy

  model = MonoFormer(config)

  @jax.jit
  def nll(batch):
    logits = model.apply({"params": params}, batch, return_image=False)["logits"]
    ce = token_cross_entropy(logits, batch["targets"])
    return jnp.sum(ce * batch["loss_mask"]), jnp.sum(batch["loss_mask"])

  total, count = 0.0, 0.0
  shape = (config.image_height, config.image_width, config.image_channels)
  for i in range(0, len(test_ids), batch_size):
    chunk = test_ids[i : i + batch_size]
    batch = batch_lib.empty_batch(batch_size, seq_len, 1, shape)
    for r, ids in enumerate(chunk):
      batch_lib.RowBuilder(batch, r, config.num_patches, config.has_t_token).add(
          [("text", ids[:1], False), ("text", ids[1:], True)]
      )
    s, c = nll(jax.tree.map(jnp.asarray, batch))
    total += float(s)
    count += float(c)
  return total / count, int(count)
