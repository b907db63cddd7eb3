"""End to end: TFDS builder -> array_record -> tfds.data_source -> splits -> batches, without TensorFlow."""

import collections
import json
import sys

import pytest
import tensorflow_datasets as tfds

from camels_jax import data
from camels_jax.data import builders
from camels_jax.data.builders import SPLITS
from camels_jax.data.sources import Document, read_qa_csv, read_squad


@pytest.fixture(scope="module")
def squad(tok, squad_file, tmp_path_factory):
  config = data.get_data_config("squad")
  config.path = squad_file
  return data.load(config, tok, str(tmp_path_factory.mktemp("squad")))


def _assert_disjoint(loaded):
  seen_groups, seen_texts = {}, {}
  for split in SPLITS:
    for d in loaded.splits[split]:
      assert seen_groups.setdefault(d.doc.group, split) == split, d.doc.group
      assert seen_texts.setdefault(d.doc.text, split) == split


def test_squad_round_trip_through_tfds_data_source(squad, squad_file, tok):
  with open(squad_file) as f:
    raw = json.load(f)["data"]
  n_paragraphs = sum(len(a["paragraphs"]) for a in raw)
  n_questions = sum(len(p["qas"]) for a in raw for p in a["paragraphs"])
  assert sum(len(v) for v in squad.splits.values()) == n_paragraphs == 1647
  assert sum(len(d.qas) for v in squad.splits.values() for d in v) + sum(
      v for k, v in squad.counts.items() if k.endswith("answers_too_long")) == n_questions
  assert [len({d.doc.group for d in squad.splits[s]}) for s in SPLITS] == [14, 3, 13, 3, 5]
  _assert_disjoint(squad)
  batch = next(squad.meta_loader())
  assert batch["doc_tokens_BxL"].shape[0] == 6 and batch["doc_tokens_BxL"].shape[1] in (128, 256, 512)
  assert batch["qa_tokens_BxQxS"].shape == (6, 5, 64)
  row = squad.splits["meta_train"][0]
  assert tok.decode(row.tokens) == row.doc.text[:len(tok.decode(row.tokens))]
  # The first article's paragraphs keep their order.
  first = [d.doc.id for d in squad.splits["test"] if d.doc.group == squad.splits["test"][0].doc.group]
  assert first == sorted(first, key=lambda i: int(i.rsplit("/", 1)[1]))


def test_tfds_data_source_reads_the_prepared_dataset(squad_file, tmp_path):
  sources, counts = builders.prepare("camels_squad", str(tmp_path), paths=[squad_file])
  again = tfds.data_source("camels_squad", data_dir=str(tmp_path), builder_kwargs=dict(paths=[squad_file]),
                           download=False)
  assert list(again) == ["full"] and len(again["full"]) == len(sources["full"]) == 1647
  record = again["full"][0]
  assert record["group"] == b"1973_oil_crisis" and record["text"].startswith(b"The 1973 oil crisis")
  assert counts == {}
  # Every field survives array_record, question ids and all gold answers of each question included.
  assert builders.read_documents(again["full"]) == read_squad(squad_file, collections.Counter())
  assert not [m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow.")]


def test_default_generated_job_data(tok, tmp_path):
  config = data.get_data_config()
  loaded = data.load(config, tok, str(tmp_path))
  assert {s: len(v) for s, v in loaded.splits.items()} == dict(config.split_sizes)
  assert len(loaded.loc) == config.generated.loc_docs and loaded.counts == {}
  _assert_disjoint(loaded)
  assert max(len(d.tokens) for v in loaded.splits.values() for d in v) <= config.doc_buckets[-1]
  stream = loaded.stream()
  assert len(stream) == config.stream_docs and stream.doc_batch(0)["doc_tokens_BxL"].shape[1] in (128, 256)
  # Same config, fresh load: identical data and stream (the prepared dataset is reused).
  reloaded = data.load(config, tok, str(tmp_path))
  assert [d.doc for d in reloaded.stream().docs] == [d.doc for d in stream.docs]
  for name in ("meta_loader", "qa_loader"):
    a, b = next(getattr(loaded, name)()), next(getattr(reloaded, name)())
    assert all((a[k] == b[k]).all() for k in a)


def test_prepared_datasets_are_reused_until_the_source_changes(tmp_path, write_csv, monkeypatch, tok):
  path = write_csv(tmp_path / "one.csv", ["text", "question", "answers"],
                   [[f"Document {i}.", f"Question {i}?", f"answer {i}"] for i in range(6)])
  config = data.get_data_config("streamingqa")
  config.update(path=path, split_sizes=dict(qa_train=1, qa_val=1, meta_train=2, meta_val=1, test=-1),
                meta_batch_docs=2, qa_batch_size=2)
  first = data.load(config, tok, str(tmp_path))
  assert [len(first.splits[s]) for s in SPLITS] == [1, 1, 2, 1, 1]
  calls = []
  monkeypatch.setattr(builders, "read_qa_csv", lambda *a: calls.append(a) or [])
  data.load(config, tok, str(tmp_path))
  assert not calls  # reused from disk
  write_csv(tmp_path / "one.csv", ["text", "question", "answers"], [["Changed.", "Q?", "a"]])
  with pytest.raises(data.DataError, match=r"one\.csv: no usable documents"):  # rebuilt, patched reader
    data.load(config, tok, str(tmp_path))
  assert calls


def test_camels_csv_directory_layout_and_cross_split_duplicates(tmp_path, write_csv, tok):
  header = ["text", "question", "answers"]
  for name, docs in [("qa_train", ["A", "B", "Shared"]), ("qa_val", ["C"]), ("train", ["D", "E"]),
                     ("val", ["F"]), ("test", ["G", "Shared"])]:
    write_csv(tmp_path / f"{name}.csv", header, [[f"{d} text.", f"What is {d}?", d] for d in docs])
  config = data.get_data_config("streamingqa")
  config.update(path=str(tmp_path), meta_batch_docs=1, stream_docs=-1, loc_path=write_csv(
      tmp_path / "web.csv", ["raw_text"], [["Unrelated web text."], ["More of it."]]))
  loaded = data.load(config, tok, str(tmp_path / "work"))
  assert {s: sorted(d.doc.text[0] for d in v) for s, v in loaded.splits.items()} == dict(
      qa_train=["A", "B"], qa_val=["C"], meta_train=["D", "E"], meta_val=["F"], test=["G", "S"])
  assert loaded.counts == {"cross_split_duplicates": 1}
  assert len(loaded.loc) == 2 and len(loaded.stream()) == 2


def test_csv_round_trip_keeps_question_ids_and_all_golds(tmp_path, write_csv):
  path = write_csv(tmp_path / "s.csv", ["text", "question", "answers"], [
      ["Doc one.", "Q1?", "long answer\\ans"], ["Doc two.", "Q2?", "b"], ["Doc one.", "Q3?", "c\\C\\c"]])
  sources, _ = builders.prepare("camels_csv_qa", str(tmp_path / "tfds"), dataset="streamingqa", path=path)
  docs = builders.read_documents(sources["full"])
  assert docs == read_qa_csv(path, collections.Counter(), capitalize=False)
  assert [(d.question_ids, d.gold_answers) for d in docs] == [
      (("s.csv:2", "s.csv:4"), (("long answer", "ans"), ("c", "C", "c"))), (("s.csv:3",), (("b",),))]


def test_dedupe_merges_every_per_question_field():
  a = Document("a", "g", "Same text.", ("Q1?",), ("A",), ("id1",), (("a", "A"),))
  b = Document("b", "h", "Same text.", ("Q2?",), ("B",), ("id2",), (("b",),))
  counts = collections.Counter()
  (merged,) = builders._dedupe([a, b], counts)  # pylint: disable=protected-access
  assert merged == Document("a", "g", "Same text.", ("Q1?", "Q2?"), ("A", "B"), ("id1", "id2"),
                            (("a", "A"), ("b",)))
  assert counts == {"duplicate_documents": 1}


def test_a_gold_holding_the_separator_is_refused():
  doc = Document("a", "a", "Text.", ("Q?",), ("A",), gold_answers=(("A\x1fB",),))
  with pytest.raises(data.DataError, match="separator"):
    builders._record(doc)  # pylint: disable=protected-access


def test_locality_from_a_text_file(tmp_path, tok):
  text = tmp_path / "corpus.txt"
  text.write_text("\n".join(f"Line {i} of an unrelated corpus." for i in range(100)))
  config = data.get_data_config()
  config.update(loc_path=str(text), loc_chunk_chars=300, loc_len=32)
  loaded = data.load(config, tok, str(tmp_path))
  assert len(loaded.loc) == 10 and all(len(t) == 32 for t in loaded.loc)
  assert next(loaded.meta_loader())["loc_tokens_KxT"].shape == (1, 32)


@pytest.mark.parametrize("change, message", [
    (dict(dataset="wikiqa"), "unknown dataset 'wikiqa'"),
    (dict(dataset="squad", path="/no/such/file.json"), "data file not found: /no/such/file.json"),
    (dict(dataset="squad", path=""), "no data file given"),
    (dict(dataset="archivalqa", path="/no/such.csv"), "data file not found: /no/such.csv"),
    (dict(loc_path="/no/loc.txt"), "data file not found: /no/loc.txt"),
])
def test_bad_dataset_or_missing_file_is_one_clear_error(tmp_path, tok, change, message):
  config = data.get_data_config()
  config.update(change)
  with pytest.raises(data.DataError, match=message):
    data.load(config, tok, str(tmp_path))
  with pytest.raises(data.DataError, match="unknown dataset 'wikiqa'"):
    data.get_data_config("wikiqa")


def test_archivalqa_directory_missing_split_file(tmp_path, write_csv, tok):
  write_csv(tmp_path / "train.csv", ["text", "question", "answers"], [["T.", "Q?", "a"]])
  config = data.get_data_config("archivalqa")
  config.path = str(tmp_path)
  with pytest.raises(data.DataError, match=r"lacks qa_lt\.csv, qa_lt_val\.csv, val\.csv, test\.csv"):
    data.load(config, tok, str(tmp_path))


def test_split_sizes_larger_than_the_data(squad_file, tmp_path, tok):
  config = data.get_data_config("squad")
  config.update(path=squad_file, split_sizes=dict(qa_train=30, qa_val=3, meta_train=13, meta_val=3, test=5))
  with pytest.raises(data.DataError, match="need 54 groups but the data has 38"):
    data.load(config, tok, str(tmp_path))


def test_malformed_row_reported_through_load(tmp_path, tok):
  path = tmp_path / "bad.csv"
  path.write_text('text,question,answers\nDoc.,Q?,a\nDoc.,Q?,a,extra\n')
  config = data.get_data_config("streamingqa")
  config.path = str(path)
  with pytest.raises(data.DataError, match=r"bad\.csv, row 3: 4 fields, expected 3"):
    data.load(config, tok, str(tmp_path))


def test_more_generated_documents_start_with_the_jobs_own(tok, tmp_path):
  from camels_jax.data import dataset  # pylint: disable=g-import-not-at-top
  config = data.get_data_config()
  config.split_sizes.update(qa_train=2, qa_val=2, meta_train=3, meta_val=2, test=2)
  loaded = data.load(config, tok, str(tmp_path))
  more = dataset.generated_docs(config, tok, str(tmp_path), "meta_train", 10)
  assert len(more) == 10 and len({d.doc.id for d in more}) == 10
  # The split's documents are the first ones, tokenised alike (the split itself is in shuffled order).
  own = {d.doc.id: d for d in loaded.splits["meta_train"]}
  assert {d.doc.id for d in more[:3]} == set(own)
  assert all((d.tokens == own[d.doc.id].tokens).all() and len(d.qas) == len(own[d.doc.id].qas) for d in more[:3])
  # A range of the "loc" split: question-free documents past the locality texts.
  extra = dataset.generated_docs(config, tok, str(tmp_path), "loc", 70, 64)
  assert [d.doc.id for d in extra] == [f"loc-{k}" for k in range(64, 70)] and not any(d.qas for d in extra)
  squad = data.get_data_config("squad")
  with pytest.raises(data.DataError, match="only the generated dataset"):
    dataset.generated_docs(squad, tok, str(tmp_path), "meta_train", 10)
