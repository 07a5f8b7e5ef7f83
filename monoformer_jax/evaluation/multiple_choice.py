"""Zero-shot multiple-choice benchmarks scored the lm-eval-harness way, from local JSONL files.

Each choice is a (context, continuation) pair; its score is the sum of the continuation tokens'
log-likelihoods given the context. Reported per task:
  acc       fraction of examples whose highest-scoring choice is the gold one;
  acc_norm  the same with each score divided by the length of the choice text in characters (the
            harness's length normalisation; the delimiter space is not counted).
`headline` names the metric the TinyLlama/MonoFormer tables quote for the task.

Tokenisation follows the harness: trailing whitespace of the context moves to the continuation,
the context and context + continuation are encoded separately, and the continuation tokens are the
whole encoding's tokens after the context's. A BOS token starts every context (LLaMA models are
trained with one); `add_bos=False` leaves it out except where the context would be empty.

Expected JSONL fields per task (one JSON object per line; the Hugging Face datasets' names):
  hellaswag      activity_label, ctx_a, ctx_b, endings [4], label ("0".."3" or int)
  openbookqa     question_stem, choices {text [], label []}, answerKey
  winogrande     sentence (one "_" blank), option1, option2, answer ("1"/"2")
  arc_easy       question, choices {text [], label []}, answerKey ("A".. or "1"..)
  arc_challenge  same as arc_easy
  boolq          passage, question, label (0/1; super_glue) or answer (bool; google/boolq)
  piqa           goal, sol1, sol2, label (0/1)
ARC and OpenBookQA also accept their original release layout:
  {"question": {"stem": ..., "choices": [{"text", "label"}, ...]}, "answerKey": ...}.
A task's file is TASKS_DIR/<name>.jsonl (the names above).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
from etils import epath


class TextTokenizer(Protocol):
  bos_id: int

  def encode(self, text: str) -> list[int]:
    ...


@dataclasses.dataclass(frozen=True)
class Example:
  """One question: choice i is scored as contexts[i] + delimiter + choices[i]."""

  contexts: tuple[str, ...]
  choices: tuple[str, ...]
  gold: int
  delimiter: str = " "

  def continuation(self, i: int) -> str:
    return self.delimiter + self.choices[i]


class RecordError(ValueError):
  """A JSONL record that does not fit its task's format (the caller adds file:line)."""


def _field(record: dict, name: str):
  if name not in record:
    raise RecordError(f"missing field {name!r}")
  return record[name]


def _gold_index(labels: Sequence, key) -> int:
  labels = [str(x).strip() for x in labels]
  key = str(key).strip()
  if key not in labels:
    raise RecordError(f"answer {key!r} is not one of the choice labels {labels}")
  return labels.index(key)


def _int_label(value, num_choices: int) -> int:
  if isinstance(value, bool) or str(value).strip() == "":
    raise RecordError(f"label {value!r} is not a choice index (an unlabelled split?)")
  try:
    gold = int(value)
  except (TypeError, ValueError):
    raise RecordError(f"label {value!r} is not an integer") from None
  if not 0 <= gold < num_choices:
    raise RecordError(f"label {gold} is out of range for {num_choices} choices")
  return gold


def _same_context(context: str, choices, gold: int) -> Example:
  choices = tuple(str(c) for c in choices)
  if len(choices) < 2:
    raise RecordError(f"needs at least 2 choices, got {len(choices)}")
  return Example((context,) * len(choices), choices, gold)


def _hellaswag_clean(text: str) -> str:
  # WikiHow-derived text carries markup such as "[title]" and "[header]": a title becomes a
  # sentence break, any other bracketed tag is dropped, and the doubled spaces left are merged.
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def hellaswag(record: dict) -> Example:
  ctx = _field(record, "ctx_a") + " " + _field(record, "ctx_b").capitalize()
  context = _hellaswag_clean(_field(record, "activity_label") + ": " + ctx)
  endings = [_hellaswag_clean(e) for e in _field(record, "endings")]
  return _same_context(context, endings, _int_label(_field(record, "label"), len(endings)))


def _question_choices(record: dict, stem_field: str):
  """(question text, choice texts, choice labels) in the HF layout or the original nested one."""
  if not isinstance(record.get(stem_field), dict) and stem_field in record:
    choices = _field(record, "choices")
    return record[stem_field], list(_field(choices, "text")), list(_field(choices, "label"))
  question = record.get("question")
  if not isinstance(question, dict):  # neither layout
    raise RecordError(f"missing field {stem_field!r}")
  choices = _field(question, "choices")  # original ARC / OBQA release
  return (_field(question, "stem"), [_field(c, "text") for c in choices], [_field(c, "label") for c in choices])


def arc(record: dict) -> Example:
  question, texts, labels = _question_choices(record, "question")
  return _same_context(f"Question: {question}\nAnswer:", texts, _gold_index(labels, _field(record, "answerKey")))


def openbookqa(record: dict) -> Example:
  question, texts, labels = _question_choices(record, "question_stem")
  return _same_context(question, texts, _gold_index(labels, _field(record, "answerKey")))


def piqa(record: dict) -> Example:
  return _same_context(
      f"Question: {_field(record, 'goal')}\nAnswer:",
      [_field(record, "sol1"), _field(record, "sol2")],
      _int_label(_field(record, "label"), 2),
  )


def boolq(record: dict) -> Example:
  if "label" in record:
    gold = _int_label(record["label"], 2)
  else:
    answer = _field(record, "answer")
    if not isinstance(answer, bool):
      raise RecordError(f"answer {answer!r} is not a boolean")
    gold = int(answer)
  context = f"{_field(record, 'passage')}\nQuestion: {_field(record, 'question')}?\nAnswer:"
  return _same_context(context, ["no", "yes"], gold)


def winogrande(record: dict) -> Example:
  # Partial evaluation: the option fills the blank inside the context, and what is scored is the
  # shared rest of the sentence, so the options compete on how well they explain the ending.
  sentence = _field(record, "sentence")
  if sentence.count("_") != 1:
    raise RecordError(f"sentence has {sentence.count('_')} '_' blanks, expected exactly 1")
  blank = sentence.index("_")
  options = [_field(record, "option1"), _field(record, "option2")]
  suffix = sentence[blank + 1 :].strip()
  answer = str(_field(record, "answer")).strip()
  if answer not in ("1", "2"):
    raise RecordError(f"answer {answer!r} is not '1' or '2'")
  return Example(tuple(sentence[:blank] + o for o in options), (suffix, suffix), int(answer) - 1)


@dataclasses.dataclass(frozen=True)
class TaskFormat:
  name: str
  parse: Callable[[dict], Example]
  headline: str  # "acc" or "acc_norm"


TASKS = {
    t.name: t
    for t in (
        TaskFormat("hellaswag", hellaswag, "acc_norm"),
        TaskFormat("openbookqa", openbookqa, "acc_norm"),
        TaskFormat("winogrande", winogrande, "acc"),
        TaskFormat("arc_easy", arc, "acc_norm"),
        TaskFormat("arc_challenge", arc, "acc_norm"),
        TaskFormat("boolq", boolq, "acc"),
        TaskFormat("piqa", piqa, "acc_norm"),
    )
}
ALIASES = {"obqa": "openbookqa", "arc_e": "arc_easy", "arc_c": "arc_challenge"}


def task_format(name: str) -> TaskFormat:
  name = ALIASES.get(name, name)
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)} (aliases {sorted(ALIASES)})")
  return TASKS[name]


def read_examples(task: str, path: str, limit: Optional[int] = None) -> list[Example]:
  """The examples of a task's JSONL file (blank lines skipped); errors name file:line."""
  fmt = task_format(task)
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"{fmt.name}: no such file {path}")
  examples = []
  with epath.Path(path).open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if limit is not None and len(examples) >= limit:
        break
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
      try:
        examples.append(fmt.parse(record))
      except (RecordError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}:{number}: bad {fmt.name} record: {e}") from None
  if not examples:
    raise ValueError(f"{path}: no {fmt.name} examples")
  return examples


def encode_pair(
    tokenizer: TextTokenizer, context: str, continuation: str, add_bos: bool = True
) -> tuple[list[int], int]:
  """(tokens, number of continuation tokens) of one choice, the harness's way."""
  stripped = context.rstrip()
  continuation = context[len(stripped) :] + continuation
  context_ids = list(tokenizer.encode(stripped)) if stripped else []
  whole = list(tokenizer.encode(stripped + continuation))
  continuation_ids = whole[len(context_ids) :]
  if not continuation_ids:
    raise ValueError(f"continuation {continuation!r} encodes to no tokens after {stripped!r}")
  prefix = [tokenizer.bos_id] if add_bos or not context_ids else []
  return prefix + context_ids + continuation_ids, len(continuation_ids)


def requests_for(examples: Sequence[Example], tokenizer: TextTokenizer, add_bos: bool = True):
  """One scorer request per (example, choice), flattened in order."""
  return [
      encode_pair(tokenizer, ex.contexts[i], ex.continuation(i), add_bos)
      for ex in examples
      for i in range(len(ex.choices))
  ]


def metrics(examples: Sequence[Example], loglikelihoods: Sequence[float]) -> dict:
  """acc / acc_norm from the flattened per-choice log-likelihood sums."""
  total = sum(len(ex.choices) for ex in examples)
  if total != len(loglikelihoods):
    raise ValueError(f"{len(loglikelihoods)} log-likelihoods for {total} choices")
  correct, correct_norm, offset = 0, 0, 0
  for ex in examples:
    ll = np.asarray(loglikelihoods[offset : offset + len(ex.choices)], np.float64)
    offset += len(ex.choices)
    lengths = np.array([max(len(c), 1) for c in ex.choices], np.float64)
    correct += int(np.argmax(ll) == ex.gold)  # ties go to the first choice, as np.argmax does
    correct_norm += int(np.argmax(ll / lengths) == ex.gold)
  n = len(examples)
  return {"acc": correct / n, "acc_norm": correct_norm / n, "num_examples": n}


def evaluate_tasks(
    scorer,
    tokenizer: TextTokenizer,
    tasks_dir: str,
    tasks: Optional[Sequence[str]] = None,
    limit: Optional[int] = None,
    add_bos: bool = True,
    details: bool = False,
) -> dict:
  """{task: {acc, acc_norm, headline, num_examples}, "average": mean headline} over TASKS_DIR.

  `tasks=None` takes every known task whose file exists in the directory. All tasks' requests go
  to the scorer together, so they pack into the same batches. `details` adds each task's
  per-example choice log-likelihoods ("loglikelihoods") and gold indices ("gold").
  """
  if tasks is None:
    tasks = [t for t in TASKS if epath.Path(tasks_dir, f"{t}.jsonl").is_file()]
    if not tasks:
      raise FileNotFoundError(f"{tasks_dir}: none of {[t + '.jsonl' for t in TASKS]} exists")
  names = [task_format(t).name for t in tasks]
  loaded = {t: read_examples(t, os.path.join(tasks_dir, f"{t}.jsonl"), limit) for t in names}
  requests, counts = [], {}
  for t in names:
    task_requests = requests_for(loaded[t], tokenizer, add_bos)
    counts[t] = len(task_requests)
    requests.extend(task_requests)
  sums, _ = scorer.score(requests)
  report, offset = {}, 0
  for t in names:
    result = metrics(loaded[t], sums[offset : offset + counts[t]])
    offset += counts[t]
    result["headline"] = TASKS[t].headline
    if details:
      bounds = np.cumsum([0] + [len(ex.choices) for ex in loaded[t]])
      task_sums = sums[offset - counts[t] : offset]
      result["loglikelihoods"] = [task_sums[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]
      result["gold"] = [ex.gold for ex in loaded[t]]
    report[t] = result
  report["average"] = float(np.mean([report[t][report[t]["headline"]] for t in names]))
  return report
