"""Uptake and facts/filler: the same questions before and after, mean matching, answer-span masks."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from camels_jax.adapt import uptake
from camels_jax.data import pipeline
from camels_jax.methods import baselines, camels
from camels_jax.models import tokenizer as tokenizer_lib
from tests.methods import camels_fixtures as fx


def test_predicted_mask_drops_each_documents_first_token_and_invalid_rows():
  mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1]], bool)
  got = uptake.predicted_mask(mask, valid_B=np.array([True, True, False]))
  np.testing.assert_array_equal(got, [[0, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]])


def test_mean_matched_keeps_the_reference_mean_per_document_and_the_shape_of_w():
  rng = np.random.default_rng(0)
  mask = np.ones((3, 10), bool)
  mask[1, 6:] = False
  ref = rng.uniform(0.1, 2.0, (3, 10)) * mask
  w = rng.uniform(0.0, 1.0, (3, 10))
  w[2] = 0.0  # no weight anywhere (SSM on a text without entities): falls back to uniform
  got = np.asarray(uptake.mean_matched(w, ref, mask))
  np.testing.assert_allclose(uptake.mean_weight_B(got, mask), uptake.mean_weight_B(ref, mask), rtol=1e-6)
  pm = np.asarray(uptake.predicted_mask(mask))
  np.testing.assert_allclose(got[0] / got[0, 1], np.where(pm[0] > 0, w[0] / w[0, 1], 0), rtol=1e-5)
  assert np.ptp(got[2][pm[2] > 0]) == 0  # uniform
  assert (got[pm == 0] == 0).all()


def test_answer_mask_and_facts_filler_ratio_on_a_hand_made_document():
  tok = tokenizer_lib.gpt2()
  text = "Mira Vothen was born in 1912 in Skarnel. In 12 years she built 12 bells. It rained."
  char_mask = pipeline.answer_char_mask(text, ["1912", "Skarnel", "12"])
  marked = "".join(ch if m else "_" for ch, m in zip(text, char_mask))
  # "12" matches the two standalone numbers, never the end of "1912" on its own.
  assert re.findall(r"[^_]+", marked) == ["1912", "Skarnel", "12", "12"]
  ids, offsets = tok.encode_with_offsets(text)
  answer_L = pipeline.token_mask_from_chars(char_mask, offsets)
  pieces = [tok.decode([i]) for i, a in zip(ids, answer_L) if a]
  assert "".join(pieces).split() == ["1912", "Skarnel", "12", "12"]
  n = len(ids)
  mask = np.ones((1, n), bool)
  # Twice the weight on the facts as on the filler: the ratio is 2; uniform weights give exactly 1.
  w = np.where(answer_L, 2.0, 1.0)[None]
  assert uptake.facts_filler_ratio(uptake.facts_filler_sums(w, answer_L[None], mask)) == pytest.approx(2.0)
  assert uptake.facts_filler_ratio(uptake.facts_filler_sums(np.ones((1, n)), answer_L[None], mask)) == 1.0
  # The oracle weighting is the answer mask itself.
  doc = pipeline.TokenizedDoc(None, np.asarray(ids, np.int32), (), answer_L)
  np.testing.assert_array_equal(baselines.doc_weighting("oracle", tok)(doc, n + 3)[:n], answer_L)


def test_tokenize_marks_the_answer_tokens_of_generated_documents():
  from camels_jax.data import generated
  tok = tokenizer_lib.gpt2()
  spec = pipeline.Spec((256,), 48, 24, 64, 3, False)
  docs = pipeline.tokenize(generated.generate(0, "test", 5), tok, spec, __import__("collections").Counter())
  for d in docs:
    assert d.answer_mask.shape == d.tokens.shape and 0 < d.answer_mask.sum() < len(d.tokens) / 2
    spans = tok.decode(d.tokens[d.answer_mask])
    for answer in d.doc.answers:
      assert answer.split()[0] in spans
  batch = pipeline.doc_batch(docs[:2], spec, tok.pad_id)
  np.testing.assert_array_equal(batch["doc_answer_mask_BxL"][1, :len(docs[1].tokens)], docs[1].answer_mask)
  assert not batch["doc_answer_mask_BxL"][0, len(docs[0].tokens):].any()


def _answered(batch):
  """The batch with document tokens 2..4 marked as answer spans (the fixture's answers copy them), and that mask."""
  answer = np.zeros(batch["doc_mask_BxL"].shape, bool)
  answer[:, 2:5] = True
  return batch | {"doc_answer_mask_BxL": jnp.asarray(answer)}, answer


@pytest.mark.slow
def test_uptake_is_measured_on_the_same_questions_before_and_after():
  base, wm_graphdef, wm_params = fx.tiny()
  mcfg = camels.MetaConfig(inner_lr=0.5)
  meta = camels.init_meta_params(wm_params, mcfg)
  batch = fx.batch(2)
  ev = lambda w, p=base.params: camels.uptake_eval(meta, p, batch, w, graphdef=base.graphdef, mcfg=mcfg)
  # No weight: nothing changes, and "before" is the plain answer NLL of the unadapted model.
  zero = ev(jnp.zeros(batch["doc_mask_BxL"].shape))
  assert float(zero["uptake"]) == 0.0 and float(zero["kl"]) == pytest.approx(0.0, abs=1e-7)
  logits = camels._base_logits(base.graphdef, base.params, batch)
  _, (qa, _) = camels.outer_loss(base.graphdef, base.params, logits, batch, mcfg)
  assert float(zero["qa_before"]) == float(qa)
  # A real step: "after" is the outer QA loss of the adapted params, on those same questions.
  w = jnp.asarray(batch["doc_mask_BxL"], jnp.float32)
  got = ev(w)
  total, (qa_after, kl), adapted = camels.adapt_and_score(base.graphdef, base.params, logits, batch, w,
                                                          mcfg.inner_lr, mcfg)
  _, (qa_direct, _) = camels.outer_loss(base.graphdef, adapted, logits, batch, mcfg)
  assert float(got["qa"]) == pytest.approx(float(qa_direct), rel=1e-6)
  assert float(got["uptake"]) == pytest.approx(float(got["qa_before"] - qa_after), rel=1e-6)
  assert float(got["uptake"]) != 0.0
  # The unadapted model's scores, computed once and reused for every weighting, change nothing.
  before = camels.scores_before(base.params, batch, graphdef=base.graphdef, per_question=True)
  fresh = camels.uptake_eval(meta, base.params, batch, w, graphdef=base.graphdef, mcfg=mcfg, per_question=True)
  reused = camels.uptake_eval(meta, base.params, batch, w, graphdef=base.graphdef, mcfg=mcfg, per_question=True,
                              before=before)
  assert set(reused) == set(fresh)
  for k in fresh:
    np.testing.assert_allclose(reused[k], fresh[k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_one_document_comparisons_reuse_one_gradient_for_every_step():
  # With one document per update, `compare_weightings` takes each weighting's gradient once and every step
  # from it; checked against `uptake_eval` (the general path: the inner update itself) at each scaled weight.
  base, wm_graphdef, wm_params = fx.tiny()
  mcfg = camels.MetaConfig(inner_lr=0.5)
  meta = camels.init_meta_params(wm_params, mcfg)
  batch, answer = _answered(fx.batch(1))
  fixed = {"front": lambda d, n: np.linspace(1.0, 0.0, n)}
  got = camels.compare_weightings(meta, base.params, [batch], [[("doc 0",)]], fixed, mcfg=mcfg,
                                  scales=camels.step_scales(1), graphdef=base.graphdef, wm_graphdef=wm_graphdef)
  w = camels.token_weights(wm_graphdef, wm_params, batch["doc_tokens_BxL"], batch["doc_mask_BxL"])
  for s in (0.5, 1.0, 2.0):
    want = camels.uptake_eval(meta, base.params, batch, w * s, graphdef=base.graphdef, mcfg=mcfg, per_question=True)
    row = got[f"{s:g}"]["learned"]
    assert row["uptake"] == pytest.approx(float(want["uptake"]), rel=1e-4, abs=1e-7)
    assert row["qa"] == pytest.approx(float(want["qa"]), rel=1e-6)
    if s == 1.0:  # the locality KL (a forward pass on the locality text) at the learned step only
      assert row["kl"] == pytest.approx(float(want["kl"]), rel=1e-4, abs=1e-9)
      assert row["loss"] == pytest.approx(float(want["loss"]), rel=1e-4)
    else:
      assert "kl" not in row and "loss" not in row
  assert got["2"]["front"]["uptake"] != pytest.approx(got["1"]["front"]["uptake"])


@pytest.mark.slow
def test_meta_eval_step_compares_learned_with_mean_matched_uniform_weights():
  base, wm_graphdef, wm_params = fx.tiny()
  mcfg = camels.MetaConfig(inner_lr=0.5)
  meta = camels.init_meta_params(wm_params, mcfg)
  batch, answer = _answered(fx.batch(2))
  m = camels.meta_eval_step(meta, base.params, batch, graphdef=base.graphdef, wm_graphdef=wm_graphdef, mcfg=mcfg)
  w = camels.token_weights(wm_graphdef, wm_params, batch["doc_tokens_BxL"], batch["doc_mask_BxL"])
  uni = uptake.mean_matched(jnp.ones_like(w), w, batch["doc_mask_BxL"], batch["doc_valid_B"])
  want = camels.uptake_eval(meta, base.params, batch, uni, graphdef=base.graphdef, mcfg=mcfg)
  assert float(m["uniform_uptake"]) == pytest.approx(float(want["uptake"]), rel=1e-6)
  assert float(m["qa_before"]) == float(want["qa_before"])
  assert float(m["facts_n"]) == 6 and float(m["filler_n"]) == (12 - 1) * 2 - 3 - 6
  s = camels.summarize({k: float(v) for k, v in m.items()}, 1)
  assert s["uptake_x_uniform"] == pytest.approx(float(m["uptake"] / m["uniform_uptake"]))
  ratio = uptake.facts_filler_ratio(uptake.facts_filler_sums(w, answer, batch["doc_mask_BxL"]))
  assert s["facts_filler"] == pytest.approx(ratio)


def test_step_grid_is_centred_on_the_learned_step():
  assert camels.step_scales(0) == (1.0,)
  assert camels.step_scales(2) == (0.25, 0.5, 1.0, 2.0, 4.0)
  scales = camels.step_scales(3)
  assert scales[len(scales) // 2] == 1.0 and all(a * b == 1.0 for a, b in zip(scales, scales[::-1]))


@pytest.mark.slow
def test_uptake_at_a_scaled_step_is_the_uptake_at_that_inner_lr_on_the_same_questions():
  # Scaling every weighting by s is s times the inner lr (each inner step is linear in lr * w): checked
  # against runs whose inner lr is s times larger, with the weights as learned.
  base, wm_graphdef, wm_params = fx.tiny()
  batch, answer = _answered(fx.batch(2))
  chunk = [("doc 0",), ("doc 1",)]  # the fixed weightings below do not read their documents
  fixed = {"uniform": lambda d, n: np.ones(n, np.float32), "front": lambda d, n: np.linspace(1.0, 0.0, n)}
  kw = dict(graphdef=base.graphdef, wm_graphdef=wm_graphdef)
  mcfg = camels.MetaConfig(inner_lr=0.5)
  meta = camels.init_meta_params(wm_params, mcfg)
  got = camels.compare_weightings(meta, base.params, [batch], [chunk], fixed, mcfg=mcfg,
                                  scales=camels.step_scales(1), **kw)
  assert list(got) == ["0.5", "1", "2"]
  for s in (0.5, 2.0):
    scaled = camels.MetaConfig(inner_lr=0.5 * s)
    want = camels.compare_weightings(camels.init_meta_params(wm_params, scaled), base.params, [batch], [chunk],
                                     fixed, mcfg=scaled, **kw)["1"]
    for name in ("learned", "uniform", "front"):
      row = got[f"{s:g}"][name]
      assert row["uptake"] == pytest.approx(want[name]["uptake"], rel=1e-4, abs=1e-7)
      assert row["weight_mean"] == pytest.approx(s * got["1"][name]["weight_mean"], rel=1e-5)
      assert row["qa_before"] == got["1"][name]["qa_before"]  # the same questions, from the same model
      assert row["question_uptake"]["n"] == 4  # 2 documents x 2 questions, each once
      if name != "uniform":
        assert row["vs_uniform"]["n"] == 4
  # Mean-matched: at every step each weighting takes the learned weights' total step.
  for s in got.values():
    assert s["uniform"]["weight_mean"] == pytest.approx(s["learned"]["weight_mean"], rel=1e-5)
  assert got["2"]["learned"]["uptake"] != pytest.approx(got["1"]["learned"]["uptake"])
