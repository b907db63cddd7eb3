"""Test order for `pytest -n 2 --dist loadfile` (README's test command).

loadfile gives each xdist worker whole files, so a module's fixtures (a trained tiny run that several tests
read) are built once. The workers take files in collection order; the longest files go first so that neither
worker starts one near the end while the other sits idle.
"""

# The longest files on 2 CPU cores (seconds, from `--durations` of a full run), longest first.
LONGEST_FIRST = (
    "tests/test_multiprocess.py",  # ~1,250: subprocess runs of the tiny jobs on 1, 2 and 4 devices
    "tests/methods/test_camels.py",  # ~350
    "tests/test_train.py",  # ~300
    "tests/test_evaluate.py",  # ~250
    "tests/test_repro.py",  # ~220
    "tests/methods/test_mac.py",  # ~200
    "tests/methods/test_camels_sharded.py",  # ~150
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
  # A stable sort: the other files, and the tests within a file, keep their order.
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
