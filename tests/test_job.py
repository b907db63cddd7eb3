"""The job layer (camels_jax/job.py) and the direction of imports: entry point -> job -> library, config
files that load without the evaluation, and no module that imports a module importing it back."""

import ast
import fnmatch
import os
import subprocess
import sys

import ml_collections
import pytest

from camels_jax import checks, job
from tests.tiny_config import REPO, load_config

PACKAGE = os.path.join(REPO, "camels_jax")
ENTRY_POINTS = {"camels_jax.train", "camels_jax.evaluate", "camels_jax.perplexity", "camels_jax.repro", "camels_jax.update",
                "camels_jax.ask", "camels_jax.export", "camels_jax.pool"}
# What only entry points may import: each other, the command-line layer, the job layer.
UPPER = ENTRY_POINTS | {"camels_jax.cli", "camels_jax.job"}


def _modules() -> dict[str, str]:
  """{dotted module name: path} of every module of the package."""
  found = {}
  for root, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, name), REPO)[:-3].replace(os.sep, ".")
        found[rel.removesuffix(".__init__")] = os.path.join(root, name)
  return found


def _imports(path: str, modules=frozenset()) -> set[str]:
  """Every module `path` imports, at module level or inside a function (absolute names); `modules`: the
  package's modules (to tell `from pkg import module` from `from module import name`)."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      # `from pkg import mod` imports pkg.mod (pkg's __init__ runs, but that is not an import of pkg's names)
      subs = {f"{node.module}.{a.name}" for a in node.names}
      names |= subs if subs <= set(modules) else {node.module}
  return names


def _internal(names: set[str], modules) -> set[str]:
  """The package's own modules among `names` (the package itself, `from camels_jax import x`, left out)."""
  return {n for n in names if n in modules and n != "camels_jax"}


def test_imports_run_one_way():
  modules = _modules()
  graph = {m: _internal(_imports(p, modules), modules) for m, p in modules.items()}
  for m, deps in graph.items():
    if m in ENTRY_POINTS:
      assert not deps & ENTRY_POINTS, f"{m} imports another entry point: {deps & ENTRY_POINTS}"
    elif m == "camels_jax.job":
      assert not deps & (UPPER - {m}), f"the job layer imports {deps & UPPER}"
    elif m != "camels_jax.cli":
      assert not deps & UPPER, f"library module {m} imports {deps & UPPER}"
  cli_imports = _internal(_imports(modules["camels_jax.cli"], modules), modules)
  assert cli_imports <= {"camels_jax.checks", "camels_jax.interrupts", "camels_jax.io_utils",
                        "camels_jax.sharding"}, cli_imports


def test_no_two_modules_import_each_other_and_none_shadows_a_package():
  modules = _modules()
  graph = {m: _internal(_imports(p, modules), modules) for m, p in modules.items()}
  cycles = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps if a in graph.get(b, ())})
  assert not cycles, cycles
  for m, path in modules.items():
    leaf = m.rsplit(".", 1)[-1]
    tops = {n.split(".")[0] for n in _imports(path)}
    assert leaf == "camels_jax" or leaf not in tops, f"{m} has the name of the package {leaf} it imports"


def test_config_files_load_without_the_evaluation_or_the_cli():
  code = ("import glob, sys\n"
          "from camels_jax import config_files\n"
          "for path in sorted(glob.glob('configs/*.py')):\n"
          "  config_files.load(path)\n"
          "print(sorted(m for m in sys.modules if m in {'camels_jax.evaluation', 'camels_jax.plots', "
          "'camels_jax.report', 'camels_jax.cli', 'camels_jax.job', 'camels_jax.train', 'matplotlib'}))\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == "[]", result.stdout


def test_safe_on_resume_names_fields_of_the_job():
  fields = list(checks.flat_rules(job.RULES))
  for pattern in job.SAFE_ON_RESUME:
    assert fnmatch.filter(fields, pattern), f"SAFE_ON_RESUME has {pattern!r}, which no field of job.RULES matches"


def test_jobs_of_keeps_the_order_and_drops_blanks():
  assert job.jobs_of(ml_collections.ConfigDict({"jobs": " qa_tune, camels,,mac "})) == ["qa_tune", "camels", "mac"]


def test_paths_of_the_wrong_kind_fail_before_anything_loads(tmp_path):
  a_file, a_dir = tmp_path / "notes.txt", tmp_path / "folder"
  a_file.write_text("text\n")
  a_dir.mkdir()
  job.expect_file(str(a_file), "x")
  job.expect_file("", "x")
  job.expect_dir(str(a_dir), "x")
  job.expect_dir(str(tmp_path / "missing"), "x")  # created later by whoever writes there
  with pytest.raises(job.PathKindError, match=f"^{a_dir}: is a directory, where a file is expected \\(x\\)"):
    job.expect_file(str(a_dir), "x")
  with pytest.raises(job.PathKindError, match=f"^{a_file}: is a file, where a directory is expected \\(x\\)"):
    job.expect_dir(str(a_file), "x")

  config = load_config("tiny")
  cases = {"data.data_dir": (str(a_file), "is a file, where a directory is expected (data.data_dir"),
           "data.loc_path": (str(a_dir), "is a directory, where a file is expected (data.loc_path")}
  for key, (value, message) in cases.items():
    c = ml_collections.ConfigDict(config.to_dict())
    section, field = key.split(".")
    c[section][field] = value
    with pytest.raises(checks.UserError) as e:
      job.check_sources(c)
    assert message in str(e.value), str(e.value)
    with pytest.raises(checks.UserError, match=message.replace("(", "\\(")):
      job.check_eval_sources(c, str(tmp_path))
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.dataset, c.data.path = "squad", f"{a_file}, {a_dir}"
  with pytest.raises(job.PathKindError, match=f"^{a_dir}: is a directory, where a file is expected \\(data.path"):
    job.check_sources(c)
