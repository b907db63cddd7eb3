"""The evaluation job: every method through one adaptation path, intervals and paired comparisons, the lr rule,
the table, predictions, strict JSON, atomic outputs, SQuAD end to end."""

import json
import os

import numpy as np
import pytest

from camels_jax import evaluate, evaluation, io_utils, plots, train
from camels_jax.methods import mac
from tests.tiny_config import REPO, tiny_default

SQUAD = os.path.join(REPO, "..", "shared", "data", "squad_v1.1_dev_part.json")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("eval"))
  config = tiny_default()
  config.jobs = "qa_tune,camels,mac"
  config.eval.methods = ",".join(evaluation.METHODS)
  train.run(config, workdir, progress=False)
  return config, workdir


def test_all_methods_produce_the_table_and_outputs(trained):
  config, workdir = trained
  results = evaluate.run(config, workdir, progress=False)
  assert set(results["methods"]) == set(evaluation.METHODS)
  n = results["test_questions"]
  assert results["select"] == config.eval.select
  _assert_ci(results["no_adaptation"], n)
  for method, r in results["methods"].items():
    assert r["lr"] in config.eval.lrs or (method == "mac" and r["lr"] is None)
    if r["sweep"]:
      assert r["lr"] == evaluation.select_lr(r["sweep"], config.eval.select)
    assert 0.0 <= r["test"]["f1"] <= 1.0 and r["test"]["n"] == n
    _assert_ci(r["test"], n)
    assert [p["docs"] for p in r["curve"]] == [2, 4]
    for p in r["curve"]:
      assert p["lo"] <= p["f1"] <= p["hi"]
    assert set(r["retention"]) == {"right_after", "at_end"}
    assert r["uptake"] == pytest.approx(results["no_adaptation"]["nll"] - r["test"]["nll"])
    if method != "mac":  # MAC weighs no tokens
      assert r["weights"]["facts_tokens"] > 0 and r["weights"]["facts_filler"] > 0 and r["weights"]["mean_weight"] > 0
    assert r["memory_bytes"]["adapt"] > 0
    assert r["time_s"]["adapt_per_doc"] > 0 or method == "uniform+qa_lt"  # it reuses uniform's adapted stream
    if method == "uniform":
      assert "vs_uniform" not in r
    else:
      assert set(r["vs_uniform"]) == set(evaluation.CI_METRICS)
      d = r["vs_uniform"]["f1"]
      assert d["n"] == n and d["mean"] == pytest.approx(r["test"]["f1"] - results["methods"]["uniform"]["test"]["f1"])
      assert all(p["vs_uniform"]["n"] > 0 for p in r["curve"])
  for method in ("uniform", "uniform+qa_lt"):
    assert results["methods"][method]["weights"]["facts_filler"] == pytest.approx(1.0)
  # uniform + light-tune reuses uniform's chosen lr without a sweep, and uniform's adapted stream: the same
  # curve along the stream, the light-tune only after it.
  lt, uniform = results["methods"]["uniform+qa_lt"], results["methods"]["uniform"]
  assert lt["sweep"] == [] and lt["lr"] == uniform["lr"]
  assert [(p["docs"], p["f1"]) for p in lt["curve"]] == [(p["docs"], p["f1"]) for p in uniform["curve"]]
  assert lt["retention"]["right_after"] == uniform["retention"]["right_after"]
  assert all("vs_uniform" not in p for p in uniform["curve"])
  assert lt["time_s"]["adapt"] == 0.0 and lt["time_s"]["light_tune"] > 0
  # MAC: the bank holds T tokens per test document, saved with orbax; compared with CaMeLS, paired.
  m = results["methods"]["mac"]
  docs = results["test_docs"]
  assert m["bank"] == {"docs": docs, "tokens": config.mac.tokens * docs,
                       "bytes": 4 * config.mac.tokens * docs * config.model.random.d_model}
  assert m["sweep"] == [] and m["weights"] == {} and m["vs_camels"]["f1"]["n"] == n
  assert m["vs_camels"]["f1"]["mean"] == pytest.approx(m["test"]["f1"] - results["methods"]["camels"]["test"]["f1"])
  assert mac.Bank.restore(os.path.join(workdir, "eval_mac_bank")).docs == docs
  out = os.path.join(workdir, "eval")
  names = set(os.listdir(out))
  assert {"results.json", "results.md", "f1_curve.png", "predictions"} <= names
  assert {f"weights_{m}.{ext}" for m in ("uniform", "ssm", "tfidf", "camels") for ext in ("png", "html")} <= names
  with open(os.path.join(out, "results.json")) as f:
    text = f.read()
  stored = _strict_json(text)
  assert stored["methods"].keys() == results["methods"].keys()
  assert "per_question" not in text and "predictions" not in text  # those go to predictions/
  assert stored["methods"]["camels"]["vs_uniform"]["f1"].keys() == {"mean", "lo", "hi", "n"}
  for name in ("no_adaptation",) + evaluation.METHODS:
    stem = os.path.join(out, "predictions", evaluation.prediction_file_name(name))
    with open(stem + ".json") as f:
      answers = _strict_json(f.read())
    assert len(answers) == n and all(isinstance(a, str) for a in answers.values())
    with open(stem + "_detail.json") as f:
      detail = _strict_json(f.read())
    assert {q["id"]: q["answer"] for q in detail} == answers  # (written with sorted keys)
    assert {"id", "question", "golds", "answer", "f1", "em", "official_f1", "official_em", "nll"} <= detail[0].keys()
    scores = results["no_adaptation"] if name == "no_adaptation" else results["methods"][name]["test"]
    assert np.mean([q["f1"] for q in detail]) == pytest.approx(scores["f1"])
  with open(os.path.join(out, "results.md")) as f:
    md = f.read()
  assert md.count("**best**") == 1 and "| camels |" in md and "| no adaptation |" in md
  assert "MAC / CaMeLS adaptation time per document" in md and "| mac | - |" in md
  assert "F1 − uniform [95% CI]" in md and f"{n} questions" in md and evaluation.SELECT_RULES[config.eval.select] in md
  printed = evaluation.table(results)
  assert "nan" not in printed.lower() and max(len(line) for line in printed.splitlines()) <= 160


def _assert_ci(scores, n):
  assert set(scores["ci"]) == set(evaluation.CI_METRICS)
  for metric, ci in scores["ci"].items():
    assert ci["n"] == n and ci["lo"] <= ci["mean"] <= ci["hi"]
    assert ci["mean"] == pytest.approx(scores[metric])


def _strict_json(text):
  def reject(constant):
    raise ValueError(f"not strict JSON: {constant}")
  return json.loads(text, parse_constant=reject)


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

  monkeypatch.setattr(plots, "plot_curves", crash)
  ctx = _context(config, workdir)
  ctx.workdir = out
  with pytest.raises(KeyboardInterrupt):
    evaluation.run(ctx, _NullWriter())
  assert os.listdir(out) == []  # no eval/ folder and no temporary leftovers
  monkeypatch.undo()
  evaluation.run(ctx, _NullWriter())
  assert os.listdir(out) == ["eval"]
  before = sorted(os.listdir(os.path.join(out, "eval")))
  monkeypatch.setattr(plots, "plot_curves", crash)
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


# ------------------------------------------------------------------------------------------------
# Pure parts, without a model.

SWEEP = [
    {"lr": 1e-3, "f1": 0.50, "prefix_em": 0.50, "nll": 2.0},
    {"lr": 1e-4, "f1": 0.30, "prefix_em": 0.30, "nll": 1.5},  # lowest NLL
    {"lr": 1e-5, "f1": 0.50, "prefix_em": 0.60, "nll": 2.5},  # F1 ties with 1e-3; higher prefix EM
]


def test_select_lr_rules_pick_different_known_best_lrs():
  assert evaluation.select_lr(SWEEP, "nll") == 1e-4
  assert evaluation.select_lr(SWEEP, "f1") == 1e-5
  # NLL ties go to the higher F1; F1 and prefix EM ties to the lower NLL.
  assert evaluation.select_lr(SWEEP + [{"lr": 7e-4, "f1": 0.4, "prefix_em": 0.0, "nll": 1.5}], "nll") == 7e-4
  assert evaluation.select_lr(SWEEP + [{"lr": 3e-5, "f1": 0.5, "prefix_em": 0.6, "nll": 2.2}], "f1") == 3e-5
  # A missing score never wins.
  assert evaluation.select_lr([{"lr": 1.0, "f1": 0.9, "prefix_em": 0.9, "nll": float("nan")}] + SWEEP, "nll") == 1e-4
  assert evaluation.select_lr([{"lr": 1.0, "f1": None, "prefix_em": None, "nll": 0.1}] + SWEEP, "f1") == 1e-5
  with pytest.raises(ValueError, match="eval.select"):
    evaluation.select_lr(SWEEP, "em")
  assert evaluation.eval_config().select in evaluation.SELECT_RULES


def test_weight_diagnostics_pool_over_documents():
  # Position 0 of each document is never predicted, so its weight does not count.
  diag = evaluation.weight_diagnostics([np.array([9.0, 4.0, 1.0, 1.0]), np.array([7.0, 1.0, 4.0])],
                                       [np.array([0, 1, 0, 0], bool), np.array([1, 0, 1], bool)])
  assert diag["facts_tokens"] == 2 and diag["filler_tokens"] == 3
  assert diag["facts_weight"] == pytest.approx(4.0) and diag["filler_weight"] == pytest.approx(1.0)
  assert diag["facts_filler"] == pytest.approx(4.0) and diag["mean_weight"] == pytest.approx(11 / 5)
  uniform = evaluation.weight_diagnostics([np.ones(5)], [np.array([0, 0, 1, 1, 0], bool)])
  assert uniform["facts_filler"] == pytest.approx(1.0)
  no_facts = evaluation.weight_diagnostics([np.ones(3)], [np.zeros(3, bool)])
  assert no_facts["facts_filler"] is None and no_facts["mean_weight"] == 1.0
  assert evaluation.weight_diagnostics([], [])["facts_filler"] is None


def _scores(f1s, nll=1.0):
  n = len(f1s)
  pq = {m: list(map(float, f1s)) for m in evaluation.CI_METRICS} | {"nll": [nll] * n, "tokens": [2.0] * n}
  predictions = [{"index": i, "id": f"doc/{i}", "question": f"q{i}?", "golds": ["a"], "answer": f"a{i}"}
                 for i in range(n)]
  return {m: float(np.mean(f1s)) if n else float("nan") for m in evaluation.CI_METRICS} | {
      "nll": nll, "n": n, "tokens": 2 * n, "per_question": pq, "predictions": predictions}


def test_comparisons_table_report_and_predictions_without_a_model():
  bc = evaluation.eval_config().bootstrap
  raw = {"no_adaptation": {"test": _scores([0, 0, 1, 0], nll=2.0)}}
  results = {"no_adaptation": evaluation.with_ci(raw["no_adaptation"]["test"], bc), "methods": {},
             "test_docs": 2, "val_docs": 1, "test_questions": 4, "select": "nll", "bootstrap": dict(bc)}
  for method, f1s in (("uniform", [0, 1, 1, 0]), ("camels", [0, 1, 1, 0]), ("ssm", [1, 1, 1, 0])):
    test = _scores(f1s, nll=1.5)
    curve_scores = [(2, _scores(f1s[:2])), (4, test)]
    results["methods"][method] = {
        "sweep": [{"lr": 1e-4} | evaluation.summary(test)], "lr": 1e-4, "test": evaluation.with_ci(test, bc),
        "curve": [{"docs": d, "f1": m["f1"], "lo": None, "hi": None} for d, m in curve_scores],
        "retention": {"at_end": 0.5}, "weights": evaluation.weight_diagnostics([], [])}
    raw[method] = {"test": test, "curve": curve_scores}
  evaluation.add_comparisons(results, raw, bc)
  camels_vs = results["methods"]["camels"]["vs_uniform"]
  assert camels_vs["f1"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n": 4}  # same answers as uniform: exactly 0
  assert results["methods"]["ssm"]["vs_uniform"]["f1"]["mean"] == pytest.approx(0.25)
  assert results["methods"]["ssm"]["curve"][0]["vs_uniform"]["n"] == 2
  assert results["methods"]["uniform"]["uptake"] == pytest.approx(0.5)
  printed, md = evaluation.table(results), evaluation.report(results)
  for text in (printed, md):
    assert "nan" not in text.lower() and "camels" in text
  assert "+0.250 [" in printed and "+0.000 [+0.000, +0.000]" in md and md.count("**best**") == 1
  assert "right_after" not in md and "| ssm | 0.0001 (chosen) |" in md
  json.dumps(io_utils.strict_json(results), allow_nan=False)
  details = evaluation.prediction_details(raw["ssm"]["test"])
  assert details[0] == {"id": "doc/0", "question": "q0?", "golds": ["a"], "answer": "a0", "em": 1.0,
                        "prefix_em": 1.0, "f1": 1.0, "official_em": 1.0, "official_f1": 1.0, "nll": 1.5}
  assert evaluation.answers_by_id(raw["ssm"]["test"]) == {f"doc/{i}": f"a{i}" for i in range(4)}
  assert evaluation.prediction_file_name("uniform+qa_lt") == "uniform+qa_lt"
  assert evaluation.prediction_file_name("a/b c") == "a_b_c"


def test_write_json_is_strict(tmp_path):
  path = tmp_path / "x.json"
  io_utils.write_json(str(path), {"a": float("nan"), "b": [np.float32(0.5), float("-inf")], "c": np.int64(3)})
  assert _strict_json(path.read_text()) == {"a": None, "b": [0.5, None], "c": 3}
