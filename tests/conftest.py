"""Test order for `pytest -n 2 --dist loadfile` (README's test command), and the shared data.

loadfile gives each xdist worker whole files, so a module's fixtures (a trained tiny run that several tests
read) are built once. The workers take files in collection order (xdist's reordering by test count is turned
off below); the longest files go first so that neither worker starts one near the end while the other sits
idle.

Tests that read the project's shared data (../shared/data beside the repository: SQuAD, WikiText-2) get its
paths from the `shared_data` fixture, which fails such a test with one clear message when a file is missing
(CI always has it): never a silent skip, never a bare FileNotFoundError.
"""

import faulthandler
import gc
import os
import pathlib
import resource
import shutil
import sys
import tempfile
import threading

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


# A worker that crashes in CI. Two CI runs (stops 39 and 40) lost an xdist worker to a segfault ~400 tests in,
# and CI shows only the tail of the output: pytest's own faulthandler dump, printed mid-run to the worker's
# stderr, was cut off both times. So each worker sends its dump (every thread's Python stack) to a file, and
# logs its resources after every test; the controller prints both in its summary, where the tail shows them.
_FAULT_DIR = "CAMELS_JAX_TEST_FAULT_DIR"
_fault_file = None


def memory_maps() -> int:
  """How many memory maps this process holds (Linux: OSError where there is no /proc)."""
  with open("/proc/self/maps", "rb") as f:
    return sum(1 for _ in f)


def _resources() -> str | None:
  """Memory maps, threads and peak RSS of this process: what a long-lived worker could run out of (Linux only:
  None where there is no /proc)."""
  try:
    maps = memory_maps()
    threads = len(os.listdir("/proc/self/task"))
    limit = pathlib.Path("/proc/sys/vm/max_map_count").read_text().strip()
  except OSError:
    return None
  rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
  return (f"maps={maps}/{limit} threads={threads} python_threads={threading.active_count()} "
          f"peak_rss_mb={rss_mb}")


_fault_dir_key = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)  # after pytest's faulthandler plugin has pointed the dump at stderr
def pytest_configure(config):
  global _fault_file
  # pytest-xdist (3.8 here) hands files out largest test count first unless told not to, which put the longest
  # file, test_multiprocess.py (7 tests), last: it ran alone for its final ~25 minutes.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False
  worker = os.environ.get("PYTEST_XDIST_WORKER")
  if worker is None:  # the controller (or a run without xdist): the workers it starts inherit the folder
    os.environ.setdefault(_FAULT_DIR, tempfile.mkdtemp(prefix="camels_jax_test_faults_"))
    config.stash[_fault_dir_key] = os.environ[_FAULT_DIR]
    return
  _fault_file = open(pathlib.Path(os.environ[_FAULT_DIR]) / f"{worker}.fault", "w")
  faulthandler.enable(file=_fault_file, all_threads=True)


def free_compiled_executables():
  """Drops every cached XLA executable of this process (a no-op before JAX is imported).

  Each compiled executable holds ~6 memory maps (its code and data) for as long as a jit cache keeps it, and a
  Linux process may hold vm.max_map_count of them (65,530 here). A worker that runs a few hundred compile-heavy
  tests passes 20,000 maps within its first 45 tests; when mmap fails past the limit, XLA's code allocator does
  not check and the worker segfaults.
  """
  jax = sys.modules.get("jax")
  if jax is not None:
    jax.clear_caches()
    gc.collect()  # an executable leaves when the last reference to it does


@pytest.fixture(autouse=True, scope="module")
def _one_file_s_executables_at_a_time():
  # A file's tests share their compiled functions (loadfile keeps a file on one worker); the next file rarely does.
  yield
  free_compiled_executables()


def pytest_runtest_logfinish(nodeid, location):
  del location
  worker = os.environ.get("PYTEST_XDIST_WORKER")
  used = _resources() if worker is not None and _FAULT_DIR in os.environ else None
  if used is not None:
    with open(pathlib.Path(os.environ[_FAULT_DIR]) / f"{worker}.resources", "a") as f:
      f.write(f"{nodeid} {used}\n")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  del exitstatus
  folder = config.stash.get(_fault_dir_key, None)  # set in the controller only
  if folder is None:
    return
  for log in sorted(pathlib.Path(folder).glob("*.resources")):
    lines = log.read_text().splitlines()
    if lines:
      peak = max(lines, key=lambda line: int(line.split(" maps=")[1].split("/")[0]))
      terminalreporter.write_line(f"{log.stem} after its last test: {lines[-1]}")
      terminalreporter.write_line(f"{log.stem} at its most memory maps: {peak}")
  for dump in sorted(pathlib.Path(folder).glob("*.fault")):
    text = dump.read_text()
    if text.strip():
      terminalreporter.section(f"{dump.stem} crashed: its faulthandler dump ({dump})", sep="=")
      res = pathlib.Path(folder) / f"{dump.stem}.resources"
      for line in (res.read_text().splitlines()[-3:] if res.exists() else []):
        terminalreporter.write_line(f"finished before it: {line}")
      # The crashing thread first: the tail that CI shows may hold little more.
      # pytest's own frames (pluggy, xdist, execnet) and the list of extension modules are left out.
      blocks = [block for block in text.split("\n\n") if not block.startswith("Extension modules")]
      blocks.sort(key=lambda block: not block.lstrip().startswith(("Fatal", "Current thread")))
      runner = ("/pluggy/", "/_pytest/", "/xdist/", "/execnet/", "File \"<string>\"")
      for block in blocks:
        kept = [line for line in block.splitlines() if not any(part in line for part in runner)]
        terminalreporter.write_line("\n".join(kept) + "\n")


def pytest_unconfigure(config):
  folder = config.stash.get(_fault_dir_key, None)
  if folder is not None and not any(p.stat().st_size for p in pathlib.Path(folder).glob("*.fault")):
    shutil.rmtree(folder, ignore_errors=True)  # kept, with its path in the summary, only after a crash


def pytest_collection_modifyitems(config, items):
  del config
  rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
  # A stable sort: the other files, and the tests within a file, keep their order.
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
