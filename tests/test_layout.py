"""The package's shape: functions stay short (the direction of imports is tests/test_job.py's)."""

import ast
import pathlib
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "camels_jax"
# Functions allowed past MAX_LINES, each with the reason.
LONG_FUNCTIONS = {
    # transformers 4.27's group beam search, step for step: split, its correspondence with the original is lost.
    ("models/decoding.py", "diverse_beam_search"),
}
MAX_LINES = 80


def _modules():
  return sorted(p for p in PACKAGE.rglob("*.py"))


def test_no_function_is_longer_than_80_lines():
  long = []
  for path in _modules():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        key = (path.relative_to(PACKAGE).as_posix(), node.name)
        if node.end_lineno - node.lineno + 1 > MAX_LINES and key not in LONG_FUNCTIONS:
          long.append(f"{key[0]}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
  assert not long, long


def test_the_length_check_can_fail(tmp_path, monkeypatch):
  (tmp_path / "long.py").write_text("def f():\n" + "  x = 1\n" * MAX_LINES)
  monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
  with pytest.raises(AssertionError, match="long.py:1 f"):
    test_no_function_is_longer_than_80_lines()
