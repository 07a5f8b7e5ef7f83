"""Strings in, strings out: text continuations through the cached decoder (`decode.py`), used by
`InferenceModel.generate_text` and training's periodic text samples."""

from __future__ import annotations

from typing import Optional, Sequence

import jax

from monoformer_jax.sampling.decode import generate_tokens
from monoformer_jax.sampling.tokens import TokenSampling


def continuation(tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
  """The text `new_ids` add after `prompt_ids`. Decoded together: SentencePiece drops the leading
  space of a piece decoded alone ("The" + "▁class" would lose the space between them)."""
  head = tokenizer.decode(list(prompt_ids))
  full = tokenizer.decode(list(prompt_ids) + list(new_ids))
  return full[len(head) :] if full.startswith(head) else tokenizer.decode(list(new_ids))


def generate_ids(
    params,
    model_config,
    ids: Sequence[Sequence[int]],
    *,
    stop_tokens: Sequence[int],
    max_new_tokens: int = 16,
    sampling: TokenSampling = TokenSampling(),
    seed: int = 0,
    mesh=None,
    rules=None,
    prompt_inputs: Optional[dict] = None,
) -> list[list[int]]:
  """`decode.generate_tokens` of the prompt rows `ids` (reading `prompt_inputs`, where they read
  images), every row's key from key(seed)."""
  return generate_tokens(
      params,
      model_config,
      ids,
      max_new_tokens=int(max_new_tokens),
      sampling=sampling,
      rng=jax.random.key(seed),
      stop_tokens=stop_tokens,
      mesh=mesh,
      rules=rules,
      prompt_inputs=prompt_inputs,
  )


def generate_text(
    params,
    model_config,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop_tokens: Optional[Sequence[int]] = None,
    **options,
) -> list[str]:
  """Continuations of `<s>{prompt}`, cut before the stop token (default `</s>`); `options`:
  `generate_ids`' (sampling, seed, mesh, rules)."""
  ids = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in prompts]
  stops = (tokenizer.eos_id,) if stop_tokens is None else tuple(stop_tokens)
  out = generate_ids(params, model_config, ids, stop_tokens=stops, max_new_tokens=max_new_tokens, **options)
  return [continuation(tokenizer, p[1:], [t for t in new if t not in stops]) for p, new in zip(ids, out)]
