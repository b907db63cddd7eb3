"""TFDS builders writing every dataset as `array_record`, read back with `tfds.data_source`.

No TensorFlow is needed: tensorflow-datasets serialises examples with its own protobuf code and reads
`array_record` files through `ArrayRecordDataSource`, which decodes to numpy. Each builder takes its source
as constructor arguments and names its BuilderConfig after a fingerprint of that source (file contents or
generator settings), so a prepared dataset is reused while the source is unchanged and rebuilt otherwise.

All builders share one feature schema, that of `sources.Document` (see `_record`); locality corpora use
it too, with no questions. Counts of skipped or malformed-but-tolerated input are stored in the dataset's
metadata.
"""

import abc
import collections
import contextlib
import dataclasses
import hashlib
import io
import os
from typing import Mapping, Sequence

import jax
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from camels_jax.data import generated
from camels_jax.data.sources import DataError, Document, check_file, read_qa_csv, read_squad, read_texts

# CaMeLS split names; "full" is a whole source file that `splits.assign` cuts into these by group.
SPLITS = ("qa_train", "qa_val", "meta_train", "meta_val", "test")
FULL = "full"
# The file names the CaMeLS authors use in their StreamingQA and ArchivalQA data directories.
CSV_SPLIT_FILES = {
    "streamingqa": dict(qa_train="qa_train.csv", qa_val="qa_val.csv", meta_train="train.csv",
                        meta_val="val.csv", test="test.csv"),
    "archivalqa": dict(qa_train="qa_lt.csv", qa_val="qa_lt_val.csv", meta_train="train.csv",
                       meta_val="val.csv", test="test.csv"),
}


class _DocumentBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder of `Document` records whose config is named by a fingerprint of its source."""

  # A new version makes datasets prepared by older code get rebuilt rather than misread.
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "Question ids and every gold answer of each question."}
  # tfds 4.9.10 derives `code_path` for builders inside a package through `importlib_resources`, a backport
  # it only installs on Python < 3.9, so the lookup fails on ours; the path is only used to look for a
  # (non-existent) checksums file next to the code.
  code_path = epath.Path(__file__)

  def __init__(self, *, config_name: str, source: str, **kwargs):
    self._source = source  # for messages
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=tfds.core.BuilderConfig(name=config_name), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(dict(
            id=text, group=text, text=text, questions=tfds.features.Sequence(text),
            answers=tfds.features.Sequence(text), question_ids=tfds.features.Sequence(text),
            gold_answers=tfds.features.Sequence(text))),
        # Keep source order: documents of one article stay in paragraph order, as in the reference.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict())

  @abc.abstractmethod
  def _read(self, counts: collections.Counter) -> dict[str, list[Document]]:
    """Reads the source into documents per split, counting what is skipped."""

  def _split_generators(self, dl_manager):
    del dl_manager  # Sources are local files or generated.
    counts = collections.Counter()
    splits = self._read(counts)
    if not any(splits.values()):
      raise DataError(f"{self._source}: no usable documents (skipped: {dict(counts)})")
    self.info.metadata["counts"] = dict(counts)
    # TFDS cannot write an empty split; readers treat an absent split as empty.
    return {name: self._generate_examples(docs) for name, docs in splits.items() if docs}

  def _generate_examples(self, docs: Sequence[Document]):
    for i, doc in enumerate(docs):
      yield i, _record(doc)


class CamelsSquad(_DocumentBuilder):
  """SQuAD-format JSON files, pooled into one "full" split of paragraphs grouped by article."""

  def __init__(self, *, paths: Sequence[str], **kwargs):
    self._paths = tuple(paths)
    super().__init__(config_name=_fingerprint("squad", self._paths), source=", ".join(self._paths), **kwargs)

  def _read(self, counts):
    return {FULL: _dedupe([d for p in self._paths for d in read_squad(p, counts)], counts)}


class CamelsCsvQa(_DocumentBuilder):
  """StreamingQA or ArchivalQA CSVs: one pooled file ("full"), or a directory with the five split files."""

  def __init__(self, *, dataset: str, path: str, **kwargs):
    self._dataset, self._files = dataset, csv_files(dataset, path)
    super().__init__(config_name=_fingerprint(dataset, list(self._files.values())), source=path, **kwargs)

  def _read(self, counts):
    # The reference capitalises ArchivalQA answers but not StreamingQA ones.
    capitalize = self._dataset == "archivalqa"
    return {split: _dedupe(read_qa_csv(f, counts, capitalize), counts) for split, f in self._files.items()}


class CamelsText(_DocumentBuilder):
  """A locality corpus (unrelated text): a CSV column or a text file cut into chunks; one "full" split."""

  def __init__(self, *, path: str, column: str, chunk_chars: int, **kwargs):
    self._path, self._column, self._chunk_chars = path, column, chunk_chars
    super().__init__(config_name=_fingerprint("text", [path], column, chunk_chars), source=path, **kwargs)

  def _read(self, counts):
    del counts  # Empty texts are simply dropped.
    texts = read_texts(self._path, self._column, self._chunk_chars)
    return {FULL: [Document(f"text-{i}", f"text-{i}", t) for i, t in enumerate(texts)]}


class CamelsGenerated(_DocumentBuilder):
  """The generated default dataset: the five CaMeLS splits plus "loc", each from its own seed."""

  def __init__(self, *, seed: int, sizes: Mapping[str, int], questions_per_doc: int, **kwargs):
    self._seed, self._sizes, self._questions = seed, dict(sizes), questions_per_doc
    settings = f"{seed}/{sorted(self._sizes.items())}/{questions_per_doc}"
    super().__init__(config_name=f"seed{seed}-{_digest(settings.encode())}", source="generated", **kwargs)

  def _read(self, counts):
    del counts  # Generated data has no defects.
    return {split: generated.generate(self._seed, split, n, self._questions)
            for split, n in self._sizes.items()}


def csv_files(dataset: str, path: str) -> dict[str, str]:
  """The CSV file of each split: {FULL: path} for a file, the CaMeLS file names for a directory."""
  if os.path.isdir(path):
    files = {split: os.path.join(path, name) for split, name in CSV_SPLIT_FILES[dataset].items()}
    missing = [f for f in files.values() if not os.path.isfile(f)]
    if missing:
      raise DataError(f"{dataset} directory {path} lacks {', '.join(map(os.path.basename, missing))} "
                      f"(expected {', '.join(CSV_SPLIT_FILES[dataset].values())})")
    return files
  return {FULL: check_file(path)}


def prepare(name: str, data_dir: str, **builder_kwargs) -> tuple[dict[str, Sequence], dict[str, int]]:
  """Builds dataset `name` unless already on disk; returns its data source per split and its skip counts.

  Args:
    name: registered builder name, e.g. "camels_squad".
    data_dir: TFDS data directory.
    **builder_kwargs: the builder's source arguments (paths, seeds, ...).
  """
  tfds.display_progress_bar(False)  # The datasets are small; the bars only clutter logs.
  # Several processes of one run share the data directory: process 0 builds, the others wait and then read
  # (two builders would race for the same final directory).
  several = jax.process_count() > 1
  if several and jax.process_index() != 0:
    multihost_utils.sync_global_devices(f"camels_jax: {name} prepared")
  printed = io.StringIO()  # TFDS prints "Downloading and preparing dataset ..." to stdout: to the log instead
  with contextlib.redirect_stdout(printed):
    sources = tfds.data_source(
        name, data_dir=data_dir, builder_kwargs=builder_kwargs,
        download_and_prepare_kwargs=dict(download_config=tfds.download.DownloadConfig(try_download_gcs=False)))
  if several and jax.process_index() == 0:
    multihost_utils.sync_global_devices(f"camels_jax: {name} prepared")
  for line in printed.getvalue().splitlines():
    if line.strip():
      logging.info("tfds: %s", line.strip())
  info = next(iter(sources.values())).dataset_info
  return sources, dict(info.metadata.get("counts", {}))


def read_documents(source: Sequence) -> list[Document]:
  """All records of a data source as `Document`s (TFDS returns text as bytes)."""
  records = source.__getitems__(range(len(source))) if len(source) else []
  return [_document(r) for r in records]


# Joins the gold answers of one question into one Text feature: nested sequences are avoided, as their
# decoding from array_record without TensorFlow is a risk not worth taking; `_record` refuses golds holding it.
GOLD_SEPARATOR = "\x1f"  # ASCII unit separator


def _record(doc: Document) -> dict:
  """The TFDS example of a document: its fields, with each question's golds joined into one string."""
  for golds in doc.gold_answers:
    if any(GOLD_SEPARATOR in g for g in golds):
      raise DataError(f"document {doc.id!r}: a gold answer contains the separator {GOLD_SEPARATOR!r}")
  return dict(id=doc.id, group=doc.group, text=doc.text, questions=doc.questions, answers=doc.answers,
              question_ids=doc.question_ids,
              gold_answers=tuple(GOLD_SEPARATOR.join(g) for g in doc.gold_answers))


def _document(r: Mapping) -> Document:
  """The inverse of `_record` on a decoded example (text as bytes)."""
  return Document(id=r["id"].decode(), group=r["group"].decode(), text=r["text"].decode(),
                  questions=_texts(r["questions"]), answers=_texts(r["answers"]),
                  question_ids=_texts(r["question_ids"]),
                  gold_answers=tuple(tuple(g.split(GOLD_SEPARATOR)) for g in _texts(r["gold_answers"])))


def _texts(values) -> tuple[str, ...]:
  return tuple(v.decode() for v in values)


# The `Document` fields with one entry per question.
_PER_QUESTION = ("questions", "answers", "question_ids", "gold_answers")


def _dedupe(docs: list[Document], counts: collections.Counter) -> list[Document]:
  """Merges documents with identical text into the first, so one text can never land in two splits."""
  first: dict[str, int] = {}
  out: list[Document] = []
  for doc in docs:
    if doc.text in first:
      counts["duplicate_documents"] += 1
      kept = out[first[doc.text]]
      merged = {f: getattr(kept, f) + getattr(doc, f) for f in _PER_QUESTION}
      out[first[doc.text]] = dataclasses.replace(kept, **merged)
    else:
      first[doc.text] = len(out)
      out.append(doc)
  return out


def _fingerprint(kind: str, paths: Sequence[str], *settings) -> str:
  """`kind-<digest>` of the files' contents and the settings: a config name that changes with the source."""
  h = hashlib.sha256(repr(settings).encode())
  for p in paths:
    with open(p, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return f"{kind}-{_digest(h.digest())}"


def _digest(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()[:16]
