"""The `shared_data` fixture (tests/conftest.py): a missing shared file is one clear failure, never a skip."""

import os

import pytest

from tests import conftest


def test_missing_shared_file_fails_with_one_clear_message(tmp_path, monkeypatch, shared_data):
  monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path)  # an empty shared data folder
  with pytest.raises(pytest.fail.Exception) as failure:
    shared_data("squad_v1.1_dev_part.json")
  message = str(failure.value)
  assert message.startswith(
      "needs ../shared/data/squad_v1.1_dev_part.json (the project's shared data beside the repo")
  assert str(tmp_path / "squad_v1.1_dev_part.json") in message
  assert not failure.value.pytrace  # the message alone, no traceback of the helper
  (tmp_path / "wikitext2_raw_test.txt").mkdir()  # a folder of that name is not the file either
  with pytest.raises(pytest.fail.Exception, match=r"needs \.\./shared/data/wikitext2_raw_test\.txt"):
    shared_data("wikitext2_raw_test.txt")


def test_present_shared_file_gives_its_path(tmp_path, monkeypatch, shared_data):
  (tmp_path / "corpus.txt").write_text("text", encoding="utf-8")
  monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path)
  assert shared_data("corpus.txt") == str(tmp_path / "corpus.txt")


def test_shared_data_sits_beside_the_repository():
  repo = os.path.dirname(os.path.dirname(os.path.abspath(conftest.__file__)))
  assert conftest.SHARED_DATA == conftest.pathlib.Path(repo).parent / "shared" / "data"
