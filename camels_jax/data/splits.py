"""The CaMeLS splits (QA-train, QA-val, meta-train, meta-val, test), disjoint by group and by document."""

import collections
from typing import Callable, Mapping, Sequence, TypeVar

import numpy as np

from camels_jax.data.builders import FULL, SPLITS
from camels_jax.data.sources import DataError, Document


T = TypeVar("T")


def groups(items: Sequence[T], key: Callable[[T], str] = lambda d: d.group) -> list[list[T]]:
  """Items grouped by `key`, groups in order of first appearance, items in source order."""
  by_group: dict[str, list[T]] = {}
  for item in items:
    by_group.setdefault(key(item), []).append(item)
  return list(by_group.values())


def shuffle_groups(items: Sequence[T], seed: int, key: Callable[[T], str] = lambda d: d.group) -> list[T]:
  """Items with their groups in a seeded random order, keeping source order inside each group.

  This is the reference's `shuffle_groups`: an article's paragraphs stay together and in order.
  """
  grouped = groups(items, key)
  order = np.random.default_rng(seed).permutation(len(grouped))
  return [item for i in order for item in grouped[i]]


def check_sizes(sizes: Mapping[str, int]) -> dict[str, int]:
  """Split sizes as {split: int} for every name in SPLITS (absent = 0); unknown names are an error."""
  unknown = set(sizes) - set(SPLITS)
  if unknown:
    raise DataError(f"unknown split names {sorted(unknown)} in split sizes; expected {SPLITS}")
  return {s: int(sizes.get(s, 0)) for s in SPLITS}


def assign(sources: Mapping[str, Sequence[Document]], sizes: Mapping[str, int], seed: int,
           counts: collections.Counter) -> dict[str, list[Document]]:
  """The five CaMeLS splits from a dataset's documents.

  Args:
    sources: documents per builder split: either {FULL: pool}, which is cut into consecutive runs of
      shuffled groups, or documents per CaMeLS split (a split may be absent, meaning empty).
    sizes: groups per split; -1 means all (for a pool: all remaining groups, allowed for one split only).
    seed: seed of the group shuffle.
    counts: receives "cross_split_duplicates", documents dropped because their text is in another split.

  Returns:
    Documents per split in `SPLITS`, groups in shuffled order.

  Raises:
    DataError: if the sizes ask for more groups than a pool has, or use -1 twice.
  """
  sizes = check_sizes(sizes)
  if FULL in sources:
    pool = groups(shuffle_groups(sources[FULL], seed))
    rest = [s for s in SPLITS if sizes[s] < 0]
    if len(rest) > 1:
      raise DataError(f"split sizes: only one split may be -1 (all remaining groups), got {rest}")
    fixed = sum(n for n in sizes.values() if n >= 0)
    if fixed > len(pool):
      raise DataError(f"split sizes {sizes} need {fixed} groups but the data has {len(pool)}")
    if rest:
      sizes[rest[0]] = len(pool) - fixed
    out, start = {}, 0
    for split in SPLITS:
      out[split] = [doc for group in pool[start:start + sizes[split]] for doc in group]
      start += sizes[split]
    return out
  out = {}
  for split in SPLITS:
    grouped = groups(shuffle_groups(sources.get(split, ()), seed))
    out[split] = [doc for group in grouped[:sizes[split] if sizes[split] >= 0 else None] for doc in group]
  # Separate split files may share documents; keep each in the split nearest to evaluation, so nothing
  # seen in training or tuning is tested.
  seen: set[str] = set()
  for split in reversed(SPLITS):
    kept = [doc for doc in out[split] if doc.text not in seen]
    if len(kept) < len(out[split]):
      counts["cross_split_duplicates"] += len(out[split]) - len(kept)
    seen.update(doc.text for doc in kept)
    out[split] = kept
  return out
