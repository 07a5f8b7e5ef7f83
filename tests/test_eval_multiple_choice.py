"""Multiple-choice scorer and perplexity vs transformers on a random-weight LLaMA.

The prompt formats are re-derived here from the lm-eval-harness conventions (not through our
parsers), so a wrong format, tokenisation split, packing or sharding shows up as a log-likelihood
mismatch.
"""

import json
import math
import os
import re
import zlib

import jax
import numpy as np
import pytest
import torch
import transformers

from monoformer_jax.convert import checkpoints
from monoformer_jax.evaluation import multiple_choice as mc
from monoformer_jax.evaluation import perplexity as ppl
from monoformer_jax.evaluation.loglikelihood import LoglikelihoodScorer

VOCAB = 251


class WordTokenizer:
  """Words and punctuation with their leading space (as SentencePiece keeps it), other whitespace
  characters alone; each piece mapped to a fixed id by a hash (no vocabulary file). Spaces matter,
  so a format that gets one wrong changes the tokens."""

  bos_id = 1

  def encode(self, text):
    pieces = re.findall(r" ?\w+| ?[^\w\s]|\s", text)
    return [3 + zlib.crc32(t.encode()) % (VOCAB - 3) for t in pieces]


@pytest.fixture(scope="module")
def model(tmp_path_factory, module_seed):
  torch.manual_seed(module_seed("transformers weights"))
  cfg = transformers.LlamaConfig(
      vocab_size=VOCAB,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      rms_norm_eps=1e-6,
      tie_word_embeddings=False,
      max_position_embeddings=128,
  )
  hf = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # larger than the 0.02 init, so choices get clearly different scores
    for p in hf.parameters():
      p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.1) + (1.0 if p.ndim == 1 else 0.0))
  path = tmp_path_factory.mktemp("hf") / "llama"
  hf.save_pretrained(path, safe_serialization=True)
  config, params = checkpoints.load_llama_checkpoint(str(path))
  return hf, config, params


def _words(rng, n):
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  return " ".join("".join(rng.choice(letters, rng.integers(2, 7))) for _ in range(n))


def _records(task, rng, n=4):
  """n random records of a task in its Hugging Face layout."""
  w = lambda k=None: _words(rng, int(k or rng.integers(1, 6)))  # noqa: E731
  out = []
  for _ in range(n):
    if task == "hellaswag":
      out.append(
          {
              "activity_label": w(2),
              "ctx_a": w(5) + " [title] " + w(2),
              "ctx_b": w(3),
              "endings": [w() + " [header] " + w(2), w(), w(), w()],
              "label": str(rng.integers(4)),
          }
      )
    elif task in ("arc_easy", "arc_challenge", "openbookqa"):
      k = int(rng.integers(3, 6))
      labels = list("ABCDE"[:k]) if rng.random() < 0.7 else [str(i + 1) for i in range(k)]
      key = "question_stem" if task == "openbookqa" else "question"
      out.append(
          {
              key: w(6) + "?",
              "choices": {"text": [w() for _ in range(k)], "label": labels},
              "answerKey": labels[rng.integers(k)],
          }
      )
    elif task == "winogrande":
      out.append(
          {"sentence": w(4) + " _ " + w(4) + ".", "option1": w(1), "option2": w(2), "answer": str(rng.integers(1, 3))}
      )
    elif task == "boolq":
      out.append({"passage": w(12) + ".", "question": w(5), "label": int(rng.integers(2))})
    elif task == "piqa":
      out.append({"goal": w(5), "sol1": w(6), "sol2": w(4), "label": int(rng.integers(2))})
  return out


def _clean(t):
  t = t.strip().replace(" [title]", ". ")
  return re.sub(r"\[.*?\]", "", t).replace("  ", " ")


def _expected(task, r):
  """[(context, continuation, choice text)], gold: the harness's prompt formats, written out."""
  if task == "hellaswag":
    ctx = _clean(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
    return [(ctx, " " + _clean(e), _clean(e)) for e in r["endings"]], int(r["label"])
  if task in ("arc_easy", "arc_challenge", "openbookqa"):
    ctx = r["question_stem"] if task == "openbookqa" else f"Question: {r['question']}\nAnswer:"
    gold = r["choices"]["label"].index(r["answerKey"])
    return [(ctx, " " + c, c) for c in r["choices"]["text"]], gold
  if task == "winogrande":
    i = r["sentence"].index("_")
    rest = r["sentence"][i + 1 :].strip()
    return [(r["sentence"][:i] + o, " " + rest, rest) for o in (r["option1"], r["option2"])], int(r["answer"]) - 1
  if task == "boolq":
    ctx = f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"
    return [(ctx, " no", "no"), (ctx, " yes", "yes")], r["label"]
  ctx = f"Question: {r['goal']}\nAnswer:"
  return [(ctx, " " + r["sol1"], r["sol1"]), (ctx, " " + r["sol2"], r["sol2"])], r["label"]


def _hf_loglikelihoods(hf, sequences, scored):
  """Sum of log p over the last `scored[i]` tokens of each sequence, from transformers' logits."""
  n = max(len(s) for s in sequences)
  ids = np.zeros((len(sequences), n), np.int64)
  mask = np.zeros_like(ids)
  for i, s in enumerate(sequences):
    ids[i, : len(s)], mask[i, : len(s)] = s, 1
  with torch.no_grad():
    logits = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    logp = torch.log_softmax(logits.double(), -1).numpy()
  out = []
  for i, (s, k) in enumerate(zip(sequences, scored)):
    out.append(sum(logp[i, j - 1, s[j]] for j in range(len(s) - k, len(s))))
  return np.array(out)


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory, module_seed):
  rng = np.random.default_rng(module_seed("tasks"))
  d = tmp_path_factory.mktemp("tasks")
  records = {}
  for task in mc.TASKS:
    records[task] = _records(task, rng)
    with open(d / f"{task}.jsonl", "w") as f:
      for r in records[task]:
        f.write(json.dumps(r) + "\n\n")  # blank lines are allowed
  return d, records


def test_loglikelihoods_and_accuracies_match_transformers(model, fixture_dir):
  hf, config, params = model
  d, records = fixture_dir
  tok = WordTokenizer()
  scorer = LoglikelihoodScorer(config, params, batch_size=4, pack_len=64)
  report = mc.evaluate_tasks(scorer, tok, str(d), details=True)
  assert set(report) == set(mc.TASKS) | {"average"}
  headlines = []
  for task in mc.TASKS:
    sequences, scored, golds, lengths = [], [], [], []
    for r in records[task]:
      pairs, gold = _expected(task, r)
      golds.append(gold)
      lengths.append([len(c) for _, _, c in pairs])
      for ctx, cont, _ in pairs:  # the harness's split: context tokens, then the rest
        ctx_ids = tok.encode(ctx)
        cont_ids = tok.encode(ctx + cont)[len(ctx_ids) :]
        sequences.append([1] + ctx_ids + cont_ids)
        scored.append(len(cont_ids))
    ref = _hf_loglikelihoods(hf, sequences, scored)
    ours = np.concatenate(report[task]["loglikelihoods"])
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0, err_msg=task)
    assert report[task]["gold"] == golds
    # Hand check of the accuracies from transformers' numbers.
    acc = acc_norm = 0
    offset = 0
    for gold, lens in zip(golds, lengths):
      ll = ref[offset : offset + len(lens)]
      offset += len(lens)
      acc += int(np.argmax(ll) == gold)
      acc_norm += int(np.argmax(ll / np.array(lens)) == gold)
    n = len(golds)
    assert report[task]["acc"] == pytest.approx(acc / n), task
    assert report[task]["acc_norm"] == pytest.approx(acc_norm / n), task
    assert report[task]["num_examples"] == n
    headlines.append(report[task][mc.TASKS[task].headline])
  assert report["average"] == pytest.approx(np.mean(headlines))
  assert np.ptp(ours) > 0.1  # the choices are told apart


def test_sharded_packed_and_truncated_scoring_agree(model, fixture_dir, rng):
  hf, config, params = model
  requests = [
      (list(rng.integers(3, VOCAB, n)), int(rng.integers(1, min(n - 1, 9) + 1))) for n in rng.integers(2, 60, 37)
  ]
  assert len(jax.local_devices()) == 8
  one = LoglikelihoodScorer(config, params, batch_size=3, pack_len=64, devices=jax.local_devices()[:1])
  eight = LoglikelihoodScorer(config, params, batch_size=3, pack_len=64)
  unpacked = LoglikelihoodScorer(config, params, batch_size=5, pack_len=16)
  assert (one.rows_per_batch, eight.rows_per_batch) == (3, 8)
  s1, g1 = one.score(requests)
  s8, g8 = eight.score(requests)
  # The device count changes only float32 rounding (XLA:CPU picks kernels by the local shape).
  np.testing.assert_allclose(s8, s1, rtol=2e-6, atol=0)
  np.testing.assert_array_equal(g8, g1)
  # Packing changes only float32 rounding (masked keys still enter the softmax sums).
  np.testing.assert_allclose(unpacked.score(requests)[0], s8, rtol=2e-6, atol=0)
  # Rows, not batches: how rows fall into length buckets decides the batch counts.
  assert unpacked.num_rows > eight.num_rows
  ref = _hf_loglikelihoods(hf, [r[0] for r in requests], [r[1] for r in requests])
  np.testing.assert_allclose(s8, ref, atol=1e-4, rtol=0)
  # Too long for max_len: the harness keeps the last max_len + 1 tokens.
  short = LoglikelihoodScorer(config, params, max_len=20, batch_size=2)
  st, _ = short.score(requests)
  ref_t = _hf_loglikelihoods(hf, [r[0][-21:] for r in requests], [r[1] for r in requests])
  np.testing.assert_allclose(st, ref_t, atol=1e-4, rtol=0)
  assert any(len(r[0]) > 21 for r in requests)
  with pytest.raises(ValueError, match="at least one token of context"):
    short.score([([5, 6], 2)])


def test_perplexity_matches_a_direct_sliding_window(model, tmp_path, rng):
  hf, config, params = model
  text = _words(rng, 70) + ".\n" + _words(rng, 30)
  tok = WordTokenizer()
  ids = [1] + tok.encode(text)
  scorer = LoglikelihoodScorer(config, params, max_len=24, batch_size=4)
  # transformers' documented recipe, window of max_len + 1 tokens.
  nll, prev_end, window = 0.0, 0, 25
  for begin in range(0, len(ids), 9):
    end = min(begin + window, len(ids))
    trg = end - prev_end if prev_end else end - 1
    nll -= _hf_loglikelihoods(hf, [ids[begin:end]], [trg])[0]
    prev_end = end
    if end == len(ids):
      break
  path = tmp_path / "t.txt"
  path.write_text(text)
  got = ppl.perplexity_of_file(str(path), tok, scorer, stride=9)
  assert got["num_tokens"] == len(ids) - 1 and got["num_windows"] > 3
  assert got["perplexity"] == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)
  assert got["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-5)
  # Every token scored once, whatever the stride.
  for stride in (1, 7, 24):
    reqs = ppl.window_requests(ids, 24, stride)
    assert sum(k for _, k in reqs) == len(ids) - 1
    assert all(len(w) <= 25 for w, _ in reqs)
  (tmp_path / "empty.txt").write_text("  \n")
  with pytest.raises(ValueError, match="empty.txt: the text file is empty"):
    ppl.perplexity_of_file(str(tmp_path / "empty.txt"), tok, scorer)
