"""The package's import structure: no cycles, imports at the top, contracts that catch a bad edge.

`lint-imports` (import-linter, `.importlinter`) runs in `.ci/run` itself; these tests check what it
does not count (indented imports) and that its contracts really fail on a forbidden edge.
"""

import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "monoformer_jax"
MAX_INDENTED_IMPORTS = 3


def _module_name(path):
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _own_imports(tree, module):
  """(node, imported module) for every import of our package in `tree`."""
  package = module.rsplit(".", 1)[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("monoformer_jax"):
          yield node, alias.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).rstrip(".")
      if base.startswith("monoformer_jax"):
        for alias in node.names:
          yield node, f"{base}.{alias.name}"


def _graph():
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  edges, indented = {}, []
  for name, path in modules.items():
    tree = ast.parse(path.read_text(), str(path))
    targets = set()
    for node, imported in _own_imports(tree, name):
      # `from pkg import module` names a module; `from module import function` names its module.
      target = imported if imported in modules else imported.rsplit(".", 1)[0]
      if target in modules and target != name:
        targets.add(target)
      if node.col_offset > 0:
        indented.append(f"{path.relative_to(ROOT)}:{node.lineno} {imported}")
    edges[name] = targets
  return edges, indented


def _cycles(edges):
  """Strongly connected components with more than one file (Tarjan, iterative)."""
  index, low, on_stack, stack, found = {}, {}, set(), [], []
  for start in edges:
    if start in index:
      continue
    work = [(start, iter(sorted(edges[start])))]
    index[start] = low[start] = len(index)
    stack.append(start)
    on_stack.add(start)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = len(index)
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(edges[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1:
          found.append(sorted(component))
  return found


def test_no_import_cycles_between_files():
  edges, _ = _graph()
  assert len(edges) > 50  # the walk found the package
  assert _cycles(edges) == []


def test_cycle_finder_finds_a_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_imports_of_the_package_sit_at_the_top():
  _, indented = _graph()
  assert len(indented) <= MAX_INDENTED_IMPORTS, "\n".join(indented)


def _lint_imports(package_root):
  env = dict(os.environ, PYTHONPATH=str(package_root))
  return subprocess.run(
      [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
      cwd=package_root,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )


@pytest.mark.parametrize(
    "importer, line",
    [
        ("inference/api.py", "from monoformer_jax.train import trainer"),
        ("model/mask.py", "from monoformer_jax.data import pipeline"),
        ("diffusion/objective.py", "from monoformer_jax.model import monoformer"),
        ("run/open.py", "from monoformer_jax.sampling import classes"),
    ],
)
def test_contracts_fail_on_a_forbidden_edge(tmp_path, importer, line):
  shutil.copytree(PACKAGE, tmp_path / "monoformer_jax", ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(ROOT / ".importlinter", tmp_path / ".importlinter")
  assert _lint_imports(tmp_path).returncode == 0  # the copy itself keeps every contract
  target = tmp_path / "monoformer_jax" / importer
  target.write_text(line + "\n" + target.read_text())
  result = _lint_imports(tmp_path)
  assert result.returncode != 0
  assert "BROKEN" in result.stdout, result.stdout[-2000:]
