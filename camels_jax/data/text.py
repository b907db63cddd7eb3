"""Plain text for language modelling (FWL training, perplexity, dynamic evaluation).

A text is cut into articles, and whole articles are held out for evaluation, so that no evaluated text was
seen in training, not even a neighbouring window of it. WikiText articles start at top-level headings
(" = Title = "); a text without them (tiny-shakespeare) is cut into blocks of paragraphs of about
`block_chars` characters. With no file, the generated dataset's documents are the articles (no files needed).
"""

import math
import re
from collections.abc import Sequence

import ml_collections
import numpy as np

from camels_jax import checks
from camels_jax.data import generated
from camels_jax.data.sources import read_text

_WIKITEXT_HEADING = re.compile(r"^= [^=].* =$")  # "= = Section = =" lines are inside an article


def text_config() -> ml_collections.ConfigDict:
  """Where language-modelling text comes from and which part is held out."""
  return ml_collections.ConfigDict(dict(
      text_file="",  # a UTF-8 text file (WikiText raw, tiny-shakespeare, ...); "" = generated documents
      heldout_fraction=0.1,  # test articles: the last fraction of the articles, held out for evaluation, in (0, 1)
      val_fraction=0.1,  # validation articles (early stopping, selection): this fraction before the test ones
      block_chars=10000,  # articles of a text without WikiText headings: paragraph blocks of this many chars
      generated_seed=0,  # seed of the generated documents (text_file "")
      generated_docs=400,  # generated documents (text_file ""), >= 2
  ))


RULES = {
    "text_file": checks.string,
    "heldout_fraction": checks.between(0, 1),
    "val_fraction": checks.between(0, 1),
    "block_chars": checks.count,
    "generated_seed": checks.seed,
    "generated_docs": checks.at_least(2, integer=True),
}


def _fractions_leave_training_articles(c, at=""):
  if c.val_fraction + c.heldout_fraction >= 1:
    return [f"{at}val_fraction={c.val_fraction} + {at}heldout_fraction={c.heldout_fraction} must be < 1: "
            f"some articles must be left for training"]
  return []


CROSS = [_fractions_leave_training_articles]


def articles(text: str, block_chars: int = 10000) -> list[str]:
  """The articles of a text: WikiText's top-level sections if it has them, else paragraph blocks."""
  lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
  starts = [i for i, line in enumerate(lines) if _WIKITEXT_HEADING.match(line.strip())]
  if len(starts) >= 2:
    bounds = [*starts, len(lines)]
    found = ["\n".join(lines[a:b]).strip() for a, b in zip(bounds[:-1], bounds[1:])]
  else:
    found, block = [], []
    for paragraph in re.split(r"\n\s*\n", "\n".join(lines)):
      block.append(paragraph)
      if sum(len(p) for p in block) >= block_chars:
        found.append("\n\n".join(block).strip())
        block = []
    if block:
      found.append("\n\n".join(block).strip())
  return [a for a in found if a]


def split_three(items: Sequence[str], val_fraction: float,
                heldout_fraction: float) -> tuple[list[str], list[str], list[str]]:
  """(train, validation, test): the last ceil(heldout_fraction * n) articles are the test articles, the
  ceil(val_fraction * n) before them the validation articles (at least one of each)."""
  if len(items) < 3:
    raise checks.UserError(f"{len(items)} article(s): training, validation and test articles need at least 3")
  n = len(items)
  n_test = min(n - 2, max(1, math.ceil(heldout_fraction * n)))
  n_val = min(n - 1 - n_test, max(1, math.ceil(val_fraction * n)))
  return list(items[:n - n_test - n_val]), list(items[n - n_test - n_val:n - n_test]), list(items[n - n_test:])


def load_articles(c: ml_collections.ConfigDict) -> tuple[list[str], list[str], list[str]]:
  """(train, validation, test) articles of a `text_config()` section (`split_three`)."""
  if c.text_file:
    items = articles(read_text(c.text_file), c.block_chars)
  else:
    items = [d.text for d in generated.generate(c.generated_seed, "meta_train", c.generated_docs)]
  return split_three(items, c.val_fraction, c.heldout_fraction)


def token_stream(tokenizer, texts: Sequence[str], add_bos: bool = False) -> list[int]:
  """The texts' tokens one after another, each text ended by EOS (so windows can cross articles)."""
  ids = []
  for t in texts:
    ids += tokenizer.encode(t, add_bos=add_bos) + [tokenizer.eos_id]
  return ids


def windows(ids: Sequence[int], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """tokens_NxL and mask_NxL of consecutive, non-overlapping windows (the last one right-padded)."""
  n = max(1, math.ceil(len(ids) / seq_len))
  tokens_NxL = np.full((n, seq_len), pad_id, np.int32)
  mask_NxL = np.zeros((n, seq_len), np.int32)
  for i in range(n):
    chunk = ids[i * seq_len:(i + 1) * seq_len]
    tokens_NxL[i, :len(chunk)] = chunk
    mask_NxL[i, :len(chunk)] = 1
  return tokens_NxL, mask_NxL
