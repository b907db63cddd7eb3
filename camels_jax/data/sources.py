"""Readers for the raw QA sources (SQuAD JSON, StreamingQA/ArchivalQA CSV) and locality corpora.

Every reader yields `Document`s: one per distinct document text, carrying all of its questions, one
gold answer per question chosen as the CaMeLS reference does (the shortest answer; SQuAD and ArchivalQA
answers get a capitalised first letter), and every gold answer of each question with a question id, which
the official SQuAD scores (max over all golds) and per-question reports need. Malformed input raises
`DataError` naming the file and the row; skippable defects (empty documents, questions without answers,
...) are counted in a `Counter` instead.
"""

import collections
import csv
import dataclasses
import json
import os
import re
import sys
from typing import Iterable, Sequence

from camels_jax import checks


class DataError(checks.UserError, ValueError):
  """A data source is missing, malformed, or names an unknown dataset."""


@dataclasses.dataclass(frozen=True)
class Document:
  """One document of a QA dataset with the questions it answers."""

  id: str  # where it came from: "title/paragraph" (SQuAD), "file:row" (CSV), "split-k" (generated)
  group: str  # unit of splitting: SQuAD article title, ArchivalQA doc_id, else the document itself
  text: str
  questions: tuple[str, ...] = ()
  answers: tuple[str, ...] = ()  # one gold answer per question: the reference's (shortest, maybe capitalised)
  # Aligned with `questions`; left empty they default to f"{id}/{k}" and (answers[k],), so documents built
  # by hand (tests, other constructors) keep the invariant that every question has an id and golds.
  question_ids: tuple[str, ...] = ()
  gold_answers: tuple[tuple[str, ...], ...] = ()  # every gold answer of each question, in source order

  def __post_init__(self):
    if self.questions and not self.question_ids:
      object.__setattr__(self, "question_ids", tuple(f"{self.id}/{k}" for k in range(len(self.questions))))
    if self.answers and not self.gold_answers:
      object.__setattr__(self, "gold_answers", tuple((a,) for a in self.answers))
    for name in ("question_ids", "gold_answers"):
      if len(getattr(self, name)) != len(self.questions):
        raise ValueError(f"document {self.id!r}: {len(getattr(self, name))} {name} for "
                         f"{len(self.questions)} questions")


# The CaMeLS authors' CSV layouts. StreamingQA has `text`/`answers` (answers joined by a backslash);
# ArchivalQA has `ans_paragraph`/`answer` plus `doc_id` and `para_num`. Either layout is accepted.
_CSV_TEXT = ("text", "ans_paragraph")
_CSV_ANSWERS = ("answers", "answer")
_CSV_GROUP = "doc_id"
_CSV_ORDER = "para_num"


def check_file(path: str) -> str:
  """Returns `path` if it is a readable file, else raises one clear `DataError`."""
  if not path:
    raise DataError("no data file given (set config.data.path)")
  if not os.path.isfile(path):
    raise DataError(f"data file not found: {path}")
  if os.path.getsize(path) == 0:
    raise DataError(f"{path}: the file is empty")
  return path


def read_text(path: str) -> str:
  """The whole of a UTF-8 text file; one clear `DataError` if it is missing, unreadable, empty or not UTF-8."""
  check_file(path)
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); give a UTF-8 text file") from None
  except OSError as e:
    raise DataError(f"{path}: cannot be read ({e.strerror})") from None
  if not text.strip():
    raise DataError(f"{path}: the file is empty; give a file with text in it")
  return text


def gold_answers(answers: Iterable[str]) -> tuple[str, ...]:
  """Every gold answer as the official SQuAD scorer sees it: stripped, empty ones dropped, in source order."""
  return tuple(a.strip() for a in answers if a and a.strip())


def gold_answer(answers: Iterable[str], capitalize: bool) -> str | None:
  """The reference's gold answer: the shortest non-empty answer, optionally with a capital first letter."""
  answers = gold_answers(answers)
  if not answers:
    return None
  answer = min(answers, key=len)
  return answer[0].upper() + answer[1:] if capitalize else answer


def read_squad(path: str, counts: collections.Counter) -> list[Document]:
  """Documents (paragraphs) of a SQuAD-format JSON file, grouped by article title."""
  with open(check_file(path), encoding="utf-8-sig") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
      raise DataError(f"{path}: not UTF-8 text: {e}") from e
  if not isinstance(data, dict) or not isinstance(data.get("data"), list):
    raise DataError(f"{path}: not SQuAD format (expected an object with a 'data' list of articles)")
  docs = []
  for i, article in enumerate(data["data"]):
    where = f"{path}: article {i}"
    paragraphs = _field(article, "paragraphs", list, where)
    title = article.get("title") or f"article-{i}"
    for j, paragraph in enumerate(paragraphs):
      where = f"{path}: article {i} ({title!r}), paragraph {j}"
      context = _field(paragraph, "context", str, where)
      qas = _field(paragraph, "qas", list, where)
      if not context.strip():
        counts["empty_documents"] += 1
        continue
      doc_id, found = f"{title}/{j}", _QAs()
      for k, qa in enumerate(qas):
        question = _field(qa, "question", str, f"{where}, question {k}").strip()
        texts = [_field(a, "text", str, f"{where}, question {k}, answer {m}")
                 for m, a in enumerate(_field(qa, "answers", list, f"{where}, question {k}"))]
        found.add(question, str(qa.get("id") or f"{doc_id}/{k}"), texts, capitalize=True, counts=counts)
      if found.questions:
        docs.append(Document(doc_id, title, context, **found.fields()))
      else:
        counts["documents_without_questions"] += 1
  return docs


def read_qa_csv(path: str, counts: collections.Counter, capitalize: bool) -> list[Document]:
  """Documents of a StreamingQA/ArchivalQA CSV (one row per question), in order of first appearance.

  Rows of one `doc_id` (when present) are ordered by `para_num`, as the reference does; documents are
  grouped by `doc_id`, or by their own text when there is none.
  """
  header, rows = _read_csv(path, required=(_CSV_TEXT, ("question",), _CSV_ANSWERS))
  text_col = next(c for c in _CSV_TEXT if c in header)
  answers_col = next(c for c in _CSV_ANSWERS if c in header)
  by_text: dict[str, dict] = {}
  for row_num, row in rows:
    text, question = row[text_col], row["question"].strip()
    if not text.strip():
      counts["empty_documents"] += 1
      continue
    order = 0
    if _CSV_ORDER in header:
      try:
        order = int(float(row[_CSV_ORDER]))
      except ValueError:
        raise DataError(f"{path}, row {row_num}: {_CSV_ORDER}={row[_CSV_ORDER]!r} is not a number") from None
    group = row[_CSV_GROUP].strip() if _CSV_GROUP in header and row[_CSV_GROUP].strip() else text
    row_id = f"{os.path.basename(path)}:{row_num}"
    doc = by_text.setdefault(text, dict(id=row_id, group=group, order=order, qas=_QAs()))
    # StreamingQA joins several answers with a single backslash.
    doc["qas"].add(question, row_id, row[answers_col].split("\\"), capitalize, counts)
  docs = []
  for text, d in by_text.items():
    if not d["qas"].questions:
      counts["documents_without_questions"] += 1
      continue
    docs.append((d["group"], d["order"], Document(d["id"], d["group"], text, **d["qas"].fields())))
  # Stable sort by paragraph number inside each group, groups in order of first appearance.
  first = {}
  for g, _, _ in docs:
    first.setdefault(g, len(first))
  return [doc for _, _, doc in sorted(docs, key=lambda t: (first[t[0]], t[1]))]


def read_texts(path: str, column: str, chunk_chars: int) -> list[str]:
  """Locality texts: a CSV column's non-empty values, or a text file cut at line ends into chunks.

  Args:
    path: a `.csv` file (one text per row) or any text file.
    column: the CSV column holding the texts (ignored for text files).
    chunk_chars: text files are cut into chunks of whole lines of at least this many characters.
  """
  if path.lower().endswith(".csv"):
    _, rows = _read_csv(path, required=((column,),))
    return [row[column] for _, row in rows if row[column].strip()]
  with open(check_file(path), encoding="utf-8", errors="replace") as f:
    lines = f.read().splitlines()
  chunks, current, size = [], [], 0
  for line in lines:
    current.append(line)
    size += len(line) + 1
    if size >= chunk_chars:
      chunks.append("\n".join(current).strip())
      current, size = [], 0
  if current:
    chunks.append("\n".join(current).strip())
  return [c for c in chunks if c]


@dataclasses.dataclass
class _QAs:
  """The questions of one document while it is read, as the parallel lists of `Document`."""

  questions: list[str] = dataclasses.field(default_factory=list)
  answers: list[str] = dataclasses.field(default_factory=list)
  question_ids: list[str] = dataclasses.field(default_factory=list)
  gold_answers: list[tuple[str, ...]] = dataclasses.field(default_factory=list)

  def add(self, question: str, question_id: str, texts: Sequence[str], capitalize: bool,
          counts: collections.Counter) -> None:
    """Keeps a question with its reference gold and all golds, or counts why it is skipped."""
    golds = gold_answers(texts)
    if not question:
      counts["empty_questions"] += 1
    elif not golds:
      counts["questions_without_answers"] += 1
    else:
      self.questions.append(question)
      self.answers.append(gold_answer(golds, capitalize))
      self.question_ids.append(question_id)
      self.gold_answers.append(golds)

  def fields(self) -> dict[str, tuple]:
    """Keyword arguments of `Document` (all but id, group and text)."""
    return {f.name: tuple(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _field(obj, key: str, kind: type, where: str):
  if not isinstance(obj, dict) or not isinstance(obj.get(key), kind):
    raise DataError(f"{where}: missing or malformed {key!r} (expected {kind.__name__})")
  return obj[key]


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, as surrogateescape keeps them


def _read_csv(path: str, required: Sequence[Sequence[str]]) -> tuple[list[str], list[tuple[int, dict]]]:
  """The header and (row number, {column: value}) rows of a CSV; row 1 is the header, as in a spreadsheet.

  For each tuple in `required`, one of its column names must be in the header.
  """
  # Documents can be long; the csv module's default 128 KiB field limit would reject them.
  csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
  header, rows, row_num = None, [], 0
  # surrogateescape defers decoding errors to the row that holds the bad bytes, so it can be named.
  with open(check_file(path), encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
    reader = csv.reader(f, strict=True)  # a stray quote is an error, not silently glued text
    while True:
      row_num += 1
      try:
        row = next(reader)
      except StopIteration:
        break
      except csv.Error as e:
        raise DataError(f"{path}, row {row_num}: malformed CSV: {e}") from e
      if any(_UNDECODABLE.search(v) for v in row):
        raise DataError(f"{path}, row {row_num}: malformed CSV: not UTF-8 text")
      if header is None:
        header = [h.strip() for h in row]
      elif not row:  # a blank line
        continue
      elif len(row) != len(header):
        raise DataError(f"{path}, row {row_num}: {len(row)} fields, expected {len(header)}")
      else:
        rows.append((row_num, dict(zip(header, row))))
  header = header or []
  for names in required:
    if not any(n in header for n in names):
      raise DataError(f"{path}: no column {' or '.join(map(repr, names))} in header {header}")
  return header, rows
