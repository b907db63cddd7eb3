"""SQuAD metrics, answer NLL, prompt building and answer generation (camels_jax.qa)."""

import jax
import numpy as np
import pytest
from flax import nnx

from camels_jax import qa
from camels_jax.data import pipeline
from camels_jax.models import tokenizer as tokenizer_lib
from camels_jax.models import transformer
from camels_jax.models.config import ModelConfig

# ------------------------------------------------------------------------------------------------
# Metrics: cases worked out from the official SQuAD v1.1 evaluate script (normalize_answer = lower,
# remove punctuation, remove articles, fix whitespace; F1 over a Counter of tokens, 0 without overlap).


@pytest.mark.parametrize("text, normalized", [
    ("The Quick, Brown Fox!", "quick brown fox"),
    ("  An apple a  day\n", "apple day"),
    ("theater another", "theater another"),  # articles are whole words only
    ("U.S.A.", "usa"),
    ("the", ""),
    ("rock-and-roll's", "rockandrolls"),
    ("Ünïcode “quotes”", "ünïcode “quotes”"),  # only ASCII punctuation is removed
])
def test_normalize_answer(text, normalized):
  assert qa.normalize_answer(text) == normalized


@pytest.mark.parametrize("prediction, gold, em, f1", [
    ("the Eiffel Tower.", "Eiffel tower", True, 1.0),
    ("Eiffel Towers", "Eiffel Tower", False, 0.5),
    ("Eiffel Tower in Paris", "the Eiffel Tower", False, 2 / 3),  # p = 2/4, r = 2/2
    ("red red red", "red", False, 0.5),  # Counter intersection counts "red" once: p = 1/3, r = 1
    ("red", "red red", False, 2 / 3),  # p = 1, r = 1/2
    ("1841", "in 1841", False, 2 / 3),
    ("Paris", "London", False, 0.0),
    ("", "", True, 0.0),  # v1.1: no common token gives F1 0 even when both are empty
    ("the", "an", True, 0.0),  # both normalise to ""
    ("", "Paris", False, 0.0),
    ("Paris", "", False, 0.0),
])
def test_exact_match_and_f1_match_squad_v1_1(prediction, gold, em, f1):
  assert qa.exact_match(prediction, gold) is em
  assert qa.f1(prediction, gold) == pytest.approx(f1)


@pytest.mark.parametrize("prediction, gold, expected", [
    ("Paris", "Paris", True),
    ("Paris, France", "Paris", True),  # the normalised prediction is cut to len("paris")
    ("Parisian", "Paris", True),  # a character prefix is enough (reference behaviour)
    ("The Paris", "paris", True),  # articles and case go first
    ("Par", "Paris", False),
    ("Lyon", "Paris", False),
    ("1841 and 1842", "1841", True),
    ("anything", "the", True),  # an empty normalised gold matches everything
    ("", "Paris", False),
])
def test_prefix_exact_match_is_the_reference_em(prediction, gold, expected):
  assert qa.prefix_exact_match(prediction, gold) is expected


@pytest.mark.parametrize("prediction, golds, official_em, official_f1", [
    ("Denver Broncos", ["Denver Broncos", "Broncos"], True, 1.0),
    ("the Broncos team", ["Denver Broncos", "Broncos", "The Broncos"], False, 2 / 3),  # best: p 1/2, r 1
    ("Paris", ["London"], False, 0.0),
    ("", ["Paris", "the"], True, 0.0),  # "the" normalises to "", like the empty prediction
])
def test_official_scores_are_the_best_over_all_golds(prediction, golds, official_em, official_f1):
  assert qa.official_exact_match(prediction, golds) is official_em
  assert qa.official_f1(prediction, golds) == pytest.approx(official_f1)
  assert qa.official_f1(prediction, golds) == max(qa.f1(prediction, g) for g in golds)


@pytest.mark.parametrize("prediction, reference, golds, scores", [
    # The reference's gold is the shortest, capitalised; the official scores see the others too.
    ("Denver Broncos", "Broncos", ("Denver Broncos", "Broncos"), (0, 0, 2 / 3, 1, 1.0)),
    ("Paris, France", "Paris", ("Paris", "Paris, France"), (0, 1, 2 / 3, 1, 1.0)),
    ("Parisian", "Paris", ("Paris",), (0, 1, 0.0, 0, 0.0)),
    ("the Paris", "Paris", ("paris",), (1, 1, 1.0, 1, 1.0)),
])
def test_question_scores_differ_by_metric(prediction, reference, golds, scores):
  got = qa.question_scores(prediction, qa.Gold(reference, golds, "id", "question?"))
  assert list(got) == list(qa.GENERATED_METRICS)
  assert list(got.values()) == pytest.approx(scores)


def test_official_scores_need_a_list_of_golds():
  with pytest.raises(ValueError, match="non-empty sequence"):
    qa.official_f1("Paris", [])
  with pytest.raises(ValueError, match="non-empty sequence"):
    qa.official_exact_match("Paris", "Paris")


def test_clean_text_matches_transformers_clean_up():
  assert qa.clean_text(" John 's car , is n't it ? ") == "John's car, isn't it?"


# ------------------------------------------------------------------------------------------------
# Answer NLL.

V = 40
SMALL = ModelConfig(arch="llama", vocab_size=V, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=32,
                    max_len=64, tie_embeddings=False)
SPEC = pipeline.Spec(doc_buckets=(16,), qa_len=12, max_answer_len=6, loc_len=8, qa_slots=1, add_bos=False)
PAD = 0


def _qa(question, answer):
  return pipeline.QA(np.asarray(question + answer, np.int32), len(question), "", "")


def test_qa_nll_and_answer_logprobs_equal_a_hand_computation():
  graphdef, params = transformer.init(SMALL, seed=3)
  qas = [_qa([5, 6, 7], [8, 9, 1]), _qa([10, 11, 12, 13, 14], [15, 1]), None, _qa([2], [3, 4, 5, 6, 1])]
  batch = pipeline.qa_batch(qas, [0, 1, -1, 2], SPEC, PAD)
  batch["qa_loss_mask_BxS"][2, :4] = True  # an invalid row must not count even if its mask is set

  apply = jax.jit(transformer.apply, static_argnums=0)
  logits = np.asarray(apply(graphdef, params, batch["qa_tokens_BxS"], batch["qa_mask_BxS"]), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want_B, count_B = np.zeros(4), np.zeros(4)
  for i, item in enumerate(qas):
    if item is None:
      continue
    for t in range(item.prompt_len, len(item.tokens)):  # every answer token and the EOS
      want_B[i] += logp[i, t - 1, item.tokens[t]]
      count_B[i] += 1

  total, count = qa.qa_nll(graphdef, params, batch)
  assert float(count) == count_B.sum() == 3 + 2 + 5
  np.testing.assert_allclose(float(total), -want_B.sum(), rtol=1e-5)
  logp_B, n_B = qa.answer_logprobs(graphdef, params, batch)
  np.testing.assert_allclose(np.asarray(logp_B), want_B, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(n_B), count_B)


# ------------------------------------------------------------------------------------------------
# Prompts and generation.


def test_prompts_are_the_left_padded_questions():
  qas = [_qa([5, 6, 7], [8, 1]), None, _qa([2, 3, 4, 5, 6, 7, 8, 9, 10], [1])]
  batch = pipeline.qa_batch(qas, [0, -1, 1], SPEC, PAD)
  prompt_BxP, mask_BxP = qa.prompts(batch, pad_id=PAD, eos_id=1, multiple=4)
  assert prompt_BxP.shape == (3, 12)  # longest prompt 9, rounded up to 12 (= S, the cap)
  np.testing.assert_array_equal(prompt_BxP[0], [0] * 9 + [5, 6, 7])
  np.testing.assert_array_equal(mask_BxP[0], [0] * 9 + [1] * 3)
  np.testing.assert_array_equal(prompt_BxP[1], [0] * 11 + [1])  # an invalid row: one EOS, never empty
  np.testing.assert_array_equal(prompt_BxP[2], [0] * 3 + list(range(2, 11)))
  assert qa.prompts(batch, PAD, 1, multiple=16)[0].shape == (3, 12)


def test_long_prompts_take_few_widths():
  # Short questions keep multiples of 16; prompts holding a document round to a quarter of their power of
  # two, so 256..511 tokens compile the decoders 5 times, not 16.
  def width(n):
    batch = {"qa_tokens_BxS": np.ones((1, 1024), np.int32), "qa_valid_B": np.ones(1, bool),
             "qa_prompt_len_B": np.array([n])}
    return qa.prompts(batch, PAD, 1)[0].shape[1]
  assert [width(n) for n in (5, 17, 100, 127, 130)] == [16, 32, 112, 128, 160]
  assert sorted({width(n) for n in range(256, 512)}) == [256, 320, 384, 448, 512]
  assert width(256) == 256 and all(n <= width(n) < 1.25 * n + 64 for n in range(1, 1025))


@pytest.fixture(scope="module")
def gpt2():
  return tokenizer_lib.gpt2()


# Questions whose last token determines a hand-wired answer: the bigram model below maps each token of a
# chain to the next one, so greedy and beam search must produce the chain after the question.
CHAINS = [("Capital of France", " Paris", "Paris"),
          ("Year of the treaty", " 1841", "1841"),
          ("A famous wall", " Berlin Wall", "Berlin")]  # answers "Berlin Wall" to the gold "Berlin"


def _bigram_model(tok):
  """A llama whose attention and MLPs are switched off, so its next token depends on the last one only."""
  cfg = ModelConfig(arch="llama", vocab_size=50304, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                    d_ff=16, max_len=128, tie_embeddings=False)
  graphdef, params = transformer.init(cfg, seed=0)
  model = nnx.merge(graphdef, params)
  successor = {tok.eos_id: tok.eos_id}
  for question, generated, _ in CHAINS:
    chain = tok.encode(question)[-1:] + tok.encode(generated) + [tok.eos_id]
    for a, b in zip(chain, chain[1:]):
      assert successor.setdefault(a, b) == b, "chains must not share tokens"
  assert len(successor) <= cfg.d_model
  embed = np.zeros((cfg.vocab_size, cfg.d_model), np.float32)
  head = np.zeros((cfg.d_model, cfg.vocab_size), np.float32)
  for k, (a, b) in enumerate(successor.items()):
    embed[a, k] = 1.0  # token a -> basis vector k -> a logit of 10 * sqrt(D) on its successor
    head[k, b] = 10.0
  model.embed.embedding[...] = embed
  model.lm_head.kernel[...] = head
  blocks = model.blocks  # every block at once: the params are stacked on a leading layer axis
  blocks.attn.o.kernel[...] = np.zeros(blocks.attn.o.kernel.shape, np.float32)
  blocks.mlp.down.kernel[...] = np.zeros(blocks.mlp.down.kernel.shape, np.float32)
  graphdef, params = nnx.split(model)
  return cfg, graphdef, params


@pytest.fixture(scope="module")
def bigram(gpt2):
  return _bigram_model(gpt2)


def _chain_batch(tok):
  spec = pipeline.Spec(doc_buckets=(16,), qa_len=16, max_answer_len=8, loc_len=8, qa_slots=1, add_bos=False)
  qas = [pipeline.QA(np.asarray(tok.encode(q) + tok.encode(" " + gold) + [tok.eos_id], np.int32),
                     len(tok.encode(q)), q, gold) for q, _, gold in CHAINS]
  return pipeline.qa_batch(qas + [None], [0, 1, 2, -1], spec, tok.pad_id), [gold for *_, gold in CHAINS]


@pytest.mark.parametrize("decoding", ["greedy", "beam"])
def test_answer_extracts_the_generated_answer(bigram, gpt2, decoding):
  cfg, graphdef, params = bigram
  batch, _ = _chain_batch(gpt2)
  answers = qa.answer(graphdef, params, cfg, gpt2, batch, decoding=decoding, max_new_tokens=8)
  assert answers == ["Paris", "1841", "Berlin Wall", ""]


def test_answer_text_cuts_at_eos_and_cleans_up(gpt2):
  ids = gpt2.encode(" John 's car") + [gpt2.eos_id] + gpt2.encode(" junk")
  assert qa.answer_text(gpt2, ids, gpt2.eos_id) == "John's car"
  assert qa.answer_text(gpt2, [gpt2.eos_id] * 3, gpt2.eos_id) == ""


def test_evaluate_qa(bigram, gpt2):
  cfg, graphdef, params = bigram
  batch, golds = _chain_batch(gpt2)
  result = qa.evaluate_qa(graphdef, params, cfg, gpt2, [batch], golds, decoding="greedy",
                          return_predictions=True, max_new_tokens=8)
  assert result["n"] == 3 and [p["answer"] for p in result["predictions"]] == ["Paris", "1841", "Berlin Wall"]
  assert result["em"] == pytest.approx(2 / 3) == result["official_em"]
  assert result["prefix_em"] == 1.0  # "berlin wall"[:6] == "berlin"
  assert result["f1"] == pytest.approx((1 + 1 + 2 / 3) / 3)
  total, count = qa.qa_nll(graphdef, params, batch)
  assert result["tokens"] == int(count) and result["nll"] == pytest.approx(float(total) / float(count))
  nll_only = qa.evaluate_qa(graphdef, params, cfg, gpt2, [batch], golds, decoding=None, return_predictions=True)
  assert np.isnan(nll_only["f1"]) and np.isnan(nll_only["official_f1"])
  assert nll_only["nll"] == pytest.approx(result["nll"])
  assert nll_only["per_question"]["nll"] == pytest.approx(result["per_question"]["nll"])
  assert all(np.isnan(nll_only["per_question"]["em"])) and nll_only["predictions"][0]["answer"] is None
  records = [pipeline.QA(np.zeros(1, np.int32), 0, "", g) for g in golds]  # golds as QA records
  assert qa.evaluate_qa(graphdef, params, cfg, gpt2, [batch], records, "beam", max_new_tokens=8)["em"] == \
      pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="decoding='sample'"):
    qa.answer(graphdef, params, cfg, gpt2, batch, decoding="sample")


def test_evaluate_qa_per_question_scores_average_to_the_aggregates(bigram, gpt2):
  cfg, graphdef, params = bigram
  batch, _ = _chain_batch(gpt2)
  # Two batches with their rows out of qa_index order, and all golds of each question: "Berlin Wall" is
  # a gold of question 2 besides the reference's "Berlin", so only the official EM counts it right.
  batches = [{k: v[[2, 0, 3, 1]] for k, v in batch.items()}, {k: v[[3, 3, 3, 3]] for k, v in batch.items()}]
  batches[0]["qa_index_B"] = np.array([2, 0, -1, 1], np.int32)
  all_golds = [("Paris",), ("in 1841",), ("Berlin", "Berlin Wall")]
  records = [pipeline.QA(np.zeros(1, np.int32), 0, q, gold, f"id{k}", golds)
             for k, ((q, _, gold), golds) in enumerate(zip(CHAINS, all_golds))]
  result = qa.evaluate_qa(graphdef, params, cfg, gpt2, batches, records, "greedy", return_predictions=True,
                          max_new_tokens=8)
  assert result["n"] == 3
  assert result["predictions"] == [
      dict(index=k, id=f"id{k}", question=q, golds=list(r.golds), answer=a)
      for k, ((q, *_), r, a) in enumerate(zip(CHAINS, records, ["Paris", "1841", "Berlin Wall"]))]
  per = result["per_question"]
  assert per["em"] == [1.0, 1.0, 0.0] and per["official_em"] == [1.0, 0.0, 1.0]
  assert per["prefix_em"] == [1.0, 1.0, 1.0] and per["official_f1"] == pytest.approx([1.0, 2 / 3, 1.0])
  for k in qa.GENERATED_METRICS:
    assert all(isinstance(v, float) for v in per[k]) and len(per[k]) == 3
    assert np.mean(per[k]) == pytest.approx(result[k])
  assert np.average(per["nll"], weights=per["tokens"]) == pytest.approx(result["nll"])
  assert sum(per["tokens"]) == result["tokens"]
  logp_B, count_B = qa.answer_logprobs(graphdef, params, batch)  # the unshuffled batch: rows 0, 1, 2
  assert per["nll"] == pytest.approx(list(-np.asarray(logp_B)[:3] / np.asarray(count_B)[:3]), rel=1e-5)


def test_evaluate_qa_per_question_on_a_random_model(gpt2):
  cfg = ModelConfig(arch="llama", vocab_size=50304, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16,
                    max_len=64, tie_embeddings=False)
  graphdef, params = transformer.init(cfg, seed=1)
  batch, golds = _chain_batch(gpt2)
  result = qa.evaluate_qa(graphdef, params, cfg, gpt2, [batch], golds, "greedy", return_predictions=True,
                          max_new_tokens=4)
  per = result["per_question"]
  for k in qa.GENERATED_METRICS:
    assert np.mean(per[k]) == pytest.approx(result[k])
  assert np.average(per["nll"], weights=per["tokens"]) == pytest.approx(result["nll"])
  assert result["nll"] > 5  # random: about log(50304) = 10.8
  # Plain gold strings: the index is the id, the one gold is the official one too.
  assert [(p["id"], p["question"], p["golds"]) for p in result["predictions"]] == [
      (str(k), "", [g]) for k, g in enumerate(golds)]
