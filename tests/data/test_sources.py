"""Readers and bad input: malformed rows name file and row; defects are skipped and counted."""

import collections
import json

import pytest

from camels_jax.data import sources
from camels_jax.data.sources import DataError


def _squad(path, articles):
  path.write_text(json.dumps({"version": "1.1", "data": articles}))
  return str(path)


def _qa(question, *answers):
  return {"id": question, "question": question, "answers": [{"text": a, "answer_start": 0} for a in answers]}


def test_squad_reader_skips_and_counts_defects(tmp_path):
  path = _squad(tmp_path / "s.json", [
      {"title": "A", "paragraphs": [
          {"context": "Paris is in France.", "qas": [_qa("Where is Paris? ", "in France", "france"),
                                                      _qa("Unanswerable?"), _qa("  ", "x")]},
          {"context": "  ", "qas": [_qa("Q?", "a")]},
          {"context": "No usable questions.", "qas": [_qa("Q?", " ")]}]}])
  counts = collections.Counter()
  docs = sources.read_squad(path, counts)
  assert docs == [sources.Document("A/0", "A", "Paris is in France.", ("Where is Paris?",), ("France",))]
  assert counts == dict(empty_documents=1, questions_without_answers=2, empty_questions=1,
                        documents_without_questions=1)


def test_malformed_json_names_file_and_line(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text('{"data": [\n{"title": "A",\n "paragraphs": [}]}')
  with pytest.raises(DataError, match=r"bad\.json: malformed JSON at line 3"):
    sources.read_squad(str(path), collections.Counter())


def test_squad_structure_error_names_article_and_paragraph(tmp_path):
  path = _squad(tmp_path / "s.json", [{"title": "A", "paragraphs": [{"context": "c", "qas": []},
                                                                     {"qas": []}]}])
  with pytest.raises(DataError, match=r"s\.json: article 0 \('A'\), paragraph 1: .*'context'"):
    sources.read_squad(path, collections.Counter())


def test_streamingqa_csv(tmp_path, write_csv):
  path = write_csv(tmp_path / "s.csv", ["text", "question", "answers"], [
      ["Doc one.", " Q1? ", "long answer\\ans"],
      ["Doc two.", "Q2?", "b"],
      ["Doc one.", "Q3?", "c"],
      ["", "Q4?", "d"],
      ["Doc three.", "Q5?", ""]])
  counts = collections.Counter()
  docs = sources.read_qa_csv(path, counts, capitalize=False)
  # Rows of one document are merged; the shortest of backslash-joined answers is kept, not capitalised.
  assert [(d.text, d.questions, d.answers) for d in docs] == [
      ("Doc one.", ("Q1?", "Q3?"), ("ans", "c")), ("Doc two.", ("Q2?",), ("b",))]
  assert [d.group for d in docs] == ["Doc one.", "Doc two."]
  assert counts == dict(empty_documents=1, questions_without_answers=1, documents_without_questions=1)


def test_archivalqa_layout_groups_by_doc_id_in_paragraph_order(tmp_path, write_csv):
  path = write_csv(tmp_path / "a.csv", ["doc_id", "para_num", "ans_paragraph", "question", "answer"], [
      ["d1", "2", "Second paragraph.", "Q1?", "x"],
      ["d2", "0", "Other article.", "Q2?", "y"],
      ["d1", "1", "First paragraph.", "Q3?", "z"]])
  docs = sources.read_qa_csv(path, collections.Counter(), capitalize=True)
  assert [(d.group, d.text, d.answers) for d in docs] == [
      ("d1", "First paragraph.", ("Z",)), ("d1", "Second paragraph.", ("X",)),
      ("d2", "Other article.", ("Y",))]


@pytest.mark.parametrize("body, message", [
    (b'Doc.,Q?,a\nDoc.,Q?\n', r"bad\.csv, row 3: 2 fields, expected 3"),
    (b'Doc.,Q?,a\n"Doc." stray,Q?,a\n', r"bad\.csv, row 3: malformed CSV"),
    (b'Doc.,Q?,a\nDoc.,Q?,a\nDoc \xff,Q?,a\n', r"bad\.csv, row 4: malformed CSV"),
])
def test_malformed_csv_row_names_file_and_row(tmp_path, body, message):
  path = tmp_path / "bad.csv"
  path.write_bytes(b"text,question,answers\n" + body)
  with pytest.raises(DataError, match=message):
    sources.read_qa_csv(str(path), collections.Counter(), capitalize=False)


def test_csv_missing_column_and_bad_para_num(tmp_path, write_csv):
  path = write_csv(tmp_path / "c.csv", ["text", "answers"], [["Doc.", "a"]])
  with pytest.raises(DataError, match=r"c\.csv: no column 'question'"):
    sources.read_qa_csv(path, collections.Counter(), capitalize=False)
  path = write_csv(tmp_path / "p.csv", ["text", "question", "answers", "para_num"],
                   [["Doc.", "Q?", "a", "two"]])
  with pytest.raises(DataError, match=r"p\.csv, row 2: para_num='two' is not a number"):
    sources.read_qa_csv(path, collections.Counter(), capitalize=False)


def test_missing_file_is_one_clear_error(tmp_path):
  with pytest.raises(DataError, match="data file not found: .*nope.json"):
    sources.read_squad(str(tmp_path / "nope.json"), collections.Counter())


def test_locality_texts_from_text_file_and_csv_column(tmp_path, write_csv):
  text = tmp_path / "t.txt"
  text.write_text("".join(f"line {i} " + "x" * 30 + "\n" for i in range(10)) + "\n\n")
  chunks = sources.read_texts(str(text), "unused", chunk_chars=100)
  assert len(chunks) == 4 and all(len(c) >= 100 for c in chunks[:-1])
  assert "\n".join(chunks).split() == text.read_text().split()  # nothing lost, cut at line ends
  path = write_csv(tmp_path / "w.csv", ["id", "raw_text"], [["1", "Some web text."], ["2", " "]])
  assert sources.read_texts(path, "raw_text", 100) == ["Some web text."]
