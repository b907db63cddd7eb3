"""Readers and bad input: malformed rows name file and row; defects are skipped and counted."""

import collections
import json

import pytest

from camels_jax.data import sources
from camels_jax.data.sources import DataError


def _squad(path, articles):
  path.write_text(json.dumps({"version": "1.1", "data": articles}))
  return str(path)


def _qa(question, *answers, qid=None):
  qa = {"question": question, "answers": [{"text": a, "answer_start": 0} for a in answers]}
  return qa | ({"id": qid} if qid else {})


def test_squad_reader_skips_and_counts_defects(tmp_path):
  path = _squad(tmp_path / "s.json", [
      {"title": "A", "paragraphs": [
          {"context": "Paris is in France.", "qas": [
              _qa("Where is Paris? ", "in France", " ", " france ", "in France", qid="q1"),
              _qa("Unanswerable?"), _qa("  ", "x"), _qa("Which country?", "France")]},
          {"context": "  ", "qas": [_qa("Q?", "a")]},
          {"context": "No usable questions.", "qas": [_qa("Q?", " ")]}]}])
  counts = collections.Counter()
  docs = sources.read_squad(path, counts)
  # The reference's gold is the shortest answer, capitalised; the golds are all answers as given (stripped,
  # empty ones dropped, duplicates kept as the official scorer keeps them); a question without an id gets
  # "document/position".
  assert docs == [sources.Document("A/0", "A", "Paris is in France.", ("Where is Paris?", "Which country?"),
                                   ("France", "France"), question_ids=("q1", "A/0/3"),
                                   gold_answers=(("in France", "france", "in France"), ("France",)))]
  assert counts == dict(empty_documents=1, questions_without_answers=2, empty_questions=1,
                        documents_without_questions=1)


def test_squad_reader_keeps_every_gold_and_question_id(squad_file):
  with open(squad_file) as f:
    raw = json.load(f)["data"]
  raw_golds = {qa["id"]: [a["text"].strip() for a in qa["answers"]]
               for article in raw for p in article["paragraphs"] for qa in p["qas"]}
  docs = sources.read_squad(squad_file, collections.Counter())
  ids = [i for d in docs for i in d.question_ids]
  assert len(ids) == len(set(ids)) == len(raw_golds)
  n_multi = 0
  for doc in docs:
    assert len(doc.questions) == len(doc.answers) == len(doc.question_ids) == len(doc.gold_answers)
    for answer, qid, golds in zip(doc.answers, doc.question_ids, doc.gold_answers):
      assert golds and list(golds) == raw_golds[qid]
      assert answer in {g[0].upper() + g[1:] for g in golds} and len(answer) == min(map(len, golds))
      n_multi += len(set(golds)) >= 2
  assert n_multi > 100  # dev questions have several annotators' answers, often differing


def test_document_defaults_ids_and_golds_and_checks_alignment():
  doc = sources.Document("d", "d", "Text.", ("Q1?", "Q2?"), ("a", "b"))
  assert doc.question_ids == ("d/0", "d/1") and doc.gold_answers == (("a",), ("b",))
  assert sources.Document("t", "t", "Text.").question_ids == ()
  with pytest.raises(ValueError, match="1 question_ids for 2 questions"):
    sources.Document("d", "d", "Text.", ("Q1?", "Q2?"), ("a", "b"), question_ids=("x",))


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
  # Rows of one document are merged; the shortest of backslash-joined answers is kept, not capitalised,
  # and all of them are golds; a question's id is its row.
  assert [(d.text, d.questions, d.answers) for d in docs] == [
      ("Doc one.", ("Q1?", "Q3?"), ("ans", "c")), ("Doc two.", ("Q2?",), ("b",))]
  assert [d.question_ids for d in docs] == [("s.csv:2", "s.csv:4"), ("s.csv:3",)]
  assert [d.gold_answers for d in docs] == [(("long answer", "ans"), ("c",)), (("b",),)]
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
  # Only the reference's gold is capitalised; the golds stay as written.
  assert [(d.question_ids, d.gold_answers) for d in docs] == [
      (("a.csv:4",), (("z",),)), (("a.csv:2",), (("x",),)), (("a.csv:3",), (("y",),))]


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
