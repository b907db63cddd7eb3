"""Shared fixtures: the GPT-2 tokenizer, the shared SQuAD file, a CSV writer."""

import csv
import pathlib

import pytest

from camels_jax.models import tokenizer as tokenizer_lib


@pytest.fixture(scope="session")
def tok():
  return tokenizer_lib.gpt2()


@pytest.fixture(scope="session")
def squad_file(shared_data) -> str:
  return shared_data("squad_v1.1_dev_part.json")


@pytest.fixture
def write_csv():
  """write_csv(path, header, rows) -> str(path)."""

  def write(path: pathlib.Path, header, rows) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
      w = csv.writer(f)
      w.writerow(header)
      w.writerows(rows)
    return str(path)

  return write
