"""camels_jax.repro: the tiny suite end to end against configs/expected/tiny.json, and the comparison rules."""

import glob
import json
import os
import subprocess
import sys

import pytest

from camels_jax import repro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _repro(*args):
  return subprocess.run([sys.executable, "-m", "camels_jax.repro", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=900)


@pytest.mark.slow  # the tiny suite end to end in a subprocess (~4 min on 2 cores)
def test_tiny_suite_reproduces_and_a_perturbed_expected_value_fails(tmp_path):
  workdir = str(tmp_path / "run")
  run = _repro("--suite", "tiny", f"--workdir={workdir}")
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  n = len(repro.load_expected(repro.expected_path("tiny"))["metrics"])
  assert f"{n} of {n} metrics within tolerance" in run.stdout

  expected = repro.load_expected(repro.expected_path("tiny"))
  name = "eval:methods/camels/test/nll"
  spec = expected["metrics"][name]
  tol = spec["abs"] + spec["rel"] * abs(spec["value"])
  for shift, code in ((0.5 * tol, 0), (2 * tol, 1)):
    spec_value = spec["value"]
    expected["metrics"][name] = dict(spec, value=spec_value + shift)
    path = tmp_path / f"expected_{code}.json"
    path.write_text(json.dumps(expected))
    expected["metrics"][name] = spec
    check = _repro("--suite", "tiny", f"--workdir={workdir}", "--compare_only", f"--expected={path}")
    assert check.returncode == code, check.stdout[-3000:]
    row = next(line for line in check.stdout.splitlines() if line.startswith(name + " "))
    assert row.endswith("DRIFT" if code else "ok"), row
  # A finished run is never overwritten by a new one.
  again = _repro("--suite", "tiny", f"--workdir={workdir}")
  assert again.returncode == 2 and "holds an earlier run" in again.stderr


def _expected(**metrics):
  return {"metrics": {k: dict({"abs": 0.0, "rel": 0.1}, **v) for k, v in metrics.items()}}


def test_compare_tolerance_missing_and_non_finite_values():
  results = {"train": {"a": {"b": 1.05, "c": None}}, "eval": {"x": float("nan"), "y": 0.0}}
  rows = {r["metric"]: r["status"] for r in repro.compare(_expected(**{
      "train:a/b": {"value": 1.0},  # within 10%
      "train:a/c": {"value": None},  # None by definition, and present
      "eval:x": {"value": 1.0},  # NaN never passes
      "eval:y": {"value": 1.0},  # outside 10%
      "eval:z": {"value": 1.0},  # absent
  }), results)}
  assert rows == {"train:a/b": "ok", "train:a/c": "ok", "eval:x": "DRIFT", "eval:y": "DRIFT", "eval:z": "MISSING"}


@pytest.mark.parametrize("content,message", [
    ("{", "Expecting"),
    ('{"metrics": {}}', "non-empty object 'metrics'"),
    ('{"metrics": {"test:a": {"value": 1, "abs": 0, "rel": 0}}}', "is not '<train|eval>:<path>'"),
    ('{"metrics": {"eval:a": {"value": 1, "abs": 0}}}', "needs 'value', 'abs' and 'rel'"),
    ('{"metrics": {"eval:a": {"value": 1, "abs": -1, "rel": 0}}}', "'abs' must be a number >= 0"),
])
def test_a_broken_expected_file_is_one_clear_error(tmp_path, content, message):
  path = tmp_path / "e.json"
  path.write_text(content)
  with pytest.raises(repro.ReproError, match=message) as e:
    repro.load_expected(str(path))
  assert str(path) in str(e.value)


def test_unknown_suite_and_compare_only_without_a_run_exit_2(tmp_path):
  assert repro.main(["--suite", "huge"]) == 2
  assert repro.main(["--suite", "tiny", "--compare_only"]) == 2
  assert repro.main(["--suite", "tiny", "--compare_only", f"--workdir={tmp_path}"]) == 2


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(repro.EXPECTED_DIR, "*.json"))))
def test_every_expected_file_names_a_suite_and_holds_values(path):
  suite = os.path.basename(path)[:-len(".json")]
  assert suite in repro.SUITES
  expected = repro.load_expected(path)
  assert expected["suite"] == suite and expected["command"] == f"python -m camels_jax.repro --suite {suite}"
  # Every metric was measured (--update wrote it), and its tolerance is stated.
  assert all(spec["value"] is not None for spec in expected["metrics"].values())
  assert any(spec["abs"] > 0 or spec["rel"] > 0 for spec in expected["metrics"].values())
