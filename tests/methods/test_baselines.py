"""Baseline token weightings: uniform, SSM (spaCy NER), TF-IDF; alignment with the pipeline; heatmaps."""

import collections
import math

import matplotlib.image
import numpy as np
import pytest

from camels_jax import plots
from camels_jax.data import pipeline
from camels_jax.data.sources import Document
from camels_jax.methods import baselines as bl
from camels_jax.models import tokenizer as tokenizer_lib

OBAMA = "Barack Obama was born in Hawaii in 1961 and had 2 dogs."

# TF-IDF corpus. GPT-2 tokens of DOC0: We|'ll| see| the| cat|,| don|'t| we|?| The| (|cat|)| sat|.
DOC0 = "We'll see the cat, don't we? The (cat) sat."
CORPUS = [DOC0, "The dog sat.", "A cat, a dog!"]
# Words of 2+ word characters, lowercased ("a", "t" are skipped), counted by hand.
COUNTS0 = {"we": 2, "ll": 1, "see": 1, "the": 2, "cat": 2, "don": 1, "sat": 1}
DF = {"we": 1, "ll": 1, "see": 1, "the": 2, "cat": 2, "don": 1, "sat": 2, "dog": 2}


def _tfidf(counts: dict[str, int]) -> dict[str, float]:
  """Hand tf-idf: raw tf * (ln((1 + n) / (1 + df)) + 1), then l2-normalised."""
  n = len(CORPUS)
  raw = {w: c * (math.log((1 + n) / (1 + DF[w])) + 1) for w, c in counts.items()}
  norm = math.sqrt(sum(v * v for v in raw.values()))
  return {w: v / norm for w, v in raw.items()}


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.gpt2()


@pytest.fixture(scope="module")
def ssm():
  return bl.make_weighter("ssm")


@pytest.fixture(scope="module")
def tfidf():
  return bl.make_weighter("tfidf", CORPUS + [CORPUS[1]])  # a repeated document counts once


def _pieces(tok, text):
  ids, offsets = tok.encode_with_offsets(text)
  return ids, offsets, [text[s:e] for s, e in offsets]


# ------------------------------------------------------------------------------------------------
# Uniform


def test_uniform(tok):
  mask_BxL = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
  w_BxL = bl.uniform_weights(mask_BxL)
  assert w_BxL.dtype == np.float32 and w_BxL.tolist() == mask_BxL.astype(float).tolist()
  w_L = bl.weights_for_tokens(bl.make_weighter("uniform"), "The dog sat.", tok, 6, add_bos=True)
  assert w_L.tolist() == [1, 1, 1, 1, 1, 0]  # BOS + 4 tokens, then padding
  with pytest.raises(ValueError, match="no options"):
    bl.make_weighter("uniform", min_threshold=0.1)
  with pytest.raises(ValueError, match="unknown weighting"):
    bl.make_weighter("camels")


# ------------------------------------------------------------------------------------------------
# SSM


def test_ssm_known_sentence(tok, ssm):
  # What en_core_web_sm 3.8.0 finds: the CARDINAL "2" is ignored, the DATE "1961" kept.
  assert ssm.entities(OBAMA) == [(0, 12, "PERSON", "Barack Obama"), (25, 31, "GPE", "Hawaii"),
                                 (35, 39, "DATE", "1961"), (48, 49, "CARDINAL", "2")]
  ids, offsets, pieces = _pieces(tok, OBAMA)
  assert pieces == ["Bar", "ack", " Obama", " was", " born", " in", " Hawaii", " in", " 1961", " and",
                    " had", " 2", " dogs", "."]
  w_N = ssm.weights(OBAMA, ids, offsets)
  assert w_N.dtype == np.float32
  got = {p: float(w) for p, w in zip(pieces, w_N) if w}
  assert got == {"Bar": 1, "ack": 1, " Obama": 1, " Hawaii": 1, " 1961": 1}
  assert set(w_N.tolist()) == {0.0, 1.0}


def test_ssm_ignored_labels(tok, ssm):
  text = "Apple paid $3 billion at 5 pm on Monday, a 10% rise, for the first time, 20 kilograms."
  assert [label for *_, label, _ in ssm.entities(text)] == [
      "ORG", "MONEY", "TIME", "DATE", "PERCENT", "ORDINAL", "QUANTITY"]
  ids, offsets, pieces = _pieces(tok, text)
  w_N = ssm.weights(text, ids, offsets)
  assert [p for p, w in zip(pieces, w_N) if w] == ["Apple", " Monday"]
  # Overriding the ignored labels marks the amounts too.
  everything = bl.SSMWeighter(ignored_labels=())
  assert "billion" in "".join(p for p, w in zip(pieces, everything.weights(text, ids, offsets)) if w)


def _reference_ssm(tok, nlp, ids):
  """The reference's mapping: decode tokens one by one, spaCy on the concatenation, str.find tokens."""
  pieces = [tok.decode([i]) for i in ids]
  text = "".join(pieces)
  char_w = np.zeros(len(text))
  cursor = 0
  for t in nlp(text):
    start = text.find(t.text, cursor)
    if t.ent_type_ and t.ent_type_ not in bl.SSM_IGNORED_LABELS:
      char_w[start:start + len(t.text)] = 1
    cursor = start + len(t.text)
  bounds = np.cumsum([0] + [len(p) for p in pieces])
  return np.array([char_w[a:b].max() if b > a else 0 for a, b in zip(bounds[:-1], bounds[1:])]), text


def test_ssm_matches_reference_mapping_and_full_pipeline(tok, ssm, shared_data):
  """Offsets + the trimmed pipeline give the reference's tokens (full spaCy pipeline, decode + find)."""
  import spacy

  full = spacy.load(bl.SSM_MODELS[0])  # every component, as the reference loads it
  with open(shared_data("wikitext2_raw_test.txt"), encoding="utf-8") as f:
    paragraphs = [line for line in f.read().splitlines() if len(line) > 300 and line.isascii()][:25]
  marked = 0
  for text in paragraphs:
    ids, offsets = tok.encode_with_offsets(text)
    want, rebuilt = _reference_ssm(tok, full, ids)
    assert rebuilt == text  # byte-level BPE: the decoded pieces are the text itself
    np.testing.assert_array_equal(ssm.weights(text, ids, offsets), want)
    marked += want.sum()
  assert marked > 100  # the paragraphs do have entities


def test_ssm_missing_model_message():
  bl.load_ner.cache_clear()
  try:
    with pytest.raises(ImportError, match=r"pip install -e \.\[ssm\]"):
      bl.load_ner("no_such_spacy_model")
  finally:
    bl.load_ner.cache_clear()


# ------------------------------------------------------------------------------------------------
# TF-IDF


def test_tfidf_hand_computed(tok, tfidf):
  v = _tfidf(COUNTS0)
  ids, offsets, pieces = _pieces(tok, DOC0)
  w_N = tfidf.weights(DOC0, ids, offsets)
  expected = {"We": v["we"], "'ll": v["ll"], " see": v["see"], " the": v["the"], " cat": v["cat"],
              ",": 0, " don": v["don"], "'t": 0, " we": v["we"], "?": 0, " The": v["the"], " (": 0,
              "cat": v["cat"], ")": 0, " sat": v["sat"], ".": 0}
  assert len(pieces) == len(expected)
  for piece, w in zip(pieces, w_N):
    assert w == pytest.approx(expected[piece], rel=1e-6), piece
  assert w_N.dtype == np.float32


def test_tfidf_token_spanning_two_words_takes_max(tfidf):
  v = _tfidf(COUNTS0)
  start = DOC0.index("see the")
  # Hand-made spans (a coarser tokenizer): "see the" | " cat, don" | "'t we"
  offsets = [(start, start + 7), (start + 7, start + 16), (start + 16, start + 21)]
  w_N = tfidf.weights(DOC0, [0, 0, 0], offsets)
  np.testing.assert_allclose(w_N, [max(v["see"], v["the"]), max(v["cat"], v["don"]), v["we"]], rtol=1e-6)


def test_tfidf_threshold_and_unknown_words(tok):
  v = _tfidf(COUNTS0)
  strict = bl.make_weighter("tfidf", CORPUS, min_threshold=0.3)
  ids, offsets, pieces = _pieces(tok, DOC0)
  kept = {p: float(w) for p, w in zip(pieces, strict.weights(DOC0, ids, offsets)) if w}
  assert {p for p in kept} == {"We", " we", " the", " The", " cat", "cat"}  # we .57, the/cat .43
  assert kept["We"] == pytest.approx(v["we"], rel=1e-6) and v["sat"] < v["ll"] < 0.3 < v["the"]
  # Words the fit never saw get 0: "dog" is the only known word, so l2 makes it 1.
  ids, offsets, pieces = _pieces(tok, "zebra dog")
  w_N = strict.weights("zebra dog", ids, offsets)
  assert pieces[-1] == " dog" and w_N[-1] == pytest.approx(1.0) and not w_N[:-1].any()
  with pytest.raises(ValueError, match="min_threshold"):
    bl.TfidfWeighter(min_threshold=-1)
  with pytest.raises(ValueError, match="fit"):
    bl.TfidfWeighter().char_weights("text")


def test_tfidf_lowercasing_that_changes_length():
  # "İ".lower() is two characters ("i" + combining dot): spans must still land on the original text.
  text = "İstanbul is big"
  weighter = bl.TfidfWeighter().fit([text, "other words"])
  char_w = weighter.char_weights(text)
  assert [i for i, w in enumerate(char_w) if w] == list(range(1, 8)) + [9, 10] + [12, 13, 14]


# ------------------------------------------------------------------------------------------------
# Alignment with the data pipeline: BOS, truncation, padding.


def test_weights_for_tokens_truncates_and_pads(tok, tfidf):
  ids, offsets, pieces = _pieces(tok, DOC0)
  w_L = bl.weights_for_tokens(tfidf, DOC0, tok, 24)
  assert w_L.shape == (24,) and w_L.dtype == np.float32
  np.testing.assert_array_equal(w_L[:len(ids)], tfidf.weights(DOC0, ids, offsets))
  assert not w_L[len(ids):].any()
  # Cut after "We'll see the cat": tf-idf of the seen text only (each word once).
  v = _tfidf({"we": 1, "ll": 1, "see": 1, "the": 1, "cat": 1})
  w5 = bl.weights_for_tokens(tfidf, DOC0, tok, 5)
  np.testing.assert_allclose(w5, [v["we"], v["ll"], v["see"], v["the"], v["cat"]], rtol=1e-6)
  # With BOS: a 0 in front (empty span), the rest shifted by one.
  wb = bl.weights_for_tokens(tfidf, DOC0, tok, 6, add_bos=True)
  np.testing.assert_array_equal(wb, np.concatenate([[0], w5]))


def test_weights_align_with_doc_batch(tok, ssm, tfidf):
  spec = pipeline.Spec(doc_buckets=(8, 16), qa_len=8, max_answer_len=4, loc_len=8, qa_slots=1, add_bos=True)
  docs = [Document("a", "a", OBAMA), Document("b", "b", DOC0 + " " + DOC0)]  # the second is truncated
  counts = collections.Counter()
  batch = pipeline.doc_batch(pipeline.tokenize(docs, tok, spec, counts) + [None], spec, tok.pad_id)
  assert counts["documents_truncated"] == 1
  tokens_BxL, mask_BxL = batch["doc_tokens_BxL"], batch["doc_mask_BxL"]
  length = tokens_BxL.shape[1]
  for weighter in (ssm, tfidf, bl.UniformWeighter()):
    w_BxL = bl.weights_batch(weighter, [d.text for d in docs] + [None], tok, length, add_bos=True)
    assert w_BxL.shape == tokens_BxL.shape
    assert not w_BxL[~mask_BxL].any()  # 0 on padding and on the empty row
    for b, d in enumerate(docs):
      np.testing.assert_array_equal(
          w_BxL[b], bl.weights_for_tokens(weighter, d.text, tok, length, True, tokens_BxL[b]))
  np.testing.assert_array_equal(bl.weights_batch(bl.UniformWeighter(), [d.text for d in docs] + [None], tok,
                                                 length, add_bos=True), bl.uniform_weights(mask_BxL))
  with pytest.raises(ValueError, match="not this text's tokenisation"):
    bl.weights_for_tokens(ssm, OBAMA, tok, length, add_bos=False, expected_tokens=tokens_BxL[0])


def test_token_strings_rebuild_text(tok):
  text = "Café 東京 😀 ok"
  _, offsets = tok.encode_with_offsets(text)
  strs = plots.token_strings(text, offsets)
  assert "".join(strs) == text and len(strs) == len(offsets)


# ------------------------------------------------------------------------------------------------
# Heatmaps


def test_heatmaps_written(tmp_path, tok, ssm, tfidf):
  docs, titles = [], []
  for name, weighter, text in [("ssm", ssm, OBAMA), ("tfidf", tfidf, DOC0),
                               ("tfidf", tfidf, "Paid $3 and $4 <b>&\n東京 😀 line two\twith tab")]:
    ids, offsets = tok.encode_with_offsets(text)
    docs.append((plots.token_strings(text, offsets), bl.weights_for_tokens(weighter, text, tok, len(ids) + 3)))
    titles.append(name)
  section = plots.heatmap_html(*docs[0], "SSM <demo>")
  assert "SSM &lt;demo&gt;" in section and section.count("<span") == len(docs[0][0])
  assert "rgb(227,26,28)" in section and "rgb(255,255,255)" in section  # max weight red, 0 white
  html_path = tmp_path / "out" / "w.html"
  plots.write_heatmap_html(str(html_path), docs, titles)
  page = html_path.read_text(encoding="utf-8")
  assert page.startswith("<!DOCTYPE html>") and "&lt;" in page and "<b>" not in page and page.count("<section") == 3
  png_path = tmp_path / "out" / "w.png"
  plots.heatmap_png(str(png_path), docs, titles, width=40)
  image = matplotlib.image.imread(str(png_path))
  assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
  assert image[..., :3].std() > 0.01  # not blank
  assert sorted(p.name for p in png_path.parent.iterdir()) == ["w.html", "w.png"]  # no temp files left
  with pytest.raises(ValueError, match="titles"):
    plots.heatmap_png(str(png_path), docs, titles[:1])


def test_png_layout_wraps_at_token_boundaries():
  tokens = ["Hello", " world", ",", " a", " verylongtokenthatdoesnotfit", "\n", "next", " line"]
  lines = plots._lines(tokens, np.ones(len(tokens)), width=12)
  texts = ["".join(chunk for _, chunk, _ in line) for line in lines]
  # A token longer than a line fills the current one and continues; shorter ones move down whole.
  assert texts == ["Hello world,", "a verylongto", "kenthatdoesn", "otfit", "next line"]
  assert all(col + len(chunk) <= 12 for line in lines for col, chunk, _ in line)
