"""The generated default dataset: determinism, disjoint splits, answers only in their own document."""

import re

from camels_jax.data import generated


def test_same_seed_same_documents_other_seed_others():
  a = generated.generate(7, "test", 20)
  assert a == generated.generate(7, "test", 20)
  assert a[:5] == generated.generate(7, "test", 5)  # a split's k-th document does not depend on its size
  b = generated.generate(8, "test", 20)
  assert not {d.text for d in a} & {d.text for d in b}


def test_documents_are_prose_with_questions_answered_inside():
  for doc in generated.generate(0, "meta_train", 30, questions_per_doc=4):
    assert len(doc.questions) == len(doc.answers) == 4
    assert len(set(doc.questions)) == 4
    assert 60 <= len(doc.text.split()) <= 220
    for answer in doc.answers:
      assert answer in doc.text
    assert doc.question_ids == tuple(f"{doc.id}/q{k}" for k in range(4))
    assert doc.gold_answers == tuple((a,) for a in doc.answers)
  assert all(not d.questions for d in generated.generate(0, "loc", 5))


def test_splits_are_disjoint_and_answers_appear_only_in_their_document():
  docs = [d for split in generated.SPLITS for d in generated.generate(3, split, 40)]
  assert len({d.text for d in docs}) == len({d.id for d in docs}) == len(docs)
  coined = [set(re.findall(r"\b[A-Z][a-z]+\b", d.text)) for d in docs]
  for doc in docs:
    for question, answer in zip(doc.questions, doc.answers):
      # Names (people, towns, organisations) are the capitalised answers; years, numbers, trades and
      # goods are drawn from shared ranges and lists, but the question's entity pins them to one document.
      if answer[0].isupper():
        assert [d.id for d in docs if answer in d.text] == [doc.id], (question, answer)
      names = re.findall(r"\b[A-Z][a-z]+\b", question)[1:]
      assert any(sum(n in c for c in coined) == 1 for n in names), question
