"""Docs that cannot rot: README.md, CONTRIBUTING.md and docs/*.md are checked against the code.

  * every relative link (and image) resolves to a file of the repository, and a `#anchor` to a
    heading of the page it names (GitHub's slugs);
  * every `python -m monoformer_jax.X ...` command shown (fenced blocks and inline code,
    backslash-continued lines joined), and every `launch/*` command (they hand their arguments
    to `monoformer_jax.main`), names an entry point that exists, and its flags parse as that
    entry point parses them: the flags it defines (`--noflag` forms included), `--config.FIELD`
    overrides naming a field of the config file given, the config file and its `:variant`
    loading. Nothing runs: only `define_flags` and the flag parser are called;
  * every `configs/FILE.py:VARIANT` named anywhere loads (`get_config(VARIANT)`), and every
    repository path written in code (`benchmarks/X.py`, `launch/...`, `tests/...`) exists.

The checker's own tests at the bottom feed it a broken link, an unknown flag, an unknown config
field and an unknown variant, and assert that each is reported."""

import contextlib
import glob
import importlib
import importlib.util
import os
import re
import shlex
import urllib.parse

import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "CONTRIBUTING.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))
# Entry points that take positional arguments (a golden directory), and how many.
POSITIONAL = {"monoformer_jax.tools.check_official": 1, "monoformer_jax.tools.check_diffusion": 1}
# Shell words that end a command (a pipe, a redirection, the next command).
SHELL_ENDS = {"|", "||", "&&", ";", "&", ">", ">>", "2>", "2>&1", "<"}
# Folders whose paths, written in code, must exist (other paths are the reader's: runs/, DIR/, ...).
REPO_FOLDERS = ("benchmarks", "configs", "docs", "launch", "monoformer_jax", "notebooks", "tests")

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
LINK_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
HTML_LINK = re.compile(r"<(?:a|img)\s[^>]*?(?:href|src)\s*=\s*[\"']([^\"']+)[\"']", re.I)
HTML_ANCHOR = re.compile(r"<a\s[^>]*?(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.I)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
COMMAND_START = re.compile(
    r"(?:^|\s)(?:python3?\s+-m\s+(monoformer_jax(?:\.\w+)*)"
    r"|(launch/tpu_pod\.sh|launch/local_multiprocess\.sh|launch/gpu_slurm\.sbatch)"
    r"|python3?\s+(benchmarks/\S+\.py))(?=\s|$)"
)
CONFIG_MENTION = re.compile(r"(?<![\w./-])configs/([a-z0-9_]+)\.py(?::([a-z0-9_]+(?:,[a-z0-9_]+)*))?")
BARE_CONFIG_MENTION = re.compile(r"(?<![\w./-])([a-z0-9_]+)\.py:([a-z0-9_]+(?:,[a-z0-9_]+)*)")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")
REPO_PATH = re.compile(rf"(?<![\w./-])((?:{'|'.join(REPO_FOLDERS)})/[\w./*-]*\w)")


# ----------------------------------------------------------------------------------------------
# Reading a page: prose, code blocks, inline code.


def split_page(text: str) -> tuple[str, list[str]]:
  """(the prose with fenced blocks blanked out, the fenced blocks' bodies)."""
  blocks = [m.group(0).split("\n", 1)[1].rsplit("\n", 1)[0] for m in FENCE.finditer(text)]
  prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
  return prose, blocks


def code_texts(text: str) -> list[str]:
  """Every piece of code of a page: the fenced blocks and the inline spans of the prose."""
  prose, blocks = split_page(text)
  return blocks + [m.group(1).replace("\n", " ") for m in INLINE_CODE.finditer(prose)]


def github_slug(heading: str) -> str:
  """The anchor GitHub gives a heading: its rendered text lower-cased, punctuation dropped
  (letters, digits, `_`, `-` and spaces kept), spaces as hyphens."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
  text = re.sub(r"<[^>]+>", "", text).replace("`", "")
  text = re.sub(r"[^\w\- ]", "", text.lower())
  return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
  """The anchors of a page: its headings' slugs (repeats numbered -1, -2, ... as GitHub does)
  and explicit `<a name=...>` / `id=...` anchors."""
  prose, _ = split_page(text)
  seen, out = {}, set()
  for heading in HEADING.findall(prose):
    slug = github_slug(heading)
    out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
    seen[slug] = seen.get(slug, 0) + 1
  return out | set(HTML_ANCHOR.findall(prose))


# ----------------------------------------------------------------------------------------------
# (a) links.


def link_targets(text: str) -> list[str]:
  prose, _ = split_page(text)
  prose = INLINE_CODE.sub("", prose)
  return LINK.findall(prose) + LINK_DEFINITION.findall(prose) + HTML_LINK.findall(prose)


def check_links(text: str, page: str) -> list[str]:
  """Problems of the relative links of `text`, a page at `page` (relative to the repository)."""
  problems = []
  for target in link_targets(text):
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):  # https:, mailto:
      continue
    path, _, anchor = urllib.parse.unquote(target).partition("#")
    path = path.split("?")[0]
    if path:
      full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path))
      if os.path.relpath(full, ROOT).startswith(".."):
        problems.append(f"{page}: link {target!r} leaves the repository")
        continue
      if not os.path.exists(full):
        problems.append(f"{page}: link {target!r}: no such file {os.path.relpath(full, ROOT)}")
        continue
    if anchor and (not path or full.endswith(".md")):
      if path:
        with open(full, encoding="utf-8") as f:
          text_there = f.read()
      else:
        full, text_there = os.path.join(ROOT, page), text
      if anchor not in anchors(text_there):
        problems.append(f"{page}: link {target!r}: no heading #{anchor} in {os.path.relpath(full, ROOT)}")
  return problems


# ----------------------------------------------------------------------------------------------
# (b) commands.


def _command_words(line: str) -> list[str]:
  """The words of one command line, optional parts (`[--port 8000]`, `[--a | --b X]`) taken as
  given, up to the end of the command (a pipe, `&&`, a redirection, a comment)."""
  words, depth = [], 0
  for word in shlex.split(line, comments=True):
    depth += word.count("[") if word.startswith("[") else 0
    if depth == 0 and word in SHELL_ENDS:
      break
    opened = word.startswith("[")
    word = word.lstrip("[") if opened else word
    if depth and word.endswith("]"):
      depth -= 1
      word = word[:-1]
    if word and word not in ("|", "..."):
      words.append(word)
  return words


def commands(text: str) -> list[list[str]]:
  """The commands shown in a page: [program, arguments...], program a module name
  (`monoformer_jax.sample`), a launch script or a benchmark script."""
  out = []
  for code in code_texts(text):
    code = re.sub(r"\\\n\s*", " ", code)
    for line in code.split("\n"):
      for m in COMMAND_START.finditer(line):
        program = m.group(1) or m.group(2) or m.group(3)
        try:
          out.append([program] + _command_words(line[m.end() :]))
        except ValueError as e:  # unbalanced quotes
          out.append([program, f"<cannot split: {e}>"])
  return out


def _entry_point(name: str):
  """The module `python -m name` runs (a package runs its __main__)."""
  if importlib.util.find_spec(name) is None:
    raise ImportError(name)
  module = importlib.import_module(name)
  if hasattr(module, "__path__"):
    module = importlib.import_module(f"{name}.__main__")
  return module


def _launch_arguments(script: str, args: list[str]) -> list[str]:
  """What a launch script hands to `monoformer_jax.main`."""
  if script.endswith("tpu_pod.sh") and args[:1] == ["--dry_run"]:
    return args[1:]
  if script.endswith("local_multiprocess.sh"):
    if not args or not args[0].isdigit():
      raise ValueError(f"{script} takes the number of processes first")
    return args[1:]
  return args


def check_command(words: list[str]) -> str | None:
  """Why the command `words` would not get past its flag parsing (None: it would)."""
  program, args = words[0], words[1:]
  shown = " ".join(words)
  if program.startswith(("launch/", "benchmarks/")) and not os.path.isfile(os.path.join(ROOT, program)):
    return f"{shown}: no such file {program}"
  if program.startswith("benchmarks/"):
    return None
  if program.startswith("launch/"):
    try:
      program, args = "monoformer_jax.main", _launch_arguments(words[0], args)
    except ValueError as e:
      return f"{shown}: {e}"
  try:
    module = _entry_point(program)
  except ImportError:
    return f"{shown}: no module {program}"
  if not hasattr(module, "define_flags"):
    return f"{shown}: {program} is not an entry point (no define_flags)"
  if not args or any(a in ("--help", "-h", "--helpfull") for a in args):
    return None
  fv = flags.FlagValues()
  argv = ["prog"] + args
  try:
    with contextlib.chdir(ROOT):  # config files are named relative to the root, where commands run
      module.define_flags(fv, argv)
      rest = fv(argv)[1:]
      for name in fv:  # a config file that did not load fails only when it is read
        if type(fv[name].value).__module__.startswith("ml_collections"):
          list(fv[name].value.keys())
  except Exception as e:  # pylint: disable=broad-except  # absl, ml_collections and config errors alike
    message = e  # a locked config raises AttributeError(KeyError(str)) for a field it lacks
    while isinstance(message, (KeyError, AttributeError)) and message.args:
      message = message.args[0]
    message = str(message).strip()
    if "Traceback" in message:  # a config file that raised: its exception, the traceback's last line
      message = message.splitlines()[-1]
    return f"{shown}: {type(e).__name__}: {' '.join(message.split())[:400]}"
  if len(rest) != POSITIONAL.get(program, 0):
    return f"{shown}: {len(rest)} positional arguments {rest} (takes {POSITIONAL.get(program, 0)})"
  return None


def check_commands(text: str, page: str) -> list[str]:
  return [f"{page}: {problem}" for problem in map(check_command, commands(text)) if problem]


# ----------------------------------------------------------------------------------------------
# (c) configs and repository paths.


def load_config(name: str, variant: str):
  """configs/NAME.py's get_config(variant), as `--config=configs/NAME.py:variant` loads it."""
  return importlib.import_module(f"configs.{name}").get_config(variant)


def config_mentions(text: str) -> set[tuple[str, str]]:
  """(file name, variant or "") of every config a page names: `configs/NAME.py[:VARIANT]`, and
  `NAME.py:VARIANT` where configs/NAME.py exists."""
  found = set(CONFIG_MENTION.findall(text))
  for name, variant in BARE_CONFIG_MENTION.findall(text):
    if os.path.isfile(os.path.join(ROOT, "configs", f"{name}.py")):
      found.add((name, variant))
  return found


def check_configs(text: str, page: str) -> list[str]:
  problems = []
  for name, variant in sorted(config_mentions(text)):
    shown = f"configs/{name}.py" + (f":{variant}" if variant else "")
    if not os.path.isfile(os.path.join(ROOT, "configs", f"{name}.py")):
      problems.append(f"{page}: {shown}: no such file")
    elif variant:
      try:
        load_config(name, variant)
      except Exception as e:  # pylint: disable=broad-except  # whatever stops the config loading
        problems.append(f"{page}: {shown} does not load: {type(e).__name__}: {e}")
  return problems


def check_repo_paths(text: str, page: str) -> list[str]:
  """Repository paths written in code (`benchmarks/ablations.py`, `tests/test_inference_*.py`);
  a path with an upper-case name in it (`configs/NAME.py`, `benchmarks/X.py`) is a placeholder."""
  problems = []
  for code in code_texts(text):
    for path in REPO_PATH.findall(code):
      path = path.split(":")[0]
      if any(PLACEHOLDER.fullmatch(part.split(".")[0]) for part in path.split("/")):
        continue
      if not glob.glob(os.path.join(ROOT, path)):
        problems.append(f"{page}: `{path}`: no such file in the repository")
  return problems


def check_page(page: str, text: str | None = None) -> list[str]:
  if text is None:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
      text = f.read()
  return (
      check_links(text, page)
      + check_commands(text, page)
      + check_configs(text, page)
      + sorted(set(check_repo_paths(text, page)))
  )


# ----------------------------------------------------------------------------------------------
# The tests.


@pytest.mark.parametrize("page", DOCS)
def test_page_links_commands_and_configs_hold(page):
  problems = check_page(page)
  assert not problems, "\n".join(problems)


def test_the_docs_show_commands_and_links_to_check():
  """The checker reads what the pages hold: a page with no command found would pass unread."""
  texts = {page: open(os.path.join(ROOT, page), encoding="utf-8").read() for page in DOCS}
  assert "docs/README.md" in texts
  for page in ("docs/training.md", "docs/sampling.md", "docs/scaling.md", "docs/evaluation.md"):
    assert len(commands(texts[page])) >= 3, page
  assert sum(len(link_targets(t)) for t in texts.values()) >= 30
  assert sum(len(config_mentions(t)) for t in texts.values()) >= 10


PAGE = "docs/training.md"  # where the bad pages below pretend to sit


def test_a_broken_link_or_anchor_is_reported():
  text = (
      "# Top heading\n\n## The `sample` command: flags\n\n"
      "[ok](../README.md) [ok](#the-sample-command-flags) [ok](recipes.md#the-papers-four-recipes)\n"
      "[gone](missing.md) [bad anchor](#no-such-heading) ![gone](images/none.png) [out](../../x.md)\n"
      "[ok](https://example.com/missing.md) `[not a link](nowhere.md)`\n"
      "```\n[not a link either](nowhere.md)\n```\n"
      '<img src="images/absent.png">\n'
  )
  problems = check_links(text, PAGE)
  assert len(problems) == 5, problems
  for bad in ("missing.md", "#no-such-heading", "images/none.png", "../../x.md", "images/absent.png"):
    assert any(repr(bad) in p for p in problems), (bad, problems)


def test_github_slugs():
  assert (
      github_slug("The paper's recipe on a TPU pod slice, from zero")
      == "the-papers-recipe-on-a-tpu-pod-slice-from-zero"
  )
  assert github_slug("`sample` --dtype / --mesh") == "sample---dtype----mesh"
  assert anchors("# A\n## A\n```\n# not a heading\n```\n# B_c\n") == {"a", "a-1", "b_c"}


def test_an_unknown_flag_is_reported_and_a_good_command_is_not():
  good = (
      "```bash\npython -m monoformer_jax.sample --workdir runs/x --classes 0,1 \\\n"
      "    --num_per_class 2 --nouse_ema --out x.npz   # a comment\n```\n"
      "and `python -m monoformer_jax.demo --workdir runs/x [--port 8000]`, "
      "`python -m monoformer_jax.tools.check_official tests/testdata/model_adaln`.\n"
  )
  assert len(commands(good)) == 3
  assert check_commands(good, PAGE) == []
  for bad in (
      "python -m monoformer_jax.sample --workdir runs/x --no_such_flag 3",
      "python -m monoformer_jax.sample --workdir runs/x --nogreedy_typo",
      "python -m monoformer_jax.sample --workdir runs/x --num_steps ten",
      "python -m monoformer_jax.no_such_module --workdir runs/x",
      "python -m monoformer_jax.main --config=configs/mnist_tiny.py --workdir=runs/x stray",
      "python benchmarks/no_such_benchmark.py --workdir runs/x",
      "launch/local_multiprocess.sh --config=configs/mnist_tiny.py --workdir=runs/x",
  ):
    problems = check_commands(f"`{bad}`", PAGE)
    assert len(problems) == 1, (bad, problems)


def test_an_unknown_config_field_or_variant_is_reported():
  for bad, words in (
      ("--config.optimizer.no_such_field=1", "no_such_field"),
      ("--config.optimiser.learning_rate=1e-3", "optimiser"),
  ):
    command = f"python -m monoformer_jax.main --config=configs/mnist_tiny.py --workdir=runs/x {bad}"
    problems = check_commands(f"```\n{command}\n```", PAGE)
    assert len(problems) == 1 and words in problems[0], problems
  problems = check_commands("`launch/tpu_pod.sh --config=configs/mnist_tiny.py:no_such_variant --workdir=x`", PAGE)
  assert len(problems) == 1 and "no_such_variant" in problems[0], problems
  problems = check_commands("`launch/local_multiprocess.sh 2 --config=configs/no_such_config.py --workdir=x`", PAGE)
  assert len(problems) == 1 and "no_such_config.py" in problems[0], problems
  evaluate = "python -m monoformer_jax.evaluate --workdir runs/x --config.eval.no_such_suite_field=1"
  assert len(check_commands(f"`{evaluate}`", PAGE)) == 1
  good = "`configs/mnist_tiny.py:all_in_one,test` and `mnist_tiny.py:latent`, `run/config.py:resolve_config`"
  assert check_configs(good, PAGE) == []
  assert config_mentions(good) == {("mnist_tiny", "all_in_one,test"), ("mnist_tiny", "latent")}
  for bad in ("configs/mnist_tiny.py:no_such_variant", "mnist_tiny.py:no_such_variant", "configs/no_such_file.py"):
    problems = check_configs(f"`{bad}`", PAGE)
    assert len(problems) == 1, (bad, problems)


def test_a_missing_repository_path_is_reported():
  text = "`benchmarks/mnist_quality.py`, `tests/test_inference_*.py`, `monoformer_jax/cli.py:main`, `runs/x/y.png`"
  assert check_repo_paths(text, PAGE) == []
  assert check_repo_paths("`configs/NAME.py:VARIANT`, `benchmarks/X.py`", PAGE) == []
  problems = check_repo_paths("`benchmarks/no_such.py` and `launch/none.sh`", PAGE)
  assert len(problems) == 2, problems
