"""The data section of job configs.

`get_data_config(dataset)` gives defaults per dataset:

- "generated" (the default; no files): 64/16/48/12/24 documents for QA-train/QA-val/meta-train/
  meta-val/test, 3 questions each, ~110-260 GPT-2 tokens per document (buckets 128/256), locality texts
  from the generated "loc" split. Small on purpose: a whole default job must run on 2 CPU cores.
- "squad": SQuAD-format JSON (`path`, comma-separated for several files), split by article. With the
  38-article SQuAD v1.1 dev subset in ../shared/data (1,647 paragraphs, 8,357 questions) the default sizes
  14/3/13/3/5 articles give QA-train/QA-val/meta-train/meta-val/test of 655/144/529/95/224 paragraphs
  (2954/621/3193/522/1063 questions) with split_seed 0; the evaluation stream takes all test paragraphs
  in the reference's order (articles shuffled with `stream_seed`, paragraphs in order).
- "streamingqa" / "archivalqa": the CaMeLS authors' CSVs. `path` is their data directory (files
  qa_train/qa_val/train/val/test.csv, or qa_lt/qa_lt_val/train/val/test.csv for ArchivalQA), used whole
  (-1 sizes), or one CSV that is split by `doc_id` (or by document) with explicit sizes.

Locality texts (the KL term) come from `loc_path`: a text file cut into chunks, or a CSV column; empty
means the generated "loc" split.
"""

import ml_collections

from camels_jax import checks
from camels_jax.data.generated import MAX_QUESTIONS
from camels_jax.data.sources import DataError

DATASETS = ("generated", "squad", "streamingqa", "archivalqa")


def get_data_config(dataset: str = "generated") -> ml_collections.ConfigDict:
  """Data config with the defaults for `dataset` (one of `DATASETS`)."""
  if dataset not in DATASETS:
    raise DataError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
  c = ml_collections.ConfigDict()
  c.dataset = dataset  # one of DATASETS
  c.path = ""  # source file(s) or directory; unused for "generated"
  c.data_dir = ""  # TFDS data directory for prepared datasets; "" = <workdir>/tfds
  c.split_seed = 0  # seed of the shuffle of groups (articles) that assigns them to splits
  c.split_sizes = ml_collections.ConfigDict()  # groups per split (documents for "generated"): >= 1, or -1 = all/rest
  c.split_sizes.qa_train = 64  # QA tuning of the base model
  c.split_sizes.qa_val = 16  # QA tuning validation (early stopping)
  c.split_sizes.meta_train = 48  # meta-training of the weighting model
  c.split_sizes.meta_val = 12  # meta-validation (checkpoint selection)
  c.split_sizes.test = 24  # documents the evaluation stream is drawn from
  c.generated = ml_collections.ConfigDict()
  c.generated.seed = 0  # generator seed; each split has its own stream derived from it
  c.generated.questions_per_doc = 3  # questions asked about each generated document (1-MAX_QUESTIONS = 9)
  c.generated.loc_docs = 64  # question-free generated documents used as locality texts (>= 1)
  c.loc_path = ""  # locality corpus: text file or CSV; "" = the generated "loc" split
  c.loc_column = "raw_text"  # CSV column of the locality texts (OpenWebText CSVs use raw_text)
  c.loc_chunk_chars = 1200  # text files are cut at line ends into chunks of at least this many chars (>= 1)
  c.doc_buckets = (128, 256)  # document lengths (tokens) padded to, increasing; longer documents are truncated
  c.qa_len = 64  # question + " " + answer + EOS, in tokens, padded (reference: 128)
  c.max_answer_len = 24  # answers longer than this (tokens, with EOS) are skipped; <= qa_len - 2 (ref.: 24)
  c.loc_len = 256  # locality text length in tokens (reference: 1024)
  c.qa_slots = 3  # Q: question slots per document in meta batches; more questions give more items
  c.add_bos = False  # prepend BOS to documents and questions (GPT-2 has none; reference: no BOS)
  c.meta_batch_docs = 6  # B: documents per meta-training batch (reference update_batch_size: 6)
  c.loc_batch = 1  # K: locality texts per meta-training batch (reference: 1)
  c.qa_batch_size = 16  # QA sequences per QA-tuning / QA-evaluation batch
  c.shuffle_seed = 0  # seed of the per-epoch order of training batches
  c.stream_seed = 42  # seed of the evaluation stream's order (reference: 42)
  c.stream_docs = 24  # N: documents in the evaluation stream (>= 1); -1 = all test documents
  if dataset == "squad":
    c.split_sizes.update(qa_train=14, qa_val=3, meta_train=13, meta_val=3, test=5)
    c.doc_buckets = (128, 256, 512)
    c.qa_slots = 5
    c.stream_docs = -1
  elif dataset in ("streamingqa", "archivalqa"):
    c.split_sizes.update(qa_train=-1, qa_val=-1, meta_train=-1, meta_val=-1, test=-1)
    c.doc_buckets = (128, 256, 512)
    c.qa_slots = 1  # the reference pairs each document with one question
    c.stream_docs = 1665 if dataset == "streamingqa" else -1  # reference README: 1665 for StreamingQA
  return c


RULES = {
    "dataset": checks.one_of(*DATASETS),
    "path": checks.string,
    "data_dir": checks.string,
    "split_seed": checks.seed,
    "split_sizes": {name: checks.count_or_all for name in ("qa_train", "qa_val", "meta_train", "meta_val", "test")},
    "generated": {
        "seed": checks.seed,
        "questions_per_doc": checks.in_range(1, MAX_QUESTIONS, integer=True),
        "loc_docs": checks.count,
    },
    "loc_path": checks.string,
    "loc_column": checks.nonempty_string,
    "loc_chunk_chars": checks.count,
    "doc_buckets": checks.increasing(checks.count),
    "qa_len": checks.at_least(3, integer=True),  # a BOS, a question token and an answer token
    "max_answer_len": checks.count,
    "loc_len": checks.count,
    "qa_slots": checks.count,
    "add_bos": checks.boolean,
    "meta_batch_docs": checks.count,
    "loc_batch": checks.count,
    "qa_batch_size": checks.count,
    "shuffle_seed": checks.seed,
    "stream_seed": checks.seed,
    "stream_docs": checks.count_or_all,
}


def _answer_fits(c, at=""):
  if c.max_answer_len > c.qa_len - 2:  # room for a BOS and one question token (pipeline.Spec)
    return [f"{at}max_answer_len={c.max_answer_len} must be <= {at}qa_len - 2 = {c.qa_len - 2}"]
  return []


def _path_given(c, at=""):
  if c.dataset != "generated" and not c.path.strip():
    return [f"{at}path is empty: {at}dataset={c.dataset!r} reads its documents from it"]
  return []


def _sizes(c, at=""):
  rest = [name for name, n in c.split_sizes.items() if n == -1]
  if c.dataset == "generated" and rest:  # documents are generated on demand: there is no "all"
    return [f"{at}split_sizes.{name}=-1: {at}dataset='generated' needs a count of documents" for name in rest]
  if c.dataset == "squad" and len(rest) > 1:  # one pool of articles: only one split can take the rest
    return [f"{at}split_sizes: only one split may be -1 (all remaining articles), got {', '.join(rest)}"]
  return []


def _stream_fits(c, at=""):
  test = c.split_sizes.test
  if c.dataset == "generated" and test >= 1 and c.stream_docs > test:
    return [f"{at}stream_docs={c.stream_docs} exceeds {at}split_sizes.test={test} (the test documents)"]
  return []


CROSS = [_answer_fits, _path_given, _sizes, _stream_fits]
