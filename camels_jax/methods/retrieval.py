"""Retrieval: what a user who wants a model to know new documents tries first. The stream's documents are
indexed as they arrive; each question is answered by the frozen QA-tuned model with the top-k documents
ranked for it in its prompt (`prompted`), or, for MAC + retrieval, with a memory bank restricted to those k
documents before aggregation (`camels_jax.methods.mac.prefix_rows`).

Ranking is scikit-learn's TF-IDF (`TfidfVectorizer`, English stop words, sublinear term frequency) with
cosine similarity between the question and each document, refit on the documents seen so far each time
questions are answered: an index never holds, and its idf never counts, a document the stream has not reached.
The MAC paper pairs MAC with BM25; TF-IDF is what the installed stack ranks with (no hand-written ranking, no
new dependency), and `recall` says how often the question's own document is among the k, which is what
either ranking has to get right.
"""

from collections.abc import Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from camels_jax.data import pipeline


class Index:
  """The documents of a stream read so far, in arrival order.

  Adding shares one list between an index and the one it grew from (adding to an index that is not the newest
  of its list copies it first), so a stream of M documents costs O(M), and every index stays a value.
  """

  def __init__(self, docs: Sequence = ()):
    self._docs, self._n = list(docs), len(docs)

  def add(self, d) -> "Index":
    docs = self._docs if len(self._docs) == self._n else self._docs[:self._n]  # a branch gets its own list
    docs.append(d)
    index = Index.__new__(Index)
    index._docs, index._n = docs, self._n + 1
    return index

  @property
  def docs(self) -> list:
    return self._docs[:self._n]

  def __len__(self) -> int:
    return self._n

  def top_k(self, questions: Sequence[str], k: int) -> np.ndarray:
    """int [Q, min(k, len(self))]: each question's k best documents (indices into `docs`), best first; ties
    go to the earlier document."""
    docs = self.docs
    if not docs or k < 1:
      return np.zeros((len(questions), 0), np.int64)
    vectorizer = TfidfVectorizer(stop_words="english", sublinear_tf=True)
    try:
      d_MxV = vectorizer.fit_transform([d.doc.text for d in docs])
    except ValueError:  # no word that is not a stop word in any document: nothing to rank by
      return np.tile(np.arange(min(k, len(docs))), (len(questions), 1))
    # Rows of TfidfVectorizer are L2-normalised: the dot product is the cosine.
    s_QxM = (vectorizer.transform(list(questions)) @ d_MxV.T).toarray()
    return np.argsort(-s_QxM, axis=1, kind="stable")[:, :k]


def recall(top_QxK: np.ndarray, own_Q: Sequence[int]) -> float | None:
  """Fraction of questions whose own document (its index in the stream) is among their retrieved ones."""
  if not len(own_Q):
    return None
  return float(np.mean([own in row for own, row in zip(own_Q, top_QxK)]))


def own_documents(docs) -> np.ndarray:
  """The stream index of each question's document, in `pipeline.questions(docs)` order."""
  return np.repeat(np.arange(len(docs)), [len(d.qas) for d in docs])


def prompted(docs, index: Index, k: int, spec: pipeline.Spec, sep: Sequence[int], max_len: int | None):
  """(`docs` whose every question carries its k retrieved documents in front, best first (`pipeline.with_context`;
  the least relevant cut first where `max_len` runs out), their `Spec`, questions cut, top_QxK)."""
  top_QxK = index.top_k([qa.question for qa in pipeline.questions(docs)], k)
  seen = index.docs
  rows = iter(top_QxK)
  contexts = [[pipeline.joined([seen[j].tokens for j in next(rows)], sep, spec.add_bos) for _ in d.qas]
              for d in docs]
  return (*pipeline.with_context(docs, contexts, spec, sep, max_len), top_QxK)
