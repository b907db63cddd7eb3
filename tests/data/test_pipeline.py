"""Tokenisation, answer masks, buckets, resumable loaders and the evaluation stream."""

import collections
import json

import numpy as np
import pytest

from camels_jax.data import generated, pipeline
from camels_jax.data.sources import Document

SPEC = pipeline.Spec(doc_buckets=(64, 128, 256), qa_len=32, max_answer_len=12, loc_len=48, qa_slots=2,
                     add_bos=False)


def _tokenized(tok, n=10, seed=0, spec=SPEC):
  counts = collections.Counter()
  return pipeline.tokenize(generated.generate(seed, "meta_train", n, questions_per_doc=3), tok, spec, counts)


def test_answer_loss_mask_covers_exactly_the_answer_and_eos(tok):
  docs = _tokenized(tok)
  qas = pipeline.questions(docs)
  batch = pipeline.qa_batch(qas + [None], list(range(len(qas))) + [-1], SPEC, tok.pad_id)
  for i, qa in enumerate(qas):
    tokens, loss = batch["qa_tokens_BxS"][i], batch["qa_loss_mask_BxS"][i]
    assert tok.decode(tokens[loss]) == " " + qa.answer + "<|endoftext|>"
    n = len(qa.tokens)
    assert loss[batch["qa_prompt_len_B"][i]:n].all() and loss.sum() == n - batch["qa_prompt_len_B"][i]
    assert tok.decode(tokens[:batch["qa_prompt_len_B"][i]]) == qa.question
    assert batch["qa_mask_BxS"][i].sum() == n and (tokens[n:] == tok.pad_id).all()
  assert not batch["qa_valid_B"][-1] and not batch["qa_loss_mask_BxS"][-1].any()


def test_meta_batch_masks_per_question_slot(tok):
  docs = _tokenized(tok, n=4)
  items = pipeline.meta_items(docs, SPEC.qa_slots)
  assert [(i, j) for _, i, j in items] == [(0, 2), (2, 3)] * 4  # 3 questions -> slots of 2, then 1
  loc = pipeline.tokenize_texts(["Some unrelated text."], tok, SPEC)
  batch = pipeline.meta_batch(items[:3] + [None], loc, SPEC, tok.pad_id)
  assert batch["qa_valid_BxQ"].tolist() == [[True, True], [True, False], [True, True], [False, False]]
  assert batch["doc_valid_B"].tolist() == [True, True, True, False]
  for b, (doc, i, _) in enumerate(items[:3]):
    for q in range(2):
      if batch["qa_valid_BxQ"][b, q]:
        loss = batch["qa_loss_mask_BxQxS"][b, q]
        answer = tok.decode(batch["qa_tokens_BxQxS"][b, q][loss])
        assert answer == " " + doc.qas[i + q].answer + "<|endoftext|>"
  assert not batch["qa_loss_mask_BxQxS"][~batch["qa_valid_BxQ"]].any()
  assert batch["loc_tokens_KxT"].shape == batch["loc_mask_KxT"].shape == (1, SPEC.loc_len)
  assert tok.decode(batch["loc_tokens_KxT"][0][batch["loc_mask_KxT"][0]]) == "Some unrelated text."


def test_buckets_truncation_and_long_questions_are_counted(tok):
  spec = pipeline.Spec(doc_buckets=(8, 16), qa_len=10, max_answer_len=4, loc_len=8, qa_slots=1, add_bos=False)
  docs = [Document("a", "a", "short text", ("A rather long question with many words in it?", "Q?"),
                   ("yes", "an answer that is far too long to fit")),
          Document("b", "b", "word " * 40, (), ())]
  counts = collections.Counter()
  out = pipeline.tokenize(docs, tok, spec, counts)
  assert counts == dict(documents_truncated=1, questions_truncated=1, answers_too_long=1)
  assert len(out[1].tokens) == 16 and len(out[0].qas) == 1
  qa = out[0].qas[0]  # the question lost its start; the answer and EOS are intact
  assert len(qa.tokens) == 10 and tok.decode(qa.tokens[qa.prompt_len:]) == " yes<|endoftext|>"
  assert (qa.id, qa.golds) == ("a/0", ("yes",))  # the document's defaults, carried per question
  assert pipeline.doc_batch([out[0]], spec, tok.pad_id)["doc_tokens_BxL"].shape == (1, 8)
  assert pipeline.doc_batch(out, spec, tok.pad_id)["doc_tokens_BxL"].shape == (2, 16)
  assert [pipeline.bucket(n, (8, 16)) for n in (1, 8, 9, 16, 99)] == [8, 8, 16, 16, 16]


def test_questions_carry_their_ids_and_golds_past_skipped_ones(tok):
  spec = pipeline.Spec(doc_buckets=(16,), qa_len=12, max_answer_len=4, loc_len=8, qa_slots=1, add_bos=False)
  doc = Document("d", "d", "Text.", ("Long?", "Short?"), ("an answer that is far too long to fit", "Yes"),
                 question_ids=("q-long", "q-short"), gold_answers=(("x",), ("yes", "yes indeed")))
  out = pipeline.tokenize([doc], tok, spec, collections.Counter())
  assert [(qa.question, qa.answer, qa.id, qa.golds) for qa in out[0].qas] == [
      ("Short?", "Yes", "q-short", ("yes", "yes indeed"))]


def test_bos_is_prepended_when_asked(tok):
  spec = pipeline.Spec((64,), 32, 12, 16, 1, add_bos=True)
  out = pipeline.tokenize([Document("a", "a", "Text.", ("Q?",), ("A",))], tok, spec, collections.Counter())
  assert out[0].tokens[0] == tok.bos_id and out[0].qas[0].tokens[0] == tok.bos_id
  assert pipeline.tokenize_texts(["x"], tok, spec)[0][0] == tok.bos_id


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("make", ["meta", "qa"])
def test_loader_resumes_exactly_from_json_state(tok, make):
  docs = _tokenized(tok, n=10)
  loc = pipeline.tokenize_texts([f"Locality text {i}." for i in range(3)], tok, SPEC)

  def loader():
    if make == "meta":
      return pipeline.meta_loader(docs, loc, SPEC, tok.pad_id, batch_docs=4, loc_batch=2, seed=5)
    return pipeline.qa_loader(docs, SPEC, tok.pad_id, batch_size=8, seed=5)

  run = loader()
  first = [next(run) for _ in range(7)]  # crosses epoch boundaries (5 or 3 batches per epoch)
  state = json.loads(json.dumps(run.state))
  rest = [next(run) for _ in range(6)]
  resumed = loader()
  resumed.restore(state)
  assert all(_equal(a, b) for a, b in zip(rest, [next(resumed) for _ in range(6)]))
  again = loader()
  assert all(_equal(a, b) for a, b in zip(first, [next(again) for _ in range(7)]))  # deterministic
  assert any(not _equal(a, b) for a, b in zip(first[:3], first[3:6]))  # epochs are reshuffled


def test_take_builds_only_the_kept_batches_of_the_global_order(tok):
  docs = _tokenized(tok, n=10)
  loc = pipeline.tokenize_texts([f"Locality text {i}." for i in range(3)], tok, SPEC)
  loader = lambda: pipeline.meta_loader(docs, loc, SPEC, tok.pad_id, batch_docs=4, loc_batch=2, seed=5)
  whole, part = loader(), loader()
  every = [next(whole) for _ in range(8)]
  # Two processes' view of 2 steps of 4 streams: process 1 keeps streams 2 and 3 of each step.
  kept = part.take(4, [2, 3]) + part.take(4, [2, 3])
  assert all(_equal(a, b) for a, b in zip(kept, [every[2], every[3], every[6], every[7]]))
  assert part.state == whole.state  # one global position, whatever each process built


def test_stream_order_is_seeded_and_keeps_articles_in_order(tok):
  docs = [Document(f"{g}/{p}", g, f"Article {g}, paragraph {p}.", ("Q?",), ("A",))
          for g in "abcdef" for p in range(3)]
  tokenized = pipeline.tokenize(docs, tok, SPEC, collections.Counter())
  ids = lambda s: [d.doc.id for d in pipeline.Stream(tokenized, 10, s, SPEC, tok.pad_id).docs]
  assert ids(42) == ids(42) and ids(42) != ids(1)
  order = ids(42)
  assert len(order) == 10
  for i in range(0, 9, 3):  # whole articles, paragraphs in source order
    assert [x.split("/")[1] for x in order[i:i + 3]] == ["0", "1", "2"]
  stream = pipeline.Stream(tokenized, 10, 42, SPEC, tok.pad_id)
  assert stream.doc_batch(0)["doc_tokens_BxL"].shape == (1, 64)
  batches = list(stream.qa_batches(4))
  assert len(batches) == 3 and batches[-1]["qa_index_B"].tolist() == [8, 9, -1, -1]


def test_eval_passes_cover_everything_once_with_padding(tok):
  docs = _tokenized(tok, n=5)
  loc = pipeline.tokenize_texts(["x", "y"], tok, SPEC)
  meta = list(pipeline.meta_eval_batches(docs, loc, SPEC, tok.pad_id, batch_docs=4, loc_batch=1))
  assert len(meta) == 3 and sum(b["doc_valid_B"].sum() for b in meta) == 10
  assert sum(b["qa_valid_BxQ"].sum() for b in meta) == 15
  qa = list(pipeline.qa_eval_batches(docs, SPEC, tok.pad_id, batch_size=4))
  assert [i for b in qa for i in b["qa_index_B"] if i >= 0] == list(range(15))
