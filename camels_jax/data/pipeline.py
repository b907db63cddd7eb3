"""Tokenisation, fixed-shape batches, resumable training loaders and the ordered evaluation stream.

Shapes are fixed so that jitted steps compile once per bucket: documents are padded to the smallest of a
few bucket lengths that holds them (and truncated to the largest), QA sequences to one length, locality
texts to one length, and every document carries a fixed number of question slots with a validity mask.

Array names carry their shapes: B documents (or QA sequences) per batch, L the document bucket length,
Q question slots per document, S the QA sequence length, K locality texts per batch, T their length.
Masks are boolean. `*_loss_mask_*` marks the tokens to be predicted (the answer and its EOS): a causal LM
scoring logits[..., :-1, :] against tokens[..., 1:] weights its losses with loss_mask[..., 1:].
"""

import collections
import dataclasses
import re
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from camels_jax.data.sources import DataError, Document
from camels_jax.data.splits import shuffle_groups


class Tokenizer(Protocol):
  """What the pipeline needs of `camels_jax.models.tokenizer.Tokenizer`."""

  eos_id: int
  bos_id: int | None
  pad_id: int

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    ...

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    ...


@dataclasses.dataclass(frozen=True)
class Spec:
  """Sequence shapes and tokenisation options (from the data config)."""

  doc_buckets: tuple[int, ...]  # document lengths, ascending; the last is the maximum
  qa_len: int  # S: question + answer + EOS, padded
  max_answer_len: int  # answers (with leading space and EOS) longer than this are skipped
  loc_len: int  # T: locality text length
  qa_slots: int  # Q: question slots per document in meta batches
  add_bos: bool  # prepend the tokenizer's BOS token to documents, questions and locality texts

  def __post_init__(self):
    if not self.doc_buckets or list(self.doc_buckets) != sorted(set(self.doc_buckets)):
      raise ValueError(f"doc_buckets={self.doc_buckets} must be non-empty, strictly increasing")
    if not 0 < self.max_answer_len <= self.qa_len - 2:  # room for a BOS and one question token
      raise ValueError(f"max_answer_len={self.max_answer_len} must be in [1, qa_len - 2 = {self.qa_len - 2}]")

  @classmethod
  def from_config(cls, config) -> "Spec":
    return cls(tuple(config.doc_buckets), config.qa_len, config.max_answer_len, config.loc_len,
               config.qa_slots, config.add_bos)


@dataclasses.dataclass(frozen=True)
class QA:
  """One tokenised question: `tokens` = question, then " " + answer + EOS, tokenised separately."""

  tokens: np.ndarray  # int32, unpadded, at most qa_len
  prompt_len: int  # leading question tokens (the generation prompt)
  question: str
  answer: str  # the reference's gold, which `tokens` holds
  id: str = ""  # the question's id (`Document.question_ids`)
  golds: tuple[str, ...] = ()  # every gold answer, for the official SQuAD scores


@dataclasses.dataclass(frozen=True)
class TokenizedDoc:
  doc: Document
  tokens: np.ndarray  # int32, at most the largest bucket
  qas: tuple[QA, ...]
  # bool, one per token: the token covers a character of a gold answer's occurrence in the text (the
  # "facts"; see `answer_char_mask`). Diagnostics and the oracle weighting only: no method sees it.
  answer_mask: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, bool))


def answer_char_mask(text: str, answers: Sequence[str]) -> np.ndarray:
  """bool per character of `text`: inside an occurrence of one of `answers` (case-sensitive).

  Every occurrence counts, not only the one a dataset points at (SQuAD's answer_start marks one of
  them; the generated documents state each answer once). An answer that starts or ends with a word
  character only matches at word boundaries, so "12" does not light up inside "1912".
  """
  mask = np.zeros(len(text), bool)
  for answer in {a.strip() for a in answers if a and a.strip()}:
    pattern = (r"\b" if answer[0].isalnum() else "") + re.escape(answer) + (r"\b" if answer[-1].isalnum() else "")
    for m in re.finditer(pattern, text):
      mask[m.start():m.end()] = True
  return mask


def token_mask_from_chars(char_mask: np.ndarray, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
  """bool per token: any of its characters is set in `char_mask` (an empty span, e.g. BOS, is False)."""
  return np.array([end > start and bool(char_mask[start:end].any()) for start, end in offsets], bool)


def tokenize(docs: Sequence[Document], tok: Tokenizer, spec: Spec,
             counts: collections.Counter) -> list[TokenizedDoc]:
  """Tokenises documents and their QA pairs, truncating or skipping over-long input (counted).

  Counts "documents_truncated" (longer than the largest bucket), "questions_truncated" (question cut from
  the left to fit qa_len, unlike the reference, which could cut the answer) and
  "answers_too_long" (question skipped).
  """
  bos = [tok.bos_id] if spec.add_bos and tok.bos_id is not None else []
  max_len = spec.doc_buckets[-1]
  encoded = [tok.encode_with_offsets(d.text) for d in docs]
  q_ids = iter(tok.encode_batch([q for d in docs for q in d.questions]))
  a_ids = iter(tok.encode_batch([" " + a for d in docs for a in d.answers]))
  out = []
  for doc, (ids, offsets) in zip(docs, encoded):
    ids, offsets = bos + list(ids), [(0, 0)] * len(bos) + list(offsets)
    if len(ids) > max_len:
      counts["documents_truncated"] += 1
      ids, offsets = ids[:max_len], offsets[:max_len]
    # Every gold answer as written (the reference gold is capitalised, so often not in the text).
    golds = [g for question_golds in doc.gold_answers for g in question_golds] or list(doc.answers)
    answer_mask = token_mask_from_chars(answer_char_mask(doc.text, golds), offsets)
    qas = []
    for question, answer, qid, golds in zip(doc.questions, doc.answers, doc.question_ids, doc.gold_answers):
      q, a = next(q_ids), next(a_ids) + [tok.eos_id]
      if len(a) > spec.max_answer_len:
        counts["answers_too_long"] += 1
        continue
      room = spec.qa_len - len(bos) - len(a)
      if len(q) > room:
        counts["questions_truncated"] += 1
        q = q[len(q) - room:]
      qas.append(QA(np.asarray(bos + q + a, np.int32), len(bos) + len(q), question, answer, qid, golds))
    out.append(TokenizedDoc(doc, np.asarray(ids, np.int32), tuple(qas), answer_mask))
  return out


def tokenize_texts(texts: Sequence[str], tok: Tokenizer, spec: Spec) -> list[np.ndarray]:
  """Locality texts as int32 token arrays of at most loc_len (truncation is expected, so not counted)."""
  bos = [tok.bos_id] if spec.add_bos and tok.bos_id is not None else []
  return [np.asarray((bos + ids)[:spec.loc_len], np.int32) for ids in tok.encode_batch(list(texts))]


def bucket(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket holding `length` tokens (the largest if none does)."""
  return next((b for b in buckets if b >= length), buckets[-1])


def pad(seqs: Sequence[np.ndarray], n: int, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """`n` rows of right-padded tokens and their mask; rows past len(seqs) are all padding."""
  tokens_NxL = np.full((n, length), pad_id, np.int32)
  mask_NxL = np.zeros((n, length), bool)
  for i, s in enumerate(seqs):
    tokens_NxL[i, :len(s)] = s[:length]
    mask_NxL[i, :len(s)] = True
  return tokens_NxL, mask_NxL


def qa_arrays(qas: Sequence[QA | None], spec: Spec, pad_id: int) -> dict[str, np.ndarray]:
  """QA sequences padded to [len(qas), S]; a None entry is an empty (invalid) slot."""
  n, s = len(qas), spec.qa_len
  tokens_NxS, mask_NxS = pad([qa.tokens if qa else np.zeros(0, np.int32) for qa in qas], n, s, pad_id)
  loss_mask_NxS = np.zeros((n, s), bool)
  prompt_len_N = np.zeros(n, np.int32)
  for i, qa in enumerate(qas):
    if qa:
      loss_mask_NxS[i, qa.prompt_len:len(qa.tokens)] = True
      prompt_len_N[i] = qa.prompt_len
  return dict(tokens=tokens_NxS, mask=mask_NxS, loss_mask=loss_mask_NxS, prompt_len=prompt_len_N,
              valid=np.array([qa is not None for qa in qas]))


def doc_batch(docs: Sequence[TokenizedDoc | None], spec: Spec, pad_id: int) -> dict[str, np.ndarray]:
  """Documents padded to the bucket of the longest; None entries are empty (invalid) rows."""
  real = [d for d in docs if d is not None]
  length = bucket(max((len(d.tokens) for d in real), default=1), spec.doc_buckets)
  tokens_BxL, mask_BxL = pad([d.tokens if d else np.zeros(0, np.int32) for d in docs], len(docs), length,
                             pad_id)
  answer_mask_BxL = pad([d.answer_mask if d else np.zeros(0, bool) for d in docs], len(docs), length, 0)[0] > 0
  return dict(doc_tokens_BxL=tokens_BxL, doc_mask_BxL=mask_BxL,
              doc_valid_B=np.array([d is not None for d in docs]), doc_answer_mask_BxL=answer_mask_BxL)


def qa_batch(qas: Sequence[QA | None], index_B: Sequence[int], spec: Spec,
             pad_id: int) -> dict[str, np.ndarray]:
  """QA sequences as a batch; `qa_index_B` says which question each row is (-1 for padding)."""
  a = qa_arrays(qas, spec, pad_id)
  return dict(qa_tokens_BxS=a["tokens"], qa_mask_BxS=a["mask"], qa_loss_mask_BxS=a["loss_mask"],
              qa_prompt_len_B=a["prompt_len"], qa_valid_B=a["valid"],
              qa_index_B=np.asarray(index_B, np.int32))


# A meta-training item: one document with up to Q of its questions, as (document, first QA, end QA).
Item = tuple[TokenizedDoc, int, int]


def meta_items(docs: Sequence[TokenizedDoc], q: int) -> list[Item]:
  """Items covering every question once: a document with more than Q questions yields several items.

  (The reference samples (document, question) rows, so a document recurs once per question; this keeps
  every question while giving each document Q question slots.)
  """
  return [(d, i, min(i + q, len(d.qas))) for d in docs for i in range(0, len(d.qas), q)]


def meta_batch(items: Sequence[Item | None], loc: Sequence[np.ndarray], spec: Spec,
               pad_id: int) -> dict[str, np.ndarray]:
  """Documents, their questions and locality texts; None items are empty (invalid) rows."""
  batch = doc_batch([it[0] if it else None for it in items], spec, pad_id)
  slots = [qa for it in items for qa in _slots(it, spec.qa_slots)]
  a = qa_arrays(slots, spec, pad_id)
  b, q = len(items), spec.qa_slots
  batch.update(qa_tokens_BxQxS=a["tokens"].reshape(b, q, -1), qa_mask_BxQxS=a["mask"].reshape(b, q, -1),
               qa_loss_mask_BxQxS=a["loss_mask"].reshape(b, q, -1), qa_valid_BxQ=a["valid"].reshape(b, q))
  batch["loc_tokens_KxT"], batch["loc_mask_KxT"] = pad(loc, len(loc), spec.loc_len, pad_id)
  return batch


def _slots(item: Item | None, q: int) -> list[QA | None]:
  qas = list(item[0].qas[item[1]:item[2]]) if item else []
  return qas + [None] * (q - len(qas))


class Batcher:
  """Fixed-size batches of indices into n items, reshuffled every epoch; (epoch, step) is its whole state.

  Epoch e's order is a pure function of (seed, e), so restoring (epoch, step) replays the same batches.
  A final partial batch is dropped (shapes stay fixed; the next epoch's shuffle covers those items).
  """

  def __init__(self, n: int, batch_size: int, seed: int):
    if n < batch_size:
      raise DataError(f"{n} items cannot fill a batch of {batch_size}")
    self.n, self.batch_size, self.seed = n, batch_size, seed
    self.epoch = self.step = 0
    self._order = (-1, None)

  def next(self) -> np.ndarray:
    if self.step >= self.n // self.batch_size:
      self.epoch, self.step = self.epoch + 1, 0
    if self._order[0] != self.epoch:
      self._order = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(self.n))
    start = self.step * self.batch_size
    self.step += 1
    return self._order[1][start:start + self.batch_size]


class Loader:
  """An endless iterator of training batches whose position is a small JSON-able dict of ints.

  Args:
    make_batch: builds a batch from one index array per batcher (keyword arguments named as the batchers).
    **batchers: the index streams, e.g. documents and locality texts, each with its own epochs.
  """

  def __init__(self, make_batch: Callable[..., dict[str, np.ndarray]], **batchers: Batcher):
    self._make, self._batchers = make_batch, batchers

  def __iter__(self) -> "Loader":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return self._make(**{name: b.next() for name, b in self._batchers.items()})

  def take(self, n: int, keep: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """The next n batches' positions are consumed, and only those at the indices `keep` are built.

    A process of a multi-process run keeps its own rows of a global batch (`sharding.process_rows`): every
    process walks the same global order, so the position stays one global state that any process count
    resumes from, while each builds only its share.
    """
    indices = [{name: b.next() for name, b in self._batchers.items()} for _ in range(n)]
    return [self._make(**indices[i]) for i in keep]

  @property
  def state(self) -> dict[str, int]:
    """The position: {"<batcher>_epoch": e, "<batcher>_step": s} for each batcher."""
    return {f"{k}_{f}": int(getattr(b, f)) for k, b in self._batchers.items() for f in ("epoch", "step")}

  def restore(self, state: Mapping[str, int]) -> None:
    """Continues from a position saved with `state`; later batches equal those of an unbroken run."""
    for k, b in self._batchers.items():
      b.epoch, b.step = int(state[f"{k}_epoch"]), int(state[f"{k}_step"])


def meta_loader(docs: Sequence[TokenizedDoc], loc_texts: Sequence[np.ndarray], spec: Spec, pad_id: int,
                batch_docs: int, loc_batch: int, seed: int) -> Loader:
  """Endless shuffled meta-training batches: B documents, their questions, K locality texts."""
  items = meta_items(docs, spec.qa_slots)

  def make(docs: np.ndarray, loc: np.ndarray) -> dict[str, np.ndarray]:
    return meta_batch([items[i] for i in docs], [loc_texts[i] for i in loc], spec, pad_id)

  return Loader(make, docs=Batcher(len(items), batch_docs, seed),
                loc=Batcher(len(loc_texts), loc_batch, seed + 1))


def qa_loader(docs: Sequence[TokenizedDoc], spec: Spec, pad_id: int, batch_size: int, seed: int) -> Loader:
  """Endless shuffled QA-only batches (QA tuning); qa_index_B indexes `questions(docs)`."""
  qas = questions(docs)
  return Loader(lambda qa: qa_batch([qas[i] for i in qa], qa, spec, pad_id),
                qa=Batcher(len(qas), batch_size, seed))


def questions(docs: Sequence[TokenizedDoc]) -> list[QA]:
  """All questions of `docs` in order; the indices of `qa_index_B`."""
  return [qa for d in docs for qa in d.qas]


def open_book(docs: Sequence[TokenizedDoc], spec: Spec, sep: Sequence[int],
              max_len: int | None = None) -> tuple[list[TokenizedDoc], Spec, int]:
  """`docs` whose every question carries its document in front (`with_context`)."""
  return with_context(docs, [[d.tokens] * len(d.qas) for d in docs], spec, sep, max_len)


def joined(contexts: Sequence[np.ndarray], sep: Sequence[int], add_bos: bool) -> np.ndarray:
  """Several tokenised documents as one context: in order, `sep` between them, one BOS (the first's)."""
  parts = []
  for i, tokens in enumerate(contexts):
    if i:
      parts.append(np.asarray(sep, np.int32))
    parts.append(np.asarray(tokens[int(add_bos and i > 0 and len(tokens) > 0):], np.int32))
  return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def with_context(docs: Sequence[TokenizedDoc], contexts: Sequence[Sequence[np.ndarray]], spec: Spec,
                 sep: Sequence[int], max_len: int | None = None) -> tuple[list[TokenizedDoc], Spec, int]:
  """`docs` whose question j of document i carries contexts[i][j] in front: the context's tokens (with its
  BOS, if any), `sep`, then the question and answer as tokenised (their BOS dropped); the `Spec` whose qa_len
  holds them; and how many questions had their context cut (from its end) to fit `max_len` tokens (None: no
  limit).

  The answer tokens (what is scored and generated) are unchanged; only the prompt grows.
  """
  out, longest, cut = [], spec.qa_len, 0
  for d, doc_contexts in zip(docs, contexts, strict=True):
    qas = []
    for qa, context in zip(d.qas, doc_contexts, strict=True):
      n_bos = int(spec.add_bos and len(context) > 0 and len(qa.tokens) > 0 and qa.tokens[0] == context[0])
      room = len(context) if max_len is None else max(0, max_len - len(sep) - (len(qa.tokens) - n_bos))
      cut += room < len(context)
      head = np.concatenate([context[:room], np.asarray(sep, np.int32)]).astype(np.int32)
      tokens = np.concatenate([head, qa.tokens[n_bos:]]).astype(np.int32)
      qas.append(dataclasses.replace(qa, tokens=tokens, prompt_len=len(head) + qa.prompt_len - n_bos))
      longest = max(longest, len(tokens))
    out.append(dataclasses.replace(d, qas=tuple(qas)))
  return out, dataclasses.replace(spec, qa_len=longest), cut


def qa_eval_batches(docs: Sequence[TokenizedDoc], spec: Spec, pad_id: int,
                    batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `questions(docs)` in order; the last batch is padded with invalid rows."""
  qas = questions(docs)
  for start in range(0, len(qas), batch_size):
    idx = list(range(start, min(start + batch_size, len(qas))))
    pad_n = batch_size - len(idx)
    yield qa_batch([qas[i] for i in idx] + [None] * pad_n, idx + [-1] * pad_n, spec, pad_id)


def meta_eval_batches(docs: Sequence[TokenizedDoc], loc_texts: Sequence[np.ndarray], spec: Spec, pad_id: int,
                      batch_docs: int, loc_batch: int) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the meta items of `docs` in order (meta-validation); locality texts cycle in order."""
  for n, chunk in enumerate(meta_eval_chunks(docs, spec.qa_slots, batch_docs)):
    loc = [loc_texts[(n * loc_batch + k) % len(loc_texts)] for k in range(loc_batch)]
    yield meta_batch(chunk, loc, spec, pad_id)


def meta_eval_chunks(docs: Sequence[TokenizedDoc], q: int, batch_docs: int) -> list[list[Item | None]]:
  """The items of each `meta_eval_batches` batch (None for padding rows), e.g. to weigh their texts."""
  items = meta_items(docs, q)
  chunks = [items[start:start + batch_docs] for start in range(0, len(items), batch_docs)]
  return [chunk + [None] * (batch_docs - len(chunk)) for chunk in chunks]


class Stream:
  """The ordered evaluation stream: N test documents to adapt on one at a time, then all their questions.

  The order is the reference's: groups (articles) shuffled with the stream seed, documents in source order
  inside a group, the first N taken. Its position is the index of the next document, a plain int.
  """

  def __init__(self, docs: Sequence[TokenizedDoc], n: int, seed: int, spec: Spec, pad_id: int):
    self.docs = shuffle_groups(docs, seed, key=lambda d: d.doc.group)[:n]
    self.questions = questions(self.docs)  # qa_index_B of `qa_batches` indexes this
    self._spec, self._pad_id = spec, pad_id

  def __len__(self) -> int:
    return len(self.docs)

  def doc_batch(self, i: int) -> dict[str, np.ndarray]:
    """Document i as doc_tokens_BxL / doc_mask_BxL with B=1, L its bucket."""
    return doc_batch([self.docs[i]], self._spec, self._pad_id)

  def qa_batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """All questions about the stream's documents, in stream order, padded to full batches."""
    return qa_eval_batches(self.docs, self._spec, self._pad_id, batch_size)
