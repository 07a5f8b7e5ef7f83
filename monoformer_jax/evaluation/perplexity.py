"""Perplexity and bits per byte of a text, with a sliding window.

The text is encoded once (after a BOS token). Every token after the first is scored exactly once,
conditioned on as many preceding tokens as the window allows: windows of at most `max_len` inputs
start every `stride` tokens, and each scores only the tokens no earlier window scored. stride =
max_len gives disjoint windows (fast, less context per token); a smaller stride gives each token
at least max_len - stride tokens of context. The windows are ordinary scorer requests, so they are
batched, packed and sharded like the multiple-choice requests.

Reported: perplexity = exp(mean token NLL), the mean NLL itself (nats), bits per byte = total NLL /
(ln 2 * UTF-8 bytes of the text), which compares models with different tokenizers, and the word
perplexity exp(total NLL / whitespace-separated words).
"""

from __future__ import annotations

import io
import math
from typing import Optional

from etils import epath

from monoformer_jax.evaluation.multiple_choice import TextTokenizer


def window_requests(ids, max_len: int, stride: int) -> list[tuple[list[int], int]]:
  """(window tokens, number scored) requests that together score ids[1:] once each."""
  if not 1 <= stride <= max_len:
    raise ValueError(f"stride={stride} must be in [1, max_len={max_len}]")
  ids = list(ids)
  n = len(ids)
  requests, scored_until, begin = [], 1, 0  # ids[1:scored_until] are scored already
  while scored_until < n:
    end = min(begin + max_len + 1, n)  # window ids[begin:end] has end - begin - 1 inputs
    if end > scored_until:
      requests.append((ids[begin:end], end - scored_until))
      scored_until = end
    begin += stride
  return requests


def perplexity(
    text: str,
    tokenizer: TextTokenizer,
    scorer,
    *,
    stride: Optional[int] = None,
    add_bos: bool = True,
    source: str = "<text>",
) -> dict:
  """Sliding-window perplexity of `text` under the scorer's model (see the module docstring)."""
  ids = ([tokenizer.bos_id] if add_bos else []) + list(tokenizer.encode(text))
  if len(ids) < 2:
    raise ValueError(f"{source}: too short to score ({len(ids)} tokens)")
  stride = stride or scorer.max_len
  requests = window_requests(ids, scorer.max_len, min(stride, scorer.max_len))
  sums, _ = scorer.score(requests)
  total_nll = -float(sums.sum())
  num_tokens = len(ids) - 1
  num_bytes = len(text.encode("utf-8"))
  num_words = max(len(text.split()), 1)
  return {
      "perplexity": math.exp(total_nll / num_tokens),
      "nll_per_token": total_nll / num_tokens,
      "bits_per_byte": total_nll / (math.log(2) * max(num_bytes, 1)),
      "word_perplexity": math.exp(total_nll / num_words),
      "num_tokens": num_tokens,
      "num_bytes": num_bytes,
      "num_windows": len(requests),
      "stride": stride,
      "max_len": scorer.max_len,
  }


def perplexity_of_file(
    path: str,
    tokenizer: TextTokenizer,
    scorer,
    *,
    stride: Optional[int] = None,
    add_bos: bool = True,
    max_chars: Optional[int] = None,
) -> dict:
  """`perplexity` of a UTF-8 text file (its first `max_chars` characters when given)."""
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"perplexity: no such text file {path}")
  try:
    with epath.Path(path).open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
      text = f.read(max_chars) if max_chars else f.read()
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e})") from None
  if not text.strip():
    raise ValueError(f"{path}: the text file is empty")
  result = perplexity(text, tokenizer, scorer, stride=stride, add_bos=add_bos, source=path)
  result["file"] = path
  return result
