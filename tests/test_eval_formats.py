"""Task formats, tokenisation split, metrics and input errors of the multiple-choice scorer."""

import json

import numpy as np
import pytest

from monoformer_jax.evaluation import multiple_choice as mc
from monoformer_jax.evaluation.loglikelihood import _bucket, _pack


def test_each_format_by_hand():
  ex = mc.hellaswag(
      {
          "activity_label": "Baking cookies",
          "ctx_a": "A woman mixes dough.",
          "ctx_b": "she",
          "label": "1",
          "endings": ["bakes it [title] done.", " puts it [step] in the oven.", "x", "y"],
      }
  )
  assert ex.contexts[0] == "Baking cookies: A woman mixes dough. She"
  assert ex.choices[:2] == ("bakes it. done.", "puts it in the oven.") and ex.gold == 1
  assert ex.continuation(1) == " puts it in the oven."
  arc = mc.arc(
      {
          "question": "Which is a metal?",
          "answerKey": "3",
          "choices": {"text": ["wood", "glass", "iron"], "label": ["1", "2", "3"]},
      }
  )
  assert arc.contexts == ("Question: Which is a metal?\nAnswer:",) * 3 and arc.gold == 2
  nested = mc.arc(
      {
          "question": {"stem": "Q?", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]},
          "answerKey": "B",
      }
  )
  assert nested.choices == ("a", "b") and nested.gold == 1
  obqa = mc.openbookqa(
      {"question_stem": "The sun is", "answerKey": " A", "choices": {"text": ["hot", "cold"], "label": ["A", "B"]}}
  )
  assert obqa.contexts[0] == "The sun is" and obqa.gold == 0
  wino = mc.winogrande(
      {"sentence": "Ann gave Sue the book because _ had read it.", "option1": "Ann", "option2": "Sue", "answer": "1"}
  )
  assert wino.contexts == ("Ann gave Sue the book because Ann", "Ann gave Sue the book because Sue")
  assert wino.choices == ("had read it.",) * 2 and wino.continuation(0) == " had read it."
  bq = mc.boolq({"passage": "P.", "question": "is it", "answer": False})
  assert bq.contexts[0] == "P.\nQuestion: is it?\nAnswer:" and bq.choices == ("no", "yes")
  assert bq.gold == 0 and mc.boolq({"passage": "P.", "question": "q", "label": 1}).gold == 1
  pq = mc.piqa({"goal": "Dry hair", "sol1": "use a towel", "sol2": "use water", "label": 0})
  assert pq.contexts[1] == "Question: Dry hair\nAnswer:" and pq.choices[1] == "use water"
  assert mc.task_format("arc_e").name == "arc_easy" and mc.task_format("obqa").headline == "acc_norm"


def test_metrics_by_hand():
  examples = [
      mc.Example(("c",) * 2, ("short", "a much longer one"), gold=1),  # 5 vs 17 chars
      mc.Example(("c",) * 3, ("aa", "bb", "cc"), gold=2),
  ]
  # Example 1: sums -10 vs -12 -> acc picks 0 (wrong); per char -2.0 vs -0.71 -> acc_norm picks 1.
  # Example 2: -3, -2, -1 -> both pick 2 (right).
  got = mc.metrics(examples, [-10.0, -12.0, -3.0, -2.0, -1.0])
  assert got == {"acc": 0.5, "acc_norm": 1.0, "num_examples": 2}
  with pytest.raises(ValueError, match="4 log-likelihoods for 5 choices"):
    mc.metrics(examples, [0.0] * 4)


class CharTokenizer:
  bos_id = 0

  def encode(self, text):
    return [ord(c) for c in text]


def test_encode_pair_moves_trailing_space_into_the_continuation():
  ids, n = mc.encode_pair(CharTokenizer(), "Answer: ", "yes")
  assert ids == [0] + [ord(c) for c in "Answer: yes"] and n == 4  # " yes"
  ids, n = mc.encode_pair(CharTokenizer(), "", "hi", add_bos=False)
  assert ids == [0, ord("h"), ord("i")] and n == 2  # BOS stands in for the empty context
  ids, n = mc.encode_pair(CharTokenizer(), "ab", "c", add_bos=False)
  assert ids == [97, 98, 99] and n == 1


def test_packing_and_buckets(rng):
  lengths = list(rng.integers(1, 300, 200))
  rows = _pack(lengths, 128)
  assert sorted(i for r in rows for i in r) == list(range(200))
  for r in rows:
    assert len(r) == 1 or sum(lengths[i] for i in r) <= 128
  assert _bucket(17, 16, 512) == 32 and _bucket(300, 16, 400) == 400 and _bucket(3, 16, 512) == 16


@pytest.mark.parametrize(
    "line, message",
    [
        ("[1, 2]", "piqa.jsonl:2: expected a JSON object"),
        ('{"goal": "g", "sol1": "a", "label": 0}', "piqa.jsonl:2: bad piqa record: missing field 'sol2'"),
        ('{"goal": "g", "sol1": "a", "sol2": "b", "label": ""}', "piqa.jsonl:2: .*unlabelled"),
        ('{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}', "piqa.jsonl:2: .*out of range"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, line, message):
  good = json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 1})
  (tmp_path / "piqa.jsonl").write_text(good + "\n" + line + "\n")
  with pytest.raises(ValueError, match=message):
    mc.read_examples("piqa", str(tmp_path / "piqa.jsonl"))


def test_missing_files_and_unknown_tasks(tmp_path):
  with pytest.raises(FileNotFoundError, match="hellaswag.jsonl"):
    mc.evaluate_tasks(None, CharTokenizer(), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="arc_easy: no such file .*arc_easy.jsonl"):
    mc.evaluate_tasks(None, CharTokenizer(), str(tmp_path), tasks=["arc_e"])
  with pytest.raises(ValueError, match="unknown task 'mmlu'"):
    mc.task_format("mmlu")
  (tmp_path / "w.jsonl").write_text(json.dumps({"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}))
  with pytest.raises(ValueError, match="w.jsonl:1: .*0 '_' blanks"):
    mc.read_examples("winogrande", str(tmp_path / "w.jsonl"))
