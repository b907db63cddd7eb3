"""Retrieval: an index of the stream so far (never ahead of it), TF-IDF ranking, prompts with the top k."""

import numpy as np

from camels_jax.data import pipeline
from camels_jax.data.sources import Document
from camels_jax.evaluation import methods
from camels_jax.methods import retrieval

TEXTS = ("The Velmora river floods every spring and feeds the rice terraces of the lower valley.",
         "Captain Arlo Brisk sailed the Gannet to the Ostra islands in 1712, carrying salt and tin.",
         "The capital of Freedonia is Zorbatown, built on seven hills above the Velmora delta.",
         "Zorbatown's guild of glassmakers sells blue bottles across the northern coast.")


def _doc(i, questions=()):
  d = Document(f"d{i}", f"d{i}", TEXTS[i], questions=tuple(questions), answers=("x",) * len(questions))
  qas = tuple(pipeline.QA(np.array([1, 50 + k, 2], np.int32), 2, q, "x", id=f"d{i}/{k}")
              for k, q in enumerate(questions))
  return pipeline.TokenizedDoc(d, np.array([1] + [10 * (i + 1) + j for j in range(3)], np.int32), qas)


def test_the_document_that_holds_the_answer_ranks_first():
  index = methods.index_stream([_doc(i) for i in range(4)])
  top = index.top_k(["What is the capital of Freedonia?", "Which ship did Arlo Brisk sail to the Ostra islands?",
                     "What do the glassmakers of Zorbatown sell?"], 2)
  assert top[:, 0].tolist() == [2, 1, 3]
  assert top.shape == (3, 2) and len(set(top[0])) == 2
  assert retrieval.recall(top, [2, 1, 0]) == 2 / 3  # the third question's own document is not among its two


def test_the_index_at_each_position_holds_only_the_documents_already_read():
  docs = [_doc(i) for i in range(4)]
  seen = []
  methods.index_stream(docs, on_doc=lambda i, index: seen.append(index))
  assert [[d.doc.id for d in index.docs] for index in seen] == [[f"d{j}" for j in range(i + 1)] for i in range(4)]
  # The Freedonia question before its document arrives ranks only what was read; its idf counts only that.
  question = ["What is the capital of Freedonia?"]
  assert seen[1].top_k(question, 5).tolist() == [[0, 1]] and seen[2].top_k(question, 1).tolist() == [[2]]
  assert retrieval.Index().top_k(question, 3).shape == (1, 0)
  # Indices are values: a branch off an earlier one leaves the later ones as they were.
  branch = seen[1].add(docs[3])
  assert [d.doc.id for d in branch.docs] == ["d0", "d1", "d3"] and len(seen[3]) == 4
  assert [d.doc.id for d in seen[3].docs] == ["d0", "d1", "d2", "d3"]


def test_the_prompt_holds_the_retrieved_documents_best_first_and_the_same_answer():
  spec = pipeline.Spec((8,), 5, 3, 4, 2, True)
  docs = [_doc(0), _doc(1), _doc(2, ["Which capital of Freedonia has glassmakers?"]), _doc(3)]
  index = methods.index_stream(docs)
  (_, _, asked, _), _, cut, top = retrieval.prompted(docs, index, 2, spec, [99], None)
  assert top.tolist() == [[2, 3]] and cut == 0
  (qa,) = asked.qas
  # One BOS (the best document's), the separator between documents and before the question.
  np.testing.assert_array_equal(qa.tokens, [1, 30, 31, 32, 99, 40, 41, 42, 99, 50, 2])
  assert qa.tokens[qa.prompt_len:].tolist() == [2] and qa.prompt_len == 10
  # A budget cuts the least relevant document first (from the context's end).
  (_, _, short, _), short_spec, cut, _ = retrieval.prompted(docs, index, 2, spec, [99], 8)
  np.testing.assert_array_equal(short.qas[0].tokens, [1, 30, 31, 32, 99, 99, 50, 2])
  assert cut == 1 and short_spec.qa_len == 8
