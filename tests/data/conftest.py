"""Shared fixtures: the GPT-2 tokenizer, the shared SQuAD file, a CSV writer."""

import csv
import pathlib

import pytest

from camels_jax.models import tokenizer as tokenizer_lib

# The shared data folder sits beside the repository (../shared/data), never inside it.
SHARED_DATA = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"
SQUAD_FILE = SHARED_DATA / "squad_v1.1_dev_part.json"


@pytest.fixture(scope="session")
def tok():
  return tokenizer_lib.gpt2()


@pytest.fixture(scope="session")
def squad_file() -> str:
  assert SQUAD_FILE.is_file(), f"shared test data missing: {SQUAD_FILE}"
  return str(SQUAD_FILE)


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
