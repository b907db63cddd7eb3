"""The evaluation job: every method through one protocol, a new method as one class, intervals and paired
comparisons (a pure function of the results), the lr rule, the clock, predictions, strict JSON, atomic outputs,
SQuAD end to end."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from camels_jax import checks, eval_config, evaluate, evaluation, io_utils, plots, qa_tune, report, stats, train
from camels_jax.adapt import online
from camels_jax.data import pipeline
from camels_jax.methods import mac
from tests.tiny_config import tiny_default

METHODS = ("uniform", "ssm", "tfidf", "camels", "oracle", "uniform+qa_lt", "mac", "retrieval",
           "mac+retrieval")  # every method registered
NO_LR = ("mac", "retrieval", "mac+retrieval")  # no gradient step: no lr, no token weights


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("eval"))
  config = tiny_default()
  config.jobs = "qa_tune,camels,mac"
  config.eval.methods = ",".join(METHODS)
  train.run(config, workdir, progress=False)
  return config, workdir


@pytest.mark.slow  # the `trained` run (~2 min) and every method
def test_all_methods_produce_the_table_and_outputs(trained):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.eval.mac_distractors = (3, 7)
  results = evaluate.run(config, workdir, progress=False)
  assert set(results["methods"]) == set(METHODS) == set(evaluation.REGISTRY)
  n = results["test_questions"]
  assert results["select"] == config.eval.select
  _assert_ci(results["no_adaptation"], n)
  for method, r in results["methods"].items():
    assert (r["lr"] is None) == (method in NO_LR)
    if r["sweep"]:
      assert r["lr"] == evaluation.select_lr(r["sweep"], config.eval.select) and r["sweep"][-1]["lr"] == 0.0
      assert r["lr_edge"] == evaluation.lr_edge(r["sweep"], r["lr"])
    assert 0.0 <= r["test"]["f1"] <= 1.0 and r["test"]["n"] == n
    _assert_ci(r["test"], n)
    assert r["vs_no_adaptation"]["nll"]["n"] == n
    vs = r["vs_no_adaptation"]["nll"]
    assert vs["lo"] <= vs["mean"] <= vs["hi"]  # its mean: over questions (checked against predictions/ below)
    assert [p["docs"] for p in r["by_position"]] == [[0, 2], [2, 4]]
    assert sum(p["questions"] for p in r["by_position"]) == n
    assert [p["docs"] for p in r["curve"]] == [2, 4]
    for p in r["curve"]:
      assert p["lo"] <= p["f1"] <= p["hi"]
    assert set(r["retention"]) == {"right_after", "at_end"}
    assert r["uptake"] == pytest.approx(results["no_adaptation"]["nll"] - r["test"]["nll"])
    if r["lr"] != 0.0:  # it adapted (MAC: answered with a prefix); lr 0: no adaptation won the sweep
      assert r["test"]["nll"] != results["no_adaptation"]["nll"]
    # Each second is charged to one phase: the curve scored along the stream is not also "adapt".
    t = r["time_s"]
    phases = sum(v for k, v in t.items() if k not in ("adapt_per_doc", "total"))
    assert phases <= t["total"] and t["adapt_per_doc"] == pytest.approx(t["adapt"] / results["test_docs"])
    if method == "oracle":  # every weight on the answer tokens, none on the filler
      assert r["weights"]["facts_filler"] is None and r["weights"]["mean_weight"] > 0
    elif method not in NO_LR:
      assert r["weights"]["facts_tokens"] > 0 and r["weights"]["facts_filler"] > 0 and r["weights"]["mean_weight"] > 0
    assert method == "retrieval" or r["memory_bytes"]["adapt"] > 0  # retrieval: an index of the texts read
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
  assert results["methods"]["camels"]["weights"]["facts_filler"] != pytest.approx(1.0)  # learned, not uniform
  assert results["methods"]["uniform"]["time_s"]["curve"] > 0  # scored along the stream, timed apart
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
  # Retrieval, and MAC with its bank restricted to the retrieved documents: how often a question's own
  # document was the one retrieved (k = 1), compared with MAC and with each other.
  for method in ("retrieval", "mac+retrieval"):
    assert results["methods"][method]["test"]["recall"] > 0.5
  assert results["methods"]["retrieval"]["index_docs"] == docs
  assert results["methods"]["mac+retrieval"]["vs_retrieval"]["f1"]["n"] == n
  assert results["methods"]["mac+retrieval"]["bank"]["docs"] == docs
  # Its control: the same questions from a bank of as many documents, none of the stream's, paired.
  other = m["controls"]["other_bank"]
  assert other["test"]["bank_docs"] == docs and other["test"]["n"] == n and other["test"]["nll"] != m["test"]["nll"]
  assert other["method_minus_control"]["nll"]["n"] == n and m["time_s"]["controls"] > 0
  assert not any("controls" in r or "controls" in r["time_s"] for k, r in results["methods"].items() if k != "mac")
  # Its bank against its size: the stream's documents, then 3 and 7 distractors mixed in.
  rows = report.bank_size_rows(results)
  assert [(r["bank_docs"], r["distractors"]) for r in rows] == [(docs, 0), (docs + 3, 3), (docs + 7, 7)]
  for r in rows[1:]:
    # F1's paired mean is the difference of the two means (answer NLL's is per question, not token-weighted).
    assert r["test"]["n"] == n and r["minus_stream"]["f1"]["mean"] == pytest.approx(r["test"]["f1"] - m["test"]["f1"])
    d = r["minus_stream"]["nll"]
    assert d["lo"] <= d["mean"] <= d["hi"] and d["mean"] != 0
    assert r["prefix_bytes"] > 0 and r["amortize_s"] > 0 and r["answer_s"] > 0
  assert rows[2]["bank_bytes"] == 4 * config.mac.tokens * (docs + 7) * config.model.random.d_model
  out = os.path.join(workdir, "eval")
  names = set(os.listdir(out))
  assert {"results.json", "results.md", "f1_curve.png", "meta_objective_vs_step.png", "predictions",
          report.BANK_SIZE_PLOT} <= names
  # The references: the open-book ceiling (the same questions, the document in the prompt) and the
  # meta-objective on the test documents, every weighting scored on every test question once per step.
  book = results["open_book"]
  assert book["n"] == n and book["docs"] == results["test_docs"] and book["nll"] != results["no_adaptation"]["nll"]
  assert book["vs_no_adaptation"]["f1"]["n"] == n
  assert list(results["meta_objective_by_step"]) == ["0.5", "1", "2"]
  assert results["meta_objective"] == results["meta_objective_by_step"]["1"]
  assert set(results["meta_objective"]) == {"learned", "uniform", "ssm", "tfidf", "oracle"}
  for row in results["meta_objective"].values():
    assert row["question_uptake"]["n"] == n
  assert {f"weights_{m}.{ext}" for m in ("uniform", "ssm", "tfidf", "camels") for ext in ("png", "html")} <= names
  assert not any(n.startswith(("weights_mac", "weights_uniform+")) for n in names)  # no weights, or uniform's
  with open(os.path.join(out, "results.json")) as f:
    text = f.read()
  stored = _strict_json(text)
  assert stored["methods"].keys() == results["methods"].keys()
  assert "per_question" not in text and "predictions" not in text  # those go to predictions/
  assert stored["methods"]["camels"]["vs_uniform"]["f1"].keys() == {"mean", "lo", "hi", "n"}
  nll = {}
  for name in ("no_adaptation",) + METHODS:
    stem = os.path.join(out, "predictions", report.prediction_file_name(name))
    with open(stem + ".json") as f:
      answers = _strict_json(f.read())
    assert len(answers) == n and all(isinstance(a, str) for a in answers.values())
    with open(stem + "_detail.json") as f:
      detail = _strict_json(f.read())
    assert {q["id"]: q["answer"] for q in detail} == answers  # (written with sorted keys)
    assert {"id", "question", "golds", "answer", "f1", "em", "official_f1", "official_em", "nll"} <= detail[0].keys()
    scores = results["no_adaptation"] if name == "no_adaptation" else results["methods"][name]["test"]
    assert np.mean([q["f1"] for q in detail]) == pytest.approx(scores["f1"])
    nll[name] = np.array([q["nll"] for q in detail])
  for name in METHODS:  # the paired NLL change against no adaptation: per question, then the mean
    want = float(np.mean(nll[name] - nll["no_adaptation"]))
    assert results["methods"][name]["vs_no_adaptation"]["nll"]["mean"] == pytest.approx(want, abs=1e-9)
    parts = results["methods"][name]["by_position"]
    first = parts[0]["questions"]
    assert parts[0]["nll"]["mean"] == pytest.approx(float(np.mean((nll[name] - nll["no_adaptation"])[:first])))
  with open(os.path.join(out, "results.md")) as f:
    md = f.read()
  assert md.count("**best**") == 1 and "| camels |" in md and "| no adaptation |" in md
  assert "mac / camels adaptation time per document" in md and "| mac | - |" in md
  assert "| mac | other bank |" in md and f"| mac | {docs + 7} | 7 |" in md
  assert "F1 − uniform [95% CI]" in md and f"{n} questions" in md and evaluation.SELECT_RULES[config.eval.select] in md
  printed = report.table(results)
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


@pytest.mark.slow
def test_zero_learning_rate_leaves_qa_scores_unchanged(trained):
  config, workdir = trained
  ctx = _context(config, workdir)
  docs = list(ctx.data.stream().docs)
  uniform = evaluation.REGISTRY["uniform"].prepare(ctx, docs)
  before = evaluation.score(ctx, ctx.params, docs, "greedy", "before")
  seen = []
  after = uniform.answer(ctx, uniform.adapt(ctx, docs, 0.0, on_doc=lambda i, p: seen.append(i)), docs, "greedy",
                         "after")
  assert after == before and seen == list(range(len(docs)))  # lr 0 skips the updates, not the curve points
  # The updates it skips: Adam steps at lr 0 leave every parameter exactly as it is.
  oc = config.eval.online.copy_and_resolve_references()
  oc.lr = 0.0
  batches = [pipeline.doc_batch([d], ctx.data.spec, ctx.data.pad_id) for d in docs[:2]]
  stepped, _ = online.adapt_stream(ctx.model.graphdef, ctx.params, batches,
                                   lambda i, b: np.ones(b["doc_tokens_BxL"].shape, np.float32), oc,
                                   online.inner_config(oc, config.data.doc_buckets), progress=False)
  jax.tree.map(np.testing.assert_array_equal, stepped, ctx.params)
  moved = uniform.answer(ctx, uniform.adapt(ctx, docs, 1e-2), docs, "greedy", "x")
  assert moved["nll"] != before["nll"]


def test_macs_other_bank_holds_as_many_documents_none_of_them_the_streams(tmp_path):
  from camels_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from camels_jax.evaluation import methods  # pylint: disable=g-import-not-at-top
  from camels_jax.models import loading
  config = tiny_default()
  config.data.split_sizes.update(qa_train=3, qa_val=2, meta_train=4, meta_val=2, test=5)
  data = data_lib.load(config.data, loading.load(config.model).tokenizer, str(tmp_path))
  ids = lambda docs: [d.doc.id for d in docs]
  test_docs = list(data.stream().docs)
  others = methods.other_bank_docs(data, test_docs)
  held_out = set(ids(data.splits["meta_val"]) + ids(data.splits["qa_val"]) + ids(data.splits["qa_train"]))
  assert len(others) == len(test_docs) and len(set(ids(others))) == len(others) and set(ids(others)) <= held_out
  assert not set(ids(others)) & set(ids(test_docs) + ids(data.splits["meta_train"]))  # nor what MAC trained on
  # Fewer held-out documents than the stream: all of them.
  assert len(methods.other_bank_docs(data, test_docs * 2)) == len(held_out)


def test_macs_distractors_are_unseen_documents_mixed_into_its_bank(tmp_path):
  import types  # pylint: disable=g-import-not-at-top
  from camels_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from camels_jax.evaluation import methods  # pylint: disable=g-import-not-at-top
  from camels_jax.models import loading
  config = tiny_default()
  config.data.split_sizes.update(qa_train=3, qa_val=2, meta_train=4, meta_val=2, test=5)
  model = loading.load(config.model)
  data = data_lib.load(config.data, model.tokenizer, str(tmp_path))
  ctx = types.SimpleNamespace(data=data, model=model, workdir=str(tmp_path))
  test_docs = list(data.stream().docs)
  ids = lambda docs: [d.doc.id for d in docs]
  docs = methods.distractor_docs(ctx, test_docs, 9)
  loc = config.data.generated.loc_docs  # the locality texts are the "loc" split's first documents
  assert ids(docs) == [f"loc-{k}" for k in range(loc, loc + 9)]
  assert not set(ids(docs)) & {d.doc.id for split in data.splits.values() for d in split}
  assert ids(methods.distractor_docs(ctx, test_docs, 4)) == ids(docs)[:4]  # a larger count adds documents
  # Other datasets draw from the held-out splits, never the test documents, and say when they hold too few.
  held = types.SimpleNamespace(config=types.SimpleNamespace(dataset="squad"), splits=data.splits)
  pool = methods.distractor_docs(types.SimpleNamespace(data=held), test_docs, 7)
  assert len(pool) == 7 and set(ids(pool)) <= set(ids(data.splits["meta_val"] + data.splits["qa_val"]
                                                       + data.splits["qa_train"]))
  with pytest.raises(checks.ConfigError, match="eval.mac_distractors asks for 8"):
    methods.distractor_docs(types.SimpleNamespace(data=held), test_docs, 8)
  # The mixed bank: the stream's documents and the first n distractors, at seeded positions.
  rng = np.random.default_rng(0)
  bank, extra = mac.Bank(rng.normal(size=(5, 2, 3))), mac.Bank(rng.normal(size=(9, 2, 3)))
  mixed = methods.mixed_bank(bank, extra, 4, seed=42)
  want = np.concatenate([bank.tokens_MxTxD, extra.tokens_MxTxD[:4]]).reshape(9, -1)
  got = mixed.tokens_MxTxD.reshape(9, -1)
  assert sorted(map(tuple, got)) == sorted(map(tuple, want)) and not np.array_equal(got, want)
  assert np.array_equal(methods.mixed_bank(bank, extra, 4, seed=42).tokens_MxTxD, mixed.tokens_MxTxD)


def _context(config, workdir):
  from camels_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from camels_jax.models import loading
  model = loading.load(config.model)
  data = data_lib.load(config.data, model.tokenizer, workdir)
  params, _ = qa_tune.tuned_params(config, model, data, workdir, writer=None, progress=False)
  return evaluation.Context(config, model, params, data, workdir, progress=False)


@pytest.mark.slow
def test_meta_objective_scores_each_documents_own_questions_after_its_own_step(trained):
  from camels_jax.methods import camels  # pylint: disable=g-import-not-at-top
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.eval.meta_objective, config.eval.meta_objective_octaves = "uniform", 0
  ctx = _context(config, workdir)
  docs = list(ctx.data.stream().docs)[:2]
  got = evaluation.meta_objective(ctx, docs)
  assert list(got) == ["1"] and set(got["1"]) == {"learned", "uniform"}
  # By hand: each document alone, one learned-weight step from the QA-tuned model, its own questions.
  wm_graphdef, meta = camels.load_trained(config, ctx.model, workdir)
  mcfg = camels.meta_config(config.camels, config.data.doc_buckets)
  own = []
  for d in docs:
    for batch in pipeline.meta_eval_batches([d], ctx.data.loc, ctx.data.spec, ctx.data.pad_id, 1,
                                            config.data.loc_batch):
      w = camels.token_weights(wm_graphdef, meta["wm"], batch["doc_tokens_BxL"], batch["doc_mask_BxL"])
      m = camels.uptake_eval(meta, ctx.params, batch, w, graphdef=ctx.model.graphdef, mcfg=mcfg, per_question=True)
      own += np.asarray(m["uptake_BxQ"])[np.asarray(batch["qa_valid_BxQ"], bool)].tolist()
  learned = got["1"]["learned"]["question_uptake"]
  assert learned["n"] == len(own) == sum(len(d.qas) for d in docs)
  assert learned["mean"] == pytest.approx(np.mean(own), rel=1e-4, abs=1e-7)
  # One step on both documents at once (as meta-training batches them) is another number.
  joint = camels.compare_on(config, ctx.model, ctx.params, ctx.data, wm_graphdef, meta, docs, ["uniform"],
                            batch_docs=2)["1"]["learned"]["question_uptake"]
  assert joint["n"] == learned["n"] and joint["mean"] != pytest.approx(learned["mean"], rel=1e-3)
  # eval.meta_objective_docs keeps the first documents: the first one's questions, the same uptakes.
  config.eval.meta_objective_docs = 1
  first = evaluation.meta_objective(ctx, docs)["1"]["learned"]["question_uptake"]
  assert first["n"] == len(docs[0].qas)
  assert first["mean"] == pytest.approx(np.mean(own[:len(docs[0].qas)]), rel=1e-4, abs=1e-7)


@pytest.mark.slow
def test_finer_stream_buckets_pad_less_and_adapt_the_same(trained, monkeypatch):
  from camels_jax.evaluation import methods  # pylint: disable=g-import-not-at-top
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.eval.online.extra_buckets = ()  # the data's alone: (256,)
  ctx = _context(config, workdir)
  docs = list(ctx.data.stream().docs)[:3]
  lengths = []
  step = online.adapt_step
  monkeypatch.setattr(online, "adapt_step", lambda *a, **kw: lengths.append(a[3].shape[1]) or step(*a, **kw))
  # A weight per position, the same at any padded length.
  front = lambda d, n: np.where(np.arange(n) < len(d.tokens), 1.0 + 0.5 * np.cos(np.arange(n)), 0.0).astype(np.float32)
  want = methods.adapt(ctx, docs, front, 1e-3)
  assert lengths == [256] * 3  # data.doc_buckets=(256,)
  config.eval.online.extra_buckets = (64, 128, 192, 512)  # 512: past the data's longest, unused
  ctx = dataclasses.replace(ctx, config=config)
  got = methods.adapt(ctx, docs, front, 1e-3)
  assert methods.stream_spec(ctx).doc_buckets == (64, 128, 192, 256)
  assert lengths[3:] == [methods.pipeline.bucket(len(d.tokens), (64, 128, 192, 256)) for d in docs]
  assert sum(lengths[3:]) < 3 * 256
  # Padding is masked and the "padded" loss divides by the largest bucket either way: the same update.
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
  assert any(not np.array_equal(np.asarray(a), np.asarray(p))
             for a, p in zip(jax.tree.leaves(want), jax.tree.leaves(ctx.params)))  # it did adapt
  w = methods.doc_weights(ctx, front, docs[0])
  np.testing.assert_array_equal(w, front(docs[0], lengths[3])[:len(docs[0].tokens)])


@pytest.mark.slow
def test_the_meta_val_comparison_after_training_is_the_meta_objective_on_meta_val_documents(trained):
  # camels.compare_docs=1 (configs/default.py's, which tiny keeps): the train job's weightings against the
  # step on meta-val are each document's own step from the QA-tuned model, the protocol of the test
  # documents' meta-objective, so the two tables differ only in their documents.
  config, workdir = trained
  config = config.copy_and_resolve_references()
  assert config.camels.compare_docs == 1
  with open(os.path.join(workdir, "train_results.json")) as f:
    want = json.load(f)["camels"]["compare_by_step"]
  config.eval.meta_objective = config.camels.compare
  config.eval.meta_objective_octaves = config.camels.compare_octaves
  ctx = _context(config, workdir)
  got = evaluation.meta_objective(ctx, ctx.data.splits["meta_val"][:config.camels.compare_batches])
  assert set(got) == set(want) == {"0.5", "1", "2"}
  for scale, rows in want.items():
    assert set(got[scale]) == set(rows) == {"learned", "uniform", "ssm", "tfidf", "oracle"}  # JSON sorts keys
    for name, m in rows.items():
      assert got[scale][name]["question_uptake"]["n"] == m["question_uptake"]["n"] == 36
      assert got[scale][name]["question_uptake"]["mean"] == pytest.approx(m["question_uptake"]["mean"], rel=1e-5,
                                                                          abs=1e-7), (scale, name)
  assert "kl" in want["1"]["learned"] and "kl" not in want["2"]["learned"]


@pytest.mark.slow
def test_the_preconditioned_meta_objective_uses_the_root_mean_square_of_meta_train_gradients(trained):
  from camels_jax.adapt import inner  # pylint: disable=g-import-not-at-top
  from camels_jax.methods import camels  # pylint: disable=g-import-not-at-top
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.camels.precond_docs, config.camels.precond_eps = 2, 1e-6
  config.eval.meta_objective, config.eval.meta_objective_octaves = "uniform", 0
  ctx = _context(config, workdir)
  mcfg = camels.meta_config(config.camels, config.data.doc_buckets)
  # By hand: each of the first 2 meta-train documents' gradient with every real token weighing 1.
  sq = []
  # Jitted: op-by-op gradients of the model cost more than a minute on 2 cores.
  grad = jax.jit(lambda p, t_BxL, m_BxL: jax.grad(inner.doc_loss, argnums=1)(
      ctx.model.graphdef, p, t_BxL, m_BxL, m_BxL.astype(np.float32), mcfg.inner))
  for batch in pipeline.meta_eval_batches(ctx.data.splits["meta_train"][:2], ctx.data.loc, ctx.data.spec,
                                          ctx.data.pad_id, 1, config.data.loc_batch):
    g = grad(ctx.params, batch["doc_tokens_BxL"], batch["doc_mask_BxL"])
    sq.append(jax.tree.map(lambda x: np.square(np.asarray(x, np.float64)), g))
  rms = jax.tree.map(lambda a, b: np.sqrt((a + b) / 2), *sq)
  precond = camels.precond_of(config, ctx.model, ctx.params, ctx.data)
  for a, e in zip(jax.tree.leaves(precond), jax.tree.leaves(rms)):
    # Compared as root mean squares: float32 gradients computed in another program differ in the last bits,
    # which is a large relative error only where a gradient is ~1e-6 of the leaf's largest.
    np.testing.assert_allclose(1.0 / np.asarray(a, np.float64) - 1e-6, e, rtol=1e-3, atol=1e-5 * e.max())
  # The meta-objective steps each test document with that preconditioner.
  docs = list(ctx.data.stream().docs)[:1]
  got = evaluation.meta_objective(ctx, docs)["1"]["learned"]["question_uptake"]
  wm_graphdef, meta = camels.load_trained(config, ctx.model, workdir)
  batch = next(pipeline.meta_eval_batches(docs, ctx.data.loc, ctx.data.spec, ctx.data.pad_id, 1,
                                          config.data.loc_batch))
  w = camels.token_weights(wm_graphdef, meta["wm"], batch["doc_tokens_BxL"], batch["doc_mask_BxL"])
  kw = dict(graphdef=ctx.model.graphdef, mcfg=mcfg, per_question=True)
  valid = np.asarray(batch["qa_valid_BxQ"], bool)
  own = np.asarray(camels.uptake_eval(meta, ctx.params, batch, w, precond=precond, **kw)["uptake_BxQ"])[valid]
  plain = np.asarray(camels.uptake_eval(meta, ctx.params, batch, w, **kw)["uptake_BxQ"])[valid]
  assert got["mean"] == pytest.approx(float(np.mean(own)), rel=1e-4, abs=1e-7)
  assert got["mean"] != pytest.approx(float(np.mean(plain)), rel=1e-3)


@pytest.mark.slow
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
  ctx = dataclasses.replace(_context(config, workdir), workdir=out)
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


class _Unadapted(evaluation.Method):
  """A method that reads the stream and learns nothing: all a new method has to write."""

  name = "unadapted"

  def adapt(self, ctx, docs, lr, on_doc=None, desc="adapt"):
    for i in range(len(docs)):
      on_doc and on_doc(i, ctx.params)
    return ctx.params


@pytest.mark.slow
def test_a_new_method_is_one_class_and_one_registry_line(trained, tmp_path):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.eval.methods = "uniform,unadapted"
  config.eval.lrs = (1e-3,)
  ctx = dataclasses.replace(_context(config, workdir), workdir=str(tmp_path))
  evaluation.register(_Unadapted())
  try:
    results = evaluation.run(ctx, _NullWriter())
  finally:
    evaluation.REGISTRY.pop("unadapted")
  r, na, n = results["methods"]["unadapted"], results["no_adaptation"], results["test_questions"]
  # It learned nothing: the base model's answers and scores, exactly; no lr, no token weights.
  assert r["test"] == na and r["uptake"] == 0.0 and r["lr"] is None and r["sweep"] == [] and r["weights"] == {}
  assert [p["docs"] for p in r["curve"]] == [2, 4] and set(r["retention"]) == {"right_after", "at_end"}
  uniform_f1 = results["methods"]["uniform"]["test"]["f1"]
  assert r["vs_uniform"]["f1"]["n"] == n and r["vs_uniform"]["f1"]["mean"] == pytest.approx(na["f1"] - uniform_f1)
  assert "\nunadapted " in report.table(results)
  with open(tmp_path / "eval" / "results.md") as f:
    assert "| unadapted | - |" in f.read()
  assert (tmp_path / "eval" / "predictions" / "unadapted.json").exists()
  with pytest.raises(checks.ConfigError, match="eval.methods"):  # unregistered again
    evaluation.run(ctx, _NullWriter())


@pytest.mark.slow
def test_tiny_end_to_end_evaluation_on_the_shared_squad_file(tmp_path, shared_data):
  from camels_jax.data import get_data_config  # pylint: disable=g-import-not-at-top
  config = tiny_default()
  config.data = get_data_config("squad")
  config.data.path = shared_data("squad_v1.1_dev_part.json")
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
  assert eval_config.eval_config().select in evaluation.SELECT_RULES


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
  """A `score` result with these per-question F1s (EM: F1 == 1), each question's answer NLL `nll`."""
  f1s = [float(x) for x in f1s]
  n = len(f1s)
  pq = {m: [float(x == 1.0) if "em" in m else x for x in f1s] for m in evaluation.CI_METRICS}
  pq |= {"nll": [nll] * n, "tokens": [2.0] * n}
  predictions = [{"index": i, "id": f"doc/{i}", "question": f"q{i}?", "golds": ["a"], "answer": f"a{i}"}
                 for i in range(n)]
  return {m: float(np.mean(pq[m])) if n else float("nan") for m in evaluation.CI_METRICS} | {
      "nll": nll, "n": n, "tokens": 2 * n, "per_question": pq, "predictions": predictions}


def _result(name, f1s, nll=1.5, versus=(), curve_docs=(2, 4)):
  test = _scores(f1s, nll)
  return evaluation.MethodResult(
      name=name, adaptation=name, versus=versus, sweep=({"lr": 1e-4} | evaluation.summary(test),), lr=1e-4,
      test=test, curve=tuple(evaluation.CurvePoint(d, _scores(f1s[:d], nll)) for d in curve_docs),
      retention={"right_after": None, "at_end": 0.5}, doc_weights=None, weights={},
      time_s={"adapt": 1.0, "adapt_per_doc": 0.25, "total": 2.0}, record={})


def test_comparisons_are_a_pure_function_of_the_results():
  bc = eval_config.eval_config().bootstrap
  kw = dict(n_boot=bc.resamples, seed=bc.seed, level=bc.level)
  rng = np.random.default_rng(3)
  f1 = {m: rng.choice([0.0, 0.5, 1.0], size=12) for m in ("uniform", "ssm", "camels", "mac")}
  results = {m: _result(m, f1[m], nll=1.0 + k / 10, versus=("camels",) if m == "mac" else ())
             for k, m in enumerate(f1)}
  no_adaptation = _scores(np.zeros(12), nll=2.0)
  snapshot = json.dumps(io_utils.strict_json({m: dataclasses.asdict(r) for m, r in results.items()}))
  out = evaluation.compare(no_adaptation, results, bc)
  assert snapshot == json.dumps(io_utils.strict_json({m: dataclasses.asdict(r) for m, r in results.items()}))
  assert evaluation.compare(no_adaptation, results, bc) == out  # nothing but its inputs
  for m in ("ssm", "camels", "mac"):
    em = lambda x: (x == 1.0).astype(float)
    assert out[m].versus["uniform"]["f1"] == stats.paired_bootstrap_ci(f1[m], f1["uniform"], **kw)
    assert out[m].versus["uniform"]["em"] == stats.paired_bootstrap_ci(em(f1[m]), em(f1["uniform"]), **kw)
    assert out[m].curve_versus == {d: stats.paired_bootstrap_ci(f1[m][:d], f1["uniform"][:d], **kw)
                                   for d in (2, 4)}
  assert out["mac"].versus["camels"]["f1"] == stats.paired_bootstrap_ci(f1["mac"], f1["camels"], **kw)
  assert list(out["mac"].versus) == ["uniform", "camels"] and list(out["camels"].versus) == ["uniform"]
  assert out["uniform"].versus == {} and out["uniform"].curve_versus == {}
  assert out["ssm"].uptake == pytest.approx(2.0 - 1.1) and out["uniform"].uptake == pytest.approx(1.0)
  # Without the baseline (or the versus method) there is nothing to pair with.
  alone = evaluation.compare(no_adaptation, {"mac": results["mac"]}, bc)["mac"]
  assert alone.versus == {} and alone.curve_versus == {}
  # A method against itself is exactly 0.
  same = evaluation.compare(no_adaptation, {"uniform": results["uniform"],
                                            "copy": dataclasses.replace(results["uniform"], name="copy")}, bc)
  assert same["copy"].versus["uniform"]["f1"] == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n": 12}


def test_result_json_carries_the_comparisons_without_per_question_lists():
  bc = eval_config.eval_config().bootstrap
  results = {"uniform": _result("uniform", [0, 1, 1, 0]), "camels": _result("camels", [1, 1, 1, 0]),
             "mac": _result("mac", [1, 0, 1, 0], versus=("camels",))}
  cmp = evaluation.compare(_scores([0, 0, 1, 0], nll=2.0), results, bc)
  mac_json = evaluation.result_json(results["mac"], cmp["mac"], bc)
  assert mac_json["vs_uniform"] == cmp["mac"].versus["uniform"] and mac_json["vs_camels"] == cmp["mac"].versus["camels"]
  assert [p["vs_uniform"] for p in mac_json["curve"]] == [cmp["mac"].curve_versus[d] for d in (2, 4)]
  assert mac_json["curve"][1]["f1"] == 0.5 and mac_json["sweep"] == [{"lr": 1e-4} | evaluation.summary(
      results["mac"].test)]
  ci = mac_json["test"]["ci"]["f1"]
  assert ci == stats.bootstrap_ci([1.0, 0.0, 1.0, 0.0], n_boot=bc.resamples, seed=bc.seed, level=bc.level)
  uniform_json = evaluation.result_json(results["uniform"], cmp["uniform"], bc)
  assert "vs_uniform" not in uniform_json and all("vs_uniform" not in p for p in uniform_json["curve"])
  assert uniform_json["uptake"] == pytest.approx(0.5)
  text = json.dumps(io_utils.strict_json(mac_json), allow_nan=False)
  assert "per_question" not in text and "predictions" not in text
  assert "controls" not in mac_json  # a method without controls
  # A control: its scores with intervals, and the method − control paired on the same questions.
  control = _scores([0, 0, 1, 0], nll=1.75)
  with_control = dataclasses.replace(results["mac"], controls={"other_bank": control})
  got = evaluation.result_json(with_control, cmp["mac"], bc)["controls"]["other_bank"]
  assert got["test"] == evaluation.with_ci(control, bc)
  kw = dict(n_boot=bc.resamples, seed=bc.seed, level=bc.level)
  assert got["method_minus_control"]["f1"] == stats.paired_bootstrap_ci([1, 0, 1, 0], [0, 0, 1, 0], **kw)
  assert got["method_minus_control"]["nll"]["mean"] == pytest.approx(1.5 - 1.75)


def test_clock_charges_nested_phases_to_the_inner_one():
  now = [0.0]
  clock = evaluation.Clock(timer=lambda: now[0])
  with clock("adapt"):
    now[0] += 3.0
    with clock("curve"):  # scored inside the adaptation: paused, not subtracted afterwards
      now[0] += 2.0
    now[0] += 1.0
    with clock("curve"):
      now[0] += 0.5
  with clock("test_score"):
    now[0] += 4.0
  assert clock.totals == {"adapt": 4.0, "curve": 2.5, "test_score": 4.0}
  assert clock.elapsed() == sum(clock.totals.values()) == 10.5


def test_methods_config_accepts_registered_names_only():
  rule = evaluation.RULES["methods"]
  assert rule("uniform,mac") and not rule("uniform,nope") and not rule("") and not rule(rule.bad_example)
  evaluation.register(_Unadapted())
  try:
    assert rule("uniform,unadapted")
    with pytest.raises(ValueError, match="already registered"):
      evaluation.register(_Unadapted())
  finally:
    evaluation.REGISTRY.pop("unadapted")
  assert not rule("unadapted")


def test_write_json_is_strict(tmp_path):
  path = tmp_path / "x.json"
  io_utils.write_json(str(path), {"a": float("nan"), "b": [np.float32(0.5), float("-inf")], "c": np.int64(3)})
  assert _strict_json(path.read_text()) == {"a": None, "b": [0.5, None], "c": 3}


class _Curve(evaluation.Method):
  """A stand-in whose validation answer NLL is a known function of the lr: the sweep without a model."""

  name = "curve"

  def __init__(self, nll):
    self.nll = nll
    self.decodings = []  # what each validation answer was decoded with

  def adapt(self, ctx, docs, lr, on_doc=None, desc="adapt"):
    return lr

  def answer(self, ctx, state, docs, decoding, desc):
    self.decodings.append(decoding)
    f1 = float("nan") if decoding is None else 0.0  # as qa.evaluate_qa without a decoding
    return {"nll": self.nll(state), "f1": f1, "prefix_em": f1, "n": 1}


def _sweep(nll, widen=2, candidate=True, val_decoding="greedy", method=None, sweep="grid"):
  ec = eval_config.eval_config()
  ec.widen, ec.val_decoding, ec.sweep = widen, val_decoding, sweep
  ctx = type("Ctx", (), {"ec": ec})()
  no_adapt = {"nll": nll(0.0), "f1": 0.0, "prefix_em": 0.0, "n": 1} if candidate else None
  rows, lr = evaluation.sweep_lr(ctx, method or _Curve(nll), [], tuple(ec.lrs), evaluation.Clock(), no_adapt)
  return rows, lr, evaluation.lr_edge(rows, lr)


def test_an_nll_sweep_without_a_validation_decoding_generates_nothing_and_picks_the_same_lr():
  nll = lambda lr: 100.0 if lr == 0 else abs(lr - 2.5e-5)
  method = _Curve(nll)
  rows, lr, _ = _sweep(nll, val_decoding="", method=method)
  assert method.decodings and set(method.decodings) == {None}  # answer NLL only: no answer generated
  assert lr == 2.5e-5 == _sweep(nll)[1]
  assert all(r["f1"] != r["f1"] for r in rows if r["lr"] > 0)  # NaN: null in results.json


def test_no_adaptation_wins_the_sweep_when_every_lr_harms():
  rows, lr, edge = _sweep(lambda lr: 2.0 + lr)  # every step raises the answer NLL
  assert lr == 0.0 and edge is None
  assert [r["lr"] for r in rows] == [1e-4, 2.5e-5, 6.25e-6, 1.5625e-6, 0.0]  # bracketed by lr 0: no widening
  assert _sweep(lambda lr: 2.0 + lr, candidate=False)[1] > 0  # without the candidate a harmful lr is reported


def test_an_lr_on_the_edge_of_the_grid_widens_it_and_is_flagged_when_still_there():
  import math
  best_at = lambda best: (lambda lr: 100.0 if lr == 0 else (math.log10(lr) - math.log10(best)) ** 2)
  rows, lr, edge = _sweep(best_at(1e-2))  # far above the grid: two widenings (4e-4, 1.6e-3) do not reach it
  assert lr == pytest.approx(1.6e-3) and edge == "high" and len(rows) == 4 + 2 + 1
  rows, lr, edge = _sweep(best_at(1e-2), widen=5)  # 6.4e-3 is then bracketed by 2.56e-2
  assert lr == pytest.approx(6.4e-3) and edge is None
  rows, lr, edge = _sweep(best_at(1e-9), widen=1)
  assert lr == pytest.approx(1.5625e-6 / 4) and edge == "low"
  rows, lr, edge = _sweep(best_at(2.5e-5))  # bracketed: nothing added
  assert lr == 2.5e-5 and edge is None and len(rows) == 5
  assert evaluation.lr_edge([{"lr": 1e-4}], 1e-4) is None  # one lr: no sweep, no edge


class _Counting(_Curve):
  def __init__(self, nll):
    super().__init__(nll)
    self.adapted = []  # the lr of every validation stream run

  def adapt(self, ctx, docs, lr, on_doc=None, desc="adapt"):
    self.adapted.append(lr)
    return lr


@pytest.mark.parametrize("best", [0.0, 1.5625e-6, 6.25e-6, 2.5e-5, 1e-4, 1e-2, 1e-9])
def test_an_ascending_sweep_picks_the_grid_s_lr_and_stops_once_past_it(best):
  import math
  def nll(lr):  # one best lr, and lr -> 0 tends to no adaptation's score
    if best == 0.0:  # every lr harms
      return 1.0 + lr
    return 2.0 if lr == 0 else 2.0 - math.exp(-(math.log10(lr) - math.log10(best)) ** 2)
  grid, up = _Counting(nll), _Counting(nll)
  rows, lr, edge = _sweep(nll, method=grid)
  up_rows, up_lr, up_edge = _sweep(nll, method=up, sweep="ascending")
  assert (up_lr, up_edge) == (lr, edge)  # the same pick and the same edge flag as the whole grid
  assert up_rows == tuple(r for r in rows if r["lr"] in up.adapted + [0.0])  # the same rows, fewer of them
  ladder = sorted(eval_config.eval_config().lrs)
  # The grid's lrs upward in order, up to and including the first above the pick, none past it; then only
  # the widening's lrs.
  on_ladder = min([0.0] + ladder, key=nll)  # the best before any widening
  k = min(len(ladder), sum(x <= on_ladder for x in ladder) + 1)
  assert [x for x in up.adapted if x in ladder] == ladder[:k] == up.adapted[:k]
  assert len(up.adapted) <= len(grid.adapted)
  if best == 0.0:  # every lr harms: one validation stream, not one per lr
    assert up.adapted == [ladder[0]] and up_lr == 0.0


def test_an_open_book_on_the_first_documents_is_paired_with_those_questions_closed_book():
  closed = {"per_question": {"f1": [0.0, 0.0, 1.0, 0.0], "nll": [3.0, 2.0, 1.0, 4.0]}}
  first = evaluation.first_questions(closed, 2)
  assert first["per_question"] == {"f1": [0.0, 0.0], "nll": [3.0, 2.0]}
  book = {"per_question": {"f1": [1.0, 0.0], "nll": [1.0, 1.5]}}
  d = evaluation.paired(book, first, {"resamples": 200, "level": 0.95, "seed": 0}, ("nll",))["nll"]
  assert d["n"] == 2 and d["mean"] == pytest.approx(-1.25)
  results = {"test_docs": 34, "open_book": {"docs": 12, "n": 72}}
  assert report._book_scope(results) == " (first 12 documents, 72 questions)"
  assert report._book_scope({"test_docs": 34, "open_book": {"docs": 34, "n": 204}}) == ""


def test_by_position_assigns_each_question_to_its_documents_part():
  docs = [type("Doc", (), {"qas": (None,) * k})() for k in (2, 0, 3, 1, 2)]
  parts = evaluation.position_parts(docs, 2)
  assert [(a, b, rows.tolist()) for a, b, rows in parts] == [(0, 2, [0, 1]), (2, 5, [2, 3, 4, 5, 6, 7])]
  assert [rows.tolist() for _, _, rows in evaluation.position_parts(docs, 5)] == [[0, 1], [], [2, 3, 4], [5], [6, 7]]
  na = {"per_question": {"nll": np.arange(8.0)}}
  method = {"per_question": {"nll": np.arange(8.0) - np.array([0, 0, 1, 1, 1, 1, 1, 1.0])}}
  by = evaluation._by_position(method, na, parts, {"resamples": 200, "level": 0.95, "seed": 0})
  assert [p["docs"] for p in by] == [[0, 2], [2, 5]] and [p["questions"] for p in by] == [2, 6]
  assert by[0]["nll"]["mean"] == 0.0 and by[1]["nll"]["mean"] == -1.0  # only the late documents' questions moved


def test_open_book_puts_the_document_before_each_question_and_keeps_the_answer():
  spec = pipeline.Spec((8,), 6, 3, 4, 2, True)
  qa = pipeline.QA(np.array([1, 20, 21, 30, 2], np.int32), 3, "q?", "a")
  doc = pipeline.TokenizedDoc(None, np.array([1, 10, 11, 12], np.int32), (qa,))
  (book,), book_spec, cut = pipeline.open_book([doc], spec, [99])
  (got,) = book.qas
  np.testing.assert_array_equal(got.tokens, [1, 10, 11, 12, 99, 20, 21, 30, 2])  # one BOS, then the question
  assert got.prompt_len == 7 and got.tokens[got.prompt_len:].tolist() == [30, 2]  # the same answer tokens
  assert book_spec.qa_len == 9 and spec.qa_len == 6 and cut == 0
  assert doc.qas == (qa,)  # the closed book is untouched
  # Where the positions run out, the document is cut from its end; the question and answer stay whole.
  (short,), short_spec, cut = pipeline.open_book([doc], spec, [99], max_len=7)
  np.testing.assert_array_equal(short.qas[0].tokens, [1, 10, 99, 20, 21, 30, 2])
  assert short.qas[0].prompt_len == 5 and short_spec.qa_len == 7 and cut == 1


def test_a_method_that_no_adaptation_won_answers_with_the_no_adaptation_scores(monkeypatch):
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top
  from camels_jax.evaluation import method as method_lib, methods  # pylint: disable=g-import-not-at-top
  scored = []  # (params, decoding, documents) of every real scoring

  def evaluate_qa(graphdef, params, cfg, tok, batches, questions, decoding, **kw):
    scored.append((params, decoding, tuple(questions)))
    return {"nll": float(len(scored)), "per_question": {"nll": [1.0]}}
  monkeypatch.setattr(method_lib.qa, "evaluate_qa", evaluate_qa)
  monkeypatch.setattr(method_lib.pipeline, "qa_eval_batches", lambda docs, *a: [])
  monkeypatch.setattr(method_lib.pipeline, "questions", lambda docs: [d.doc.id for d in docs])
  ec = eval_config.eval_config()
  qa_tuned, adapted = {"w": np.zeros(2)}, {"w": np.ones(2)}
  ctx = evaluation.Context(SimpleNamespace(eval=ec), SimpleNamespace(graphdef=None, cfg=None, tokenizer=None),
                           qa_tuned, SimpleNamespace(spec=None, pad_id=0), "", progress=False)
  docs = [SimpleNamespace(doc=SimpleNamespace(id=f"d{i}")) for i in range(3)]
  no_adapt = evaluation.score(ctx, ctx.params, docs, "greedy", "no adaptation")
  seen = []
  state = methods.adapt(ctx, docs, None, 0.0, on_doc=lambda i, p: seen.append(p))  # no weights at lr 0
  assert state is ctx.params and all(p is ctx.params for p in seen) and len(seen) == 3
  again = evaluation.score(ctx, state, docs, "greedy", "lr 0 test")
  assert again == no_adapt and len(scored) == 1  # no second scoring of the same params and questions
  again["nll"] = -1.0  # a caller's change does not reach the next method's scores
  assert evaluation.score(ctx, state, docs, "greedy", "x")["nll"] == no_adapt["nll"]
  # Anything else is scored: other questions, another decoding, other params, a prefix.
  evaluation.score(ctx, state, docs[:2], "greedy", "first documents")
  evaluation.score(ctx, state, docs, "beam", "beam")
  evaluation.score(ctx, adapted, docs, "greedy", "adapted")
  evaluation.score(ctx, state, docs, "greedy", "prefixed", prefix_fn=lambda b: None)
  assert [(p is qa_tuned, d, len(q)) for p, d, q in scored] == [
      (True, "greedy", 3), (True, "greedy", 2), (True, "beam", 3), (False, "greedy", 3), (True, "greedy", 3)]
