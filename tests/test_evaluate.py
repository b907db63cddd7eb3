"""The evaluation job: every method through one adaptation path, the table, atomic outputs, SQuAD end to end."""

import json
import os

import numpy as np
import pytest

from camels_jax import evaluate, evaluation, train
from tests.tiny_config import REPO, tiny_default

SQUAD = os.path.join(REPO, "..", "shared", "data", "squad_v1.1_dev_part.json")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("eval"))
  config = tiny_default()
  train.run(config, workdir, progress=False)
  return config, workdir


def test_all_methods_produce_the_table_and_outputs(trained):
  config, workdir = trained
  results = evaluate.run(config, workdir, progress=False)
  assert set(results["methods"]) == set(evaluation.METHODS)
  for method, r in results["methods"].items():
    assert r["lr"] in config.eval.lrs
    assert 0.0 <= r["test"]["f1"] <= 1.0 and r["test"]["n"] == results["test_questions"]
    assert [p["docs"] for p in r["curve"]] == [2, 4]
    assert set(r["retention"]) == {"right_after", "at_end"}
  # uniform + light-tune reuses uniform's chosen lr instead of sweeping.
  assert [row["lr"] for row in results["methods"]["uniform+qa_lt"]["sweep"]] == [results["methods"]["uniform"]["lr"]]
  out = os.path.join(workdir, "eval")
  names = set(os.listdir(out))
  assert {"results.json", "results.md", "f1_curve.png"} <= names
  assert {f"weights_{m}.png" for m in ("uniform", "ssm", "tfidf", "camels")} <= names
  with open(os.path.join(out, "results.json")) as f:
    assert json.load(f)["methods"].keys() == results["methods"].keys()
  with open(os.path.join(out, "results.md")) as f:
    md = f.read()
  assert md.count("**best**") == 1 and "| camels |" in md and "| no adaptation |" in md


def test_zero_learning_rate_leaves_qa_scores_unchanged(trained):
  config, workdir = trained
  model_ctx = _context(config, workdir)
  docs = list(model_ctx.data.stream().docs)
  weights = evaluation.weighting_fn(model_ctx, "uniform", [])
  adapted = evaluation.adapt(model_ctx, docs, weights, 0.0)
  before = evaluation.score(model_ctx, model_ctx.params, docs, "greedy", "before")
  after = evaluation.score(model_ctx, adapted, docs, "greedy", "after")
  assert after == before
  moved = evaluation.score(model_ctx, evaluation.adapt(model_ctx, docs, weights, 1e-2), docs, "greedy", "x")
  assert moved["nll"] != before["nll"]


def _context(config, workdir):
  from camels_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from camels_jax.models import loading
  model = loading.load(config.model)
  data = data_lib.load(config.data, model.tokenizer, workdir)
  params, _ = train.qa_tuned_params(config, model, data, workdir, writer=None, progress=False)
  return evaluation.Context(config, model, params, data, workdir, progress=False)


def test_interrupted_evaluation_leaves_complete_outputs_or_none(trained, monkeypatch):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.eval.methods = "uniform"
  config.eval.lrs = (1e-3,)
  out = os.path.join(workdir, "interrupted")
  os.makedirs(out)

  def crash(*args, **kwargs):
    raise KeyboardInterrupt  # as if the job were stopped while writing its outputs

  monkeypatch.setattr(evaluation, "plot_curves", crash)
  ctx = _context(config, workdir)
  ctx.workdir = out
  with pytest.raises(KeyboardInterrupt):
    evaluation.run(ctx, _NullWriter())
  assert os.listdir(out) == []  # no eval/ folder and no temporary leftovers
  monkeypatch.undo()
  evaluation.run(ctx, _NullWriter())
  assert os.listdir(out) == ["eval"]
  before = sorted(os.listdir(os.path.join(out, "eval")))
  monkeypatch.setattr(evaluation, "plot_curves", crash)
  with pytest.raises(KeyboardInterrupt):
    evaluation.run(ctx, _NullWriter())
  assert sorted(os.listdir(os.path.join(out, "eval"))) == before  # the previous complete outputs survive
  assert os.listdir(out) == ["eval"]


class _NullWriter:
  def write_scalars(self, step, scalars):
    pass


@pytest.mark.skipif(not os.path.exists(SQUAD), reason="needs ../shared/data")
def test_tiny_end_to_end_evaluation_on_the_shared_squad_file(tmp_path):
  from camels_jax.data import get_data_config  # pylint: disable=g-import-not-at-top
  config = tiny_default()
  config.data = get_data_config("squad")
  config.data.path = SQUAD
  config.data.split_sizes.update(qa_train=2, qa_val=1, meta_train=1, meta_val=1, test=1)
  config.data.doc_buckets = (256,)
  config.data.qa_len = 64
  config.data.stream_docs = 3
  config.data.qa_batch_size = 8
  config.jobs = "qa_tune"
  config.eval.methods = "uniform,ssm,tfidf"
  workdir = str(tmp_path)
  train.run(config, workdir, progress=False)
  results = evaluate.run(config, workdir, progress=False)
  assert results["test_docs"] == 3 and results["test_questions"] > 3
  with open(os.path.join(workdir, "eval", "results.md")) as f:
    md = f.read()
  for method in ("uniform", "ssm", "tfidf"):
    assert f"| {method} |" in md
  assert np.isfinite(results["methods"]["ssm"]["test"]["nll"])
