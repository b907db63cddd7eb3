"""Pooling finished evaluations over data splits: per-split and pooled paired intervals over the questions,
read from the prediction files, and one-line errors for a workdir that cannot be pooled."""

import glob
import json
import os

import numpy as np
import pytest

from camels_jax import pool, stats
from tests.tiny_config import REPO


def _write_eval(workdir, seed, per_method, lrs):
  """A finished evaluation's files: results.json, config.json and predictions/<name>_detail.json."""
  os.makedirs(os.path.join(workdir, "eval", "predictions"))
  results = {"methods": {n: {"lr": lrs[n]} for n in per_method if n != "no_adaptation"}}
  with open(os.path.join(workdir, "eval", "results.json"), "w") as f:
    json.dump(results, f)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"data": {"split_seed": seed}}, f)
  for name, (ids, f1, nll) in per_method.items():
    rows = [{"id": i, "f1": a, "nll": b, "answer": "x"} for i, a, b in zip(ids, f1, nll)]
    with open(os.path.join(workdir, "eval", "predictions", name + "_detail.json"), "w") as f:
      json.dump(rows, f)


def _split(tmp_path, seed, n, rng, shuffle_camels=True):
  ids = [f"s{seed}/q{i}" for i in range(n)]
  names = ("no_adaptation", "uniform", "camels")
  scores = {name: (rng.random(n).round(2), 3 + rng.random(n)) for name in names}
  per_method = {name: (list(ids), list(f1), list(nll)) for name, (f1, nll) in scores.items()}
  if shuffle_camels:  # another order on disk: pooling pairs by question id, not by position
    order = rng.permutation(n)
    per_method["camels"] = tuple([v[i] for i in order] for v in per_method["camels"])
  workdir = str(tmp_path / f"sq{seed}")
  _write_eval(workdir, seed, per_method, {"uniform": 0.0, "camels": 2.5e-5})
  return workdir, scores


def test_pooled_intervals_resample_every_split_s_questions_paired_by_id(tmp_path):
  rng = np.random.default_rng(0)
  (w0, s0), (w1, s1) = _split(tmp_path, 0, 7, rng), _split(tmp_path, 1, 5, rng)
  out = str(tmp_path / "pooled.json")
  assert pool.main(["--workdirs", f"{w0},{w1}", "--out", out, "--resamples", "300"]) == 0
  with open(out) as f:
    result = json.load(f)
  boot = dict(n_boot=300, seed=0, level=0.95)
  cat = lambda name, k: np.concatenate([s0[name][k], s1[name][k]])
  pooled = result["pooled"]["camels"]
  assert pooled["n"] == 12
  assert pooled["vs_uniform"]["f1"] == pytest.approx(
      stats.paired_bootstrap_ci(cat("camels", 0), cat("uniform", 0), **boot))
  assert pooled["vs_no_adaptation"]["nll"] == pytest.approx(
      stats.paired_bootstrap_ci(cat("camels", 1), cat("no_adaptation", 1), **boot))
  # The pooled mean is the question-weighted mean of the splits' means.
  split_means = [s["methods"]["camels"]["vs_uniform"]["f1"]["mean"] for s in result["splits"]]
  assert pooled["vs_uniform"]["f1"]["mean"] == pytest.approx((7 * split_means[0] + 5 * split_means[1]) / 12)
  assert split_means[0] == pytest.approx(float(np.mean(s0["camels"][0] - s0["uniform"][0])))
  assert [s["label"] for s in result["splits"]] == ["sq0 (split_seed 0)", "sq1 (split_seed 1)"]
  assert result["splits"][1]["lr"] == {"uniform": 0.0, "camels": 2.5e-5}
  assert "vs_uniform" not in result["pooled"]["uniform"]
  assert "vs_no_adaptation" not in result["pooled"]["no_adaptation"]


def test_markdown_has_a_row_per_method_and_split_then_pooled(tmp_path):
  rng = np.random.default_rng(1)
  splits = [pool.load_split(_split(tmp_path, s, 4, rng)[0]) for s in (0, 1)]
  lines = pool.markdown(pool.pool(splits, resamples=50)).splitlines()
  camels = [l for l in lines if l.startswith("| camels |")]
  assert [l.split(" | ")[1] for l in camels] == ["sq0 (split_seed 0)", "sq1 (split_seed 1)", "pooled"]
  assert camels[0].split(" | ")[2] == "2.5e-05" and camels[2].split(" | ")[2] == "-"


def test_questions_that_differ_between_methods_are_one_line_and_exit_2(tmp_path, capsys):
  rng = np.random.default_rng(2)
  workdir, _ = _split(tmp_path, 0, 4, rng)
  path = os.path.join(workdir, "eval", "predictions", "camels_detail.json")
  with open(path) as f:
    rows = json.load(f)
  with open(path, "w") as f:
    json.dump(rows[:-1], f)
  assert pool.main(["--workdirs", workdir]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "camels_detail.json" in err and "same questions" in err


def test_a_workdir_without_a_finished_evaluation_is_one_line_and_exit_2(tmp_path, capsys):
  out = tmp_path / "pooled.json"
  assert pool.main(["--workdirs", str(tmp_path / "nothing"), "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "results.json: missing" in err
  assert not out.exists()


def test_an_exported_split_pools_as_its_workdir_does(tmp_path):
  rng = np.random.default_rng(3)
  (w0, _), (w1, _) = _split(tmp_path, 0, 6, rng), _split(tmp_path, 1, 5, rng)
  scores = str(tmp_path / "kept" / "split1.json")
  assert pool.main(["--workdirs", w1, "--export", scores]) == 0
  with open(scores) as f:
    kept = json.load(f)
  assert kept["label"] == "sq1 (split_seed 1)" and "answer" not in json.dumps(kept)  # scores, not the text
  # The kept file in another order than no adaptation's: load_split pairs by id again.
  kept["methods"]["uniform"] = {k: v[::-1] if isinstance(v, list) else v for k, v in kept["methods"]["uniform"].items()}
  with open(scores, "w") as f:
    json.dump(kept, f)
  from_dirs, from_file = (pool.pool([pool.load_split(w0), pool.load_split(w)], resamples=200) for w in (w1, scores))
  assert from_file["pooled"] == from_dirs["pooled"]
  assert from_file["splits"][1]["methods"] == from_dirs["splits"][1]["methods"]
  assert from_file["splits"][1]["lr"] == {"uniform": 0.0, "camels": 2.5e-5}


def test_a_malformed_scores_file_is_one_line_and_exit_2(tmp_path, capsys):
  bad = tmp_path / "split0.json"
  bad.write_text(json.dumps({"format": pool.SCORES_FORMAT, "label": "x", "methods": {
      "no_adaptation": {"lr": None, "ids": ["a", "b"], "f1": [0, 1], "nll": [1, 2]},
      "uniform": {"lr": 1e-5, "ids": ["a", "b"], "f1": [0], "nll": [1, 2]}}}))
  assert pool.main(["--workdirs", str(bad)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "split0.json: methods.uniform" in err and "differ in length" in err
  bad.write_text(json.dumps({"label": "x"}))
  assert pool.main(["--workdirs", str(bad)]) == 2
  assert "not a scores file" in capsys.readouterr().err


def _paired_split(path):
  """A kept scores file, checked to score uniform and CaMeLS and every method on the same questions."""
  split = pool.load_split(path)
  ids = split["methods"]["no_adaptation"]["ids"]
  assert {"uniform", "camels"} <= set(split["methods"])
  assert all(m["ids"] == ids and len(m["f1"]) == len(m["nll"]) == len(ids) for m in split["methods"].values())
  return split


def test_the_kept_squad_scores_load_and_pair_every_method_on_the_same_questions():
  kept = sorted(glob.glob(os.path.join(REPO, "configs", "expected", "squad_cpu_scores", "split*.json")))
  assert kept  # README's SQuAD tables are pooled from these
  for path in kept:
    assert len(_paired_split(path)["methods"]["no_adaptation"]["ids"]) > 100
  # Three article splits (data.split_seed 0, 1, 2): no question is in two of them.
  ids = [set(pool.load_split(p)["methods"]["no_adaptation"]["ids"]) for p in kept]
  assert len(kept) == 3 and sum(map(len, ids)) == len(set.union(*ids))


def test_the_kept_full_length_validation_scores_are_on_the_same_test_questions_as_their_split():
  # configs/expected/squad_cpu_v24_scores: the same splits run with eval.val_docs=24 (a validation stream as
  # long as the test stream); only the validation stream changed, so each holds its split's test questions.
  kept = sorted(glob.glob(os.path.join(REPO, "configs", "expected", "squad_cpu_v24_scores", "split*.json")))
  assert kept  # README's tables with val_docs=24 are pooled from these
  for path in kept:
    split = _paired_split(path)
    ids = split["methods"]["no_adaptation"]["ids"]
    assert {"ssm", "tfidf", "oracle", "uniform+qa_lt"} <= set(split["methods"])
    same_split = pool.load_split(path.replace("squad_cpu_v24_scores", "squad_cpu_scores"))
    assert ids == same_split["methods"]["no_adaptation"]["ids"]
    # The QA-tuning does not read the validation stream: no adaptation scores the same model, bit for bit.
    for metric in ("f1", "nll"):
      assert list(split["methods"]["no_adaptation"][metric]) == list(same_split["methods"]["no_adaptation"][metric])
