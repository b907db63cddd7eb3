"""Reproducibility runs: a named end-to-end experiment (train, then evaluate) whose metrics are checked against
the expected results kept in the repo (configs/expected/<suite>.json), within stated tolerances.

  python -m camels_jax.repro --suite tiny [--workdir DIR] [--update]

Runs `python -m camels_jax.train` and `python -m camels_jax.evaluate` on the suite's config in a fresh
workdir (so nothing is resumed), reads <workdir>/train_results.json and <workdir>/eval/results.json, and
prints one row per metric: expected, got, difference, tolerance, the paper's number where the suite has one,
and ok / DRIFT / MISSING. Exits 1 when any metric drifts or is missing, 0 otherwise. `--update` rewrites the
expected values from this run (the tolerances and paper numbers stay).

A metric is named "<file>:<path>", file one of train / eval and path the '/'-joined keys inside that JSON file
(e.g. "eval:methods/camels/test/f1"). It passes when |got - expected| <= abs + rel * |expected|.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

from camels_jax import io_utils

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED_DIR = os.path.join(REPO_ROOT, "configs", "expected")
RESULT_FILES = {"train": "train_results.json", "eval": os.path.join("eval", "results.json")}


@dataclasses.dataclass(frozen=True)
class Suite:
  config: str  # config file, relative to the repo root
  overrides: tuple[str, ...] = ()  # extra command-line flags of both train and evaluate
  about: str = ""  # one line: what it runs and how long it takes


# Suites without a configs/expected/<suite>.json yet say so when run (ReproError), before any work.
SUITES = {
    "tiny": Suite("configs/tiny.py", about="every stage on a tiny random model; about 2 minutes on 2 CPU cores"),
    "default": Suite("configs/default.py",
                     about="README's main job (SmolLM2, generated documents); 23 min to 2 h 20 min on 2 CPU cores"),
    "squad_cpu": Suite("configs/camels_squad_cpu.py",
                       about="CaMeLS and the baselines on real SQuAD paragraphs, CPU-sized; 51-52 min on 2 CPU cores"),
}


class ReproError(Exception):
  """A suite that cannot run or be compared (bad name, broken expected file, a stage that failed)."""


def expected_path(suite: str) -> str:
  return os.path.join(EXPECTED_DIR, f"{suite}.json")


def load_expected(path: str) -> dict:
  """An expected-results file: {"metrics": {metric: {"value", "abs", "rel", optional "paper"}}}, checked."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ReproError(f"{path}: {e}") from None
  metrics = data.get("metrics") if isinstance(data, dict) else None
  if not isinstance(metrics, dict) or not metrics:
    raise ReproError(f"{path}: needs a non-empty object 'metrics'")
  for name, spec in metrics.items():
    if name.split(":", 1)[0] not in RESULT_FILES or ":" not in name:
      raise ReproError(f"{path}: metric {name!r} is not '<{'|'.join(RESULT_FILES)}>:<path>'")
    if not isinstance(spec, dict) or not {"value", "abs", "rel"} <= set(spec):
      raise ReproError(f"{path}: metric {name!r} needs 'value', 'abs' and 'rel'")
    for key in ("abs", "rel"):
      if not isinstance(spec[key], (int, float)) or spec[key] < 0:
        raise ReproError(f"{path}: metric {name!r}: {key!r} must be a number >= 0, not {spec[key]!r}")
  return data


def lookup(results: dict[str, dict], name: str):
  """The value of metric `name` in {"train": ..., "eval": ...} results, or None when absent."""
  parent, key = _parent(results, name)
  return parent.get(key) if parent is not None else None


def _parent(results: dict[str, dict], name: str) -> tuple[dict | None, str]:
  """(the dict that holds metric `name`'s last key, or None when a key on the way is missing; that key)."""
  file, path = name.split(":", 1)
  *keys, last = path.split("/")
  node = results.get(file)
  for key in keys:
    if not isinstance(node, dict) or key not in node:
      return None, last
    node = node[key]
  return (node if isinstance(node, dict) else None), last


def compare(expected: dict, results: dict[str, dict]) -> list[dict]:
  """One row per expected metric: name, expected, got, diff, tol, paper, status (ok / DRIFT / MISSING)."""
  rows = []
  for name, spec in expected["metrics"].items():
    got, want = lookup(results, name), spec["value"]
    row = {"metric": name, "expected": want, "got": got, "diff": None, "tol": None, "paper": spec.get("paper")}
    if want is None or got is None:  # a metric that is None by definition (e.g. an undefined ratio)
      row["status"] = "ok" if want is None and got is None and name_present(results, name) else "MISSING"
    elif not isinstance(got, (int, float)) or not isinstance(want, (int, float)):
      row["status"] = "ok" if got == want else "DRIFT"
    else:
      row["diff"] = got - want
      row["tol"] = spec["abs"] + spec["rel"] * abs(want)
      row["status"] = "ok" if math.isfinite(got) and abs(got - want) <= row["tol"] else "DRIFT"
    rows.append(row)
  return rows


def name_present(results: dict[str, dict], name: str) -> bool:
  parent, key = _parent(results, name)
  return parent is not None and key in parent


def table(rows: list[dict]) -> str:
  fmt = lambda x: "-" if x is None else (f"{x:+.3g}" if isinstance(x, float) and abs(x) < 1e-3 and x else
                                         f"{x:.6g}" if isinstance(x, (int, float)) else str(x))
  width = max(len(r["metric"]) for r in rows)
  lines = [f"{'metric':<{width}}  {'expected':>10} {'got':>10} {'diff':>10} {'tol':>9} {'paper':>7}  status"]
  for r in rows:
    lines.append(f"{r['metric']:<{width}}  {fmt(r['expected']):>10} {fmt(r['got']):>10} {fmt(r['diff']):>10} "
                 f"{fmt(r['tol']):>9} {fmt(r['paper']):>7}  {r['status']}")
  return "\n".join(lines)


def run_suite(suite: str, workdir: str, python: str = sys.executable) -> dict[str, dict]:
  """Trains and evaluates `suite` in `workdir` (which must not hold an earlier run); returns its results."""
  s = SUITES[suite]
  workdir = os.path.abspath(workdir)
  for entry in ("train", "evaluate"):
    cmd = [python, "-m", f"camels_jax.{entry}", "--config", os.path.join(REPO_ROOT, s.config),
           f"--workdir={workdir}", *s.overrides]
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=REPO_ROOT, check=False).returncode:
      raise ReproError(f"suite {suite!r}: `{' '.join(cmd)}` failed (its log: {workdir}/log.txt)")
  return read_results(workdir)


def read_results(workdir: str) -> dict[str, dict]:
  """{"train": train_results.json, "eval": eval/results.json} of a finished run."""
  results = {}
  for file, rel in RESULT_FILES.items():
    path = os.path.join(workdir, rel)
    try:
      with open(path, encoding="utf-8") as f:
        results[file] = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ReproError(f"{path}: {e}") from None
  return results


def update(expected: dict, results: dict[str, dict], path: str) -> None:
  for name, spec in expected["metrics"].items():
    spec["value"] = lookup(results, name)
  io_utils.write_json(path, expected)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--suite", required=True, help=f"one of: {', '.join(SUITES)}")
  parser.add_argument("--workdir", default="", help="where the run writes (default: a temporary folder, "
                      "deleted afterwards); it must not hold an earlier run")
  parser.add_argument("--update", action="store_true", help="write this run's values as the expected ones")
  parser.add_argument("--compare_only", action="store_true", help="run nothing: compare the results already "
                      "in --workdir (a finished run of the suite)")
  parser.add_argument("--expected", default="", help="expected-results file (default: configs/expected/"
                      "<suite>.json)")
  args = parser.parse_args(argv)
  try:
    if args.suite not in SUITES:
      raise ReproError(f"--suite={args.suite!r} is not one of {list(SUITES)}")
    path = args.expected or expected_path(args.suite)
    expected = load_expected(path)
    t0 = time.perf_counter()
    if args.compare_only:
      if not args.workdir:
        raise ReproError("--compare_only needs --workdir, the finished run to compare")
      results = read_results(args.workdir)
    else:
      if args.workdir and os.path.exists(os.path.join(args.workdir, "config.json")):
        raise ReproError(f"--workdir={args.workdir} holds an earlier run; a reproduction starts from nothing "
                         "(or pass --compare_only)")
      workdir = args.workdir or tempfile.mkdtemp(prefix=f"repro_{args.suite}_")
      try:
        results = run_suite(args.suite, workdir)
      finally:
        if not args.workdir:
          shutil.rmtree(workdir, ignore_errors=True)
  except ReproError as e:
    print(f"repro: {e}", file=sys.stderr)
    return 2
  rows = compare(expected, results)
  print(f"\nsuite {args.suite!r} ({SUITES[args.suite].about}): "
        + ("compared" if args.compare_only else f"ran in {time.perf_counter() - t0:.0f} s")
        + f"; expected values from {path}")
  print(table(rows))
  bad = [r for r in rows if r["status"] != "ok"]
  if args.update:
    update(expected, results, path)
    print(f"updated {path} with this run's values")
    return 0
  print(f"{len(rows) - len(bad)} of {len(rows)} metrics within tolerance" + (
      f"; drifted or missing: {', '.join(r['metric'] for r in bad)}" if bad else ""))
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
