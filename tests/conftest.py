"""Test order for `pytest -n 2 --dist loadfile` (README's test command), and the shared data.

loadfile gives each xdist worker whole files, so a module's fixtures (a trained tiny run that several tests
read) are built once. The workers take files in collection order (xdist's reordering by test count is turned
off below); the longest files go first so that neither worker starts one near the end while the other sits
idle.

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


# The longest files on 2 CPU cores (seconds summed over their tests, from `--durations` of a full `-n 2` run on
# 2026-12-04, both workers busy), longest first.
LONGEST_FIRST = (
    "tests/test_multiprocess.py",  # ~2,700: subprocess runs of the tiny jobs on 1, 2 and 4 devices
    "tests/test_evaluate.py",  # ~1,300
    "tests/methods/test_camels.py",  # ~850
    "tests/test_train.py",  # ~850
    "tests/test_cli.py",  # ~650 (its Ctrl-C test alone ~30 s)
    "tests/methods/test_mac.py",  # ~600
    "tests/test_repro.py",  # ~550
    "tests/adapt/test_uptake.py",  # ~470
    "tests/test_mac_job.py",  # ~420
    "tests/methods/test_camels_sharded.py",  # ~320
    "tests/methods/test_dynamic_eval.py",  # ~290
    "tests/methods/test_fwl.py",  # ~230
    "tests/test_qa_tune.py",  # ~200
)


def pytest_configure(config):
  # pytest-xdist (3.8 here) hands files out largest test count first unless told not to, which put the longest
  # file, test_multiprocess.py (7 tests), last: it ran alone for its final ~25 minutes.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  del config
  rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
  # A stable sort: the other files, and the tests within a file, keep their order.
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
