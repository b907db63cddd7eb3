"""`load`: from a data config to tokenised CaMeLS splits, locality texts and the loaders built on them."""

import collections
import dataclasses
import os

import ml_collections
import numpy as np
from absl import logging

from camels_jax.data import builders, pipeline, splits
from camels_jax.data.config import DATASETS
from camels_jax.data.sources import DataError, check_file


@dataclasses.dataclass
class Data:
  """Tokenised splits of one dataset and its locality texts; makes the loaders the jobs consume."""

  config: ml_collections.ConfigDict  # the data config it was loaded with
  spec: pipeline.Spec
  pad_id: int
  splits: dict[str, list[pipeline.TokenizedDoc]]  # every name in builders.SPLITS
  loc: list[np.ndarray]  # tokenised locality texts
  counts: dict[str, int]  # skipped / truncated input ("<split>/<what>" for tokenisation counts)

  def meta_loader(self, split: str = "meta_train") -> pipeline.Loader:
    """Endless shuffled meta-training batches; checkpoint `.state`, resume with `.restore`."""
    c = self.config
    return pipeline.meta_loader(self.splits[split], self.loc, self.spec, self.pad_id, c.meta_batch_docs,
                                c.loc_batch, c.shuffle_seed)

  def qa_loader(self, split: str = "qa_train") -> pipeline.Loader:
    """Endless shuffled QA-tuning batches; checkpoint `.state`, resume with `.restore`."""
    return pipeline.qa_loader(self.splits[split], self.spec, self.pad_id, self.config.qa_batch_size,
                              self.config.shuffle_seed)

  def meta_eval_batches(self, split: str = "meta_val"):
    """One ordered pass of meta batches over `split` (padded with invalid rows)."""
    c = self.config
    return pipeline.meta_eval_batches(self.splits[split], self.loc, self.spec, self.pad_id, c.meta_batch_docs,
                                      c.loc_batch)

  def qa_eval_batches(self, split: str = "qa_val"):
    """One ordered pass over `split`'s questions; rows index `pipeline.questions(self.splits[split])`."""
    return pipeline.qa_eval_batches(self.splits[split], self.spec, self.pad_id, self.config.qa_batch_size)

  def stream(self) -> pipeline.Stream:
    """The evaluation stream: `stream_docs` test documents in the seeded reference order."""
    test = self.splits["test"]
    n = len(test) if self.config.stream_docs < 0 else self.config.stream_docs
    if n > len(test):
      raise DataError(f"stream_docs={n} but the test split has only {len(test)} documents")
    return pipeline.Stream(test, n, self.config.stream_seed, self.spec, self.pad_id)


def check_sources(config: ml_collections.ConfigDict) -> None:
  """Raises one `DataError` if a file `load` would read is missing or empty (before any model is loaded)."""
  c = config
  if c.dataset == "squad":
    for p in [p.strip() for p in c.path.split(",") if p.strip()] or [""]:
      check_file(p)
  elif c.dataset in ("streamingqa", "archivalqa"):
    builders.csv_files(c.dataset, c.path)
  if c.loc_path:
    check_file(c.loc_path)


def load(config: ml_collections.ConfigDict, tokenizer: pipeline.Tokenizer, workdir: str) -> Data:
  """Prepares (once, as TFDS array_record datasets) and loads the configured dataset.

  Args:
    config: the data config (`get_data_config()`, i.e. a job config's `data` section).
    tokenizer: the base model's tokenizer.
    workdir: the job's directory; prepared datasets go to `<workdir>/tfds` unless `config.data_dir` is set.

  Returns:
    Tokenised splits, locality texts and counts of skipped or truncated input.

  Raises:
    DataError: unknown dataset, missing file, malformed input, or impossible split sizes.
  """
  c = config
  if c.dataset not in DATASETS:
    raise DataError(f"unknown dataset {c.dataset!r}; expected one of {', '.join(DATASETS)}")
  data_dir = c.data_dir or os.path.join(workdir, "tfds")
  sizes = splits.check_sizes(c.split_sizes)
  spec = pipeline.Spec.from_config(c)
  if c.dataset == "generated":
    if min(sizes.values()) < 0:
      raise DataError(f"generated split sizes must be counts of documents, got {sizes}")
    n_loc = 0 if c.loc_path else c.generated.loc_docs  # the "loc" split is only built when used
    sources, counts = _prepare_generated(c, data_dir, {**sizes, "loc": n_loc})
  elif c.dataset == "squad":
    paths = [check_file(p.strip()) for p in c.path.split(",") if p.strip()] or [check_file("")]
    sources, counts = builders.prepare("camels_squad", data_dir, paths=paths)
  else:
    builders.csv_files(c.dataset, c.path)  # Fails early, with a clear message, on missing files.
    sources, counts = builders.prepare("camels_csv_qa", data_dir, dataset=c.dataset, path=c.path)
  counts = collections.Counter(counts)
  docs = {name: builders.read_documents(src) for name, src in sources.items()}

  if c.loc_path:
    loc_sources, _ = builders.prepare("camels_text", data_dir, path=check_file(c.loc_path),
                                      column=c.loc_column, chunk_chars=c.loc_chunk_chars)
    loc_docs = builders.read_documents(loc_sources[builders.FULL])
  elif "loc" in docs:
    loc_docs = docs.pop("loc")
  else:
    loc_sources, _ = _prepare_generated(c, data_dir, {"loc": c.generated.loc_docs})
    loc_docs = builders.read_documents(loc_sources["loc"])
  if not loc_docs:
    raise DataError(f"no locality texts in {c.loc_path or 'the generated loc split'}")

  split_docs = splits.assign(docs, sizes, c.split_seed, counts)
  tokenized = {}
  for name, split in split_docs.items():
    split_counts = collections.Counter()
    tokenized[name] = pipeline.tokenize(split, tokenizer, spec, split_counts)
    counts.update({f"{name}/{k}": v for k, v in split_counts.items()})
  loc = pipeline.tokenize_texts([d.text for d in loc_docs], tokenizer, spec)
  logging.info("data %s: %s documents, %d locality texts; skipped/truncated: %s", c.dataset,
               {k: len(v) for k, v in tokenized.items()}, len(loc), dict(counts) or "none")
  return Data(c, spec, tokenizer.pad_id, tokenized, loc, dict(counts))


def generated_docs(config: ml_collections.ConfigDict, tokenizer: pipeline.Tokenizer, workdir: str, split: str,
                   stop: int, start: int = 0) -> list[pipeline.TokenizedDoc]:
  """Documents `start` to `stop` - 1 of one split of the generated dataset, prepared and tokenised as `load`
  does: more of a split than the job's split sizes hold (the k-th document of a split depends only on the
  seed, the split and k, so the first ones are the job's own; `generated` module docstring).

  Raises:
    DataError: `config.dataset` is not "generated".
  """
  c = config
  if c.dataset != "generated":
    raise DataError(f"dataset={c.dataset!r}: only the generated dataset can make more documents than its splits "
                    f"hold")
  sources, _ = _prepare_generated(c, c.data_dir or os.path.join(workdir, "tfds"), {split: stop})
  docs = builders.read_documents(sources[split])[start:stop]
  return pipeline.tokenize(docs, tokenizer, pipeline.Spec.from_config(c), collections.Counter())


def _prepare_generated(c, data_dir: str, sizes: dict[str, int]):
  return builders.prepare("camels_generated", data_dir, seed=c.generated.seed, sizes=sizes,
                          questions_per_doc=c.generated.questions_per_doc)
