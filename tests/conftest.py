"""Test order for `pytest -n 2 --dist loadfile` (README's test command), and the shared data.

loadfile gives each xdist worker whole files, so a module's fixtures (a trained tiny run that several tests
read) are built once. The workers take files in collection order; the longest files go first so that neither
worker starts one near the end while the other sits idle.

Tests that read the project's shared data (../shared/data beside the repository: SQuAD, WikiText-2) get its
paths from the `shared_data` fixture, which fails such a test with one clear message when a file is missing
(CI always has it): never a silent skip, never a bare FileNotFoundError.
"""

import pathlib

import pytest

# The shared data folder sits beside the repository (../shared/data), never inside it.
SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data_path(name: str) -> str:
  """The path of ../shared/data/<name>; fails the calling test (no traceback) when the file is missing."""
  path = SHARED_DATA / name
  if not path.is_file():
    pytest.fail(f"needs ../shared/data/{name} (the project's shared data beside the repo; looked for {path})",
                pytrace=False)
  return str(path)


@pytest.fixture(scope="session")
def shared_data():
  """shared_data(name) -> the path of ../shared/data/<name>, or one clear failure when it is missing."""
  return shared_data_path


# The longest files on 2 CPU cores (seconds, from `--durations` of a full run), longest first.
LONGEST_FIRST = (
    "tests/test_multiprocess.py",  # ~1,250: subprocess runs of the tiny jobs on 1, 2 and 4 devices
    "tests/methods/test_camels.py",  # ~350
    "tests/test_train.py",  # ~300
    "tests/test_evaluate.py",  # ~250
    "tests/test_repro.py",  # ~220
    "tests/test_mac_job.py",  # ~210 (measured alone, single process)
    "tests/methods/test_mac.py",  # ~200
    "tests/test_cli.py",  # ~190 (measured alone, single process)
    "tests/methods/test_camels_sharded.py",  # ~150
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
  # A stable sort: the other files, and the tests within a file, keep their order.
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
