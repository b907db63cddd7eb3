"""What every entry point (train, evaluate, perplexity, ...) shares on the command line.

- One-line errors: an expected failure (`checks.UserError`: bad data, a bad config, a missing prerequisite,
  an unreadable file, a damaged checkpoint) prints `error: <what, where, what to do>` on stderr and exits 2; a
  config that does not parse (unknown key, bad value, missing file, a directory) too, and a path of the wrong
  kind (a file where a directory is expected, or the reverse). Ctrl-C prints one line saying that rerunning
  the same command resumes, and exits 130 (the manifest records the run as "interrupted"; checkpoints
  already written are kept). `--verbosity=1` shows the traceback. Anything else is a bug and keeps its
  traceback.
- The config is checked whole, every violation listed at once, before a model or dataset is loaded.
- A quiet terminal: progress bars, one line per phase and the results. Library logs (absl, JAX's backend
  probes, TFDS, orbax, Python warnings) go to <workdir>/log.txt; `--verbosity=1` shows them as well.
- A run manifest: <workdir>/config.json (the resolved config) and <workdir>/manifest.json (command line,
  package version and git commit, library versions, devices, processes, start and end of every run). A
  rerun in a workdir whose config.json differs outside the entry point's `safe` fields is refused with the
  differences listed.

- Flags defined once (`define_flags`): --config, --workdir, --distributed, for every entry point.

An entry point's main is

  def main(argv):
    config, workdir, distributed = cli.flag_values()
    with cli.session("train", config, workdir, job.RULES, job.CROSS, job.SAFE_ON_RESUME):
      ...

  if __name__ == "__main__":
    cli.define_flags(workdir_help="...")
    cli.run(main)
"""

import contextlib
import dataclasses
import datetime
import fnmatch
import importlib.metadata
import json
import logging as py_logging
import os
import platform
import re
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from camels_jax import checks, interrupts, io_utils

LOG_FILE = "log.txt"
CONFIG_FILE = io_utils.CONFIG_FILE
MANIFEST_FILE = "manifest.json"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a command ended by Ctrl-C (128 + SIGINT)
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tensorflow-datasets",
             "numpy", "ml-collections")
# Fields that never change what a workdir's artifacts are (every entry point's own list adds to these).
ALWAYS_SAFE = ("workdir", "jobs")


class FlagValues(NamedTuple):
  config: ml_collections.ConfigDict
  workdir: str  # --workdir, else the config's workdir
  distributed: bool | None


def define_flags(workdir_help: str) -> None:
  """The flags every entry point takes (defined only when it runs, so modules can import each other)."""
  config_flags.DEFINE_config_file("config", None, "Job config (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, f"{workdir_help} (default: config.workdir).")
  flags.DEFINE_bool(
      "distributed", None, "Join a multi-process run (jax.distributed); default: detect from the environment.")


def flag_values() -> FlagValues:
  """The parsed --config, --workdir and --distributed."""
  config = flags.FLAGS.config
  return FlagValues(config, flags.FLAGS.workdir or config.workdir, flags.FLAGS.distributed)


def _verbose(argv: Sequence[str] | None = None) -> bool:
  """--verbosity >= 1 (read from argv when the flags did not parse)."""
  if flags.FLAGS.is_parsed():
    return flags.FLAGS.verbosity >= 1
  for i, arg in enumerate(argv or sys.argv):
    value = arg.split("=", 1)[1] if arg.startswith("--verbosity=") else None
    if arg in ("--verbosity", "-v") and i + 1 < len(argv or sys.argv):
      value = (argv or sys.argv)[i + 1]
    if value is not None:
      with contextlib.suppress(ValueError):
        return int(value) >= 1
  return False


def one_line(message: str) -> str:
  return " ".join(str(message).split())


def fail(message: str, status: int = EXIT_USER_ERROR, prefix: str = "error: ") -> NoReturn:
  """Prints `error: message` (one line) on stderr and exits 2 (or `status`, after `prefix`)."""
  sys.stderr.write(f"{prefix}{one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(status)


def _file_on(path: str) -> str | None:
  """The first part of `path` (itself included) that exists and is not a directory, or None."""
  parts = os.path.abspath(path).split(os.sep)
  for i in range(2, len(parts) + 1):
    prefix = os.sep.join(parts[:i])
    if os.path.exists(prefix) and not os.path.isdir(prefix):
      return prefix
    if not os.path.exists(prefix):
      return None
  return None


def path_kind_message(e: OSError) -> str | None:
  """One line for a path of the wrong kind (a file where a directory is expected, or the reverse);
  None when `e` is another failure."""
  path = e.filename
  if path is None:
    return None
  if isinstance(e, IsADirectoryError):
    return f"{path}: is a directory, where a file is expected; give the path of a file"
  blocker = _file_on(os.fspath(path)) if isinstance(e, (NotADirectoryError, FileExistsError)) else None
  if blocker is not None:
    where = "" if os.path.abspath(blocker) == os.path.abspath(path) else f" (in {path})"
    return f"{blocker}: is a file, where a directory is expected{where}; give a directory, or move the file away"
  return None


def _flag_error_message(e: Exception, argv: Sequence[str]) -> str:
  """What went wrong while parsing the flags (which includes loading and overriding the config)."""
  text = one_line(e)
  # ml_collections: an override names a field (AttributeError) or a section (KeyError) the config lacks.
  if isinstance(e, (AttributeError, KeyError)):
    key = next(iter(re.findall(r"[A-Za-z_]\w*", text)), "?")
    override = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.") and
                     key in a.split("=", 1)[0].split(".")[1:]), f"--config...{key}")
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    hint = f' (did you mean "{suggestion.group(1)}"?)' if suggestion else ""
    return f"{override}: the config has no field {key!r}{hint}"
  if isinstance(e, SyntaxError) and e.filename:
    return f"{e.filename}, line {e.lineno}: not a Python config file ({e.msg})"
  if isinstance(e, OSError):
    return _config_load_message(e, argv)
  return text


def _config_arg(argv: Sequence[str]) -> str | None:
  """The path given as --config (the last one given, as absl reads it; without a `:args` suffix), or None."""
  path = None
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1].split(":", 1)[0]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1].split(":", 1)[0]
  return path


def _config_load_message(e: OSError, argv: Sequence[str]) -> str:
  """Why --config could not be loaded (ml_collections keeps the reason until the config is first read)."""
  path = _config_arg(argv)
  if path is not None and os.path.isdir(path):
    return f"--config={path}: is a directory, where a config file is expected (e.g. configs/default.py)"
  if path is not None and not os.path.exists(path):
    return f"--config={path}: no such config file"
  cause = e.__cause__ or getattr(e, "_error", None) or e
  return f"--config={path}: the config file cannot be loaded ({one_line(cause)})"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with one-line errors (exit 2) instead of absl's usage dump."""
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      getattr(flags.FLAGS.config, "keys", None)  # a config that failed to load raises its reason here
    return rest
  except Exception as e:  # the config file is user code: any failure in it is the user's to fix
    if _verbose(argv):
      raise
    fail(_flag_error_message(e, argv))


class Interrupted(KeyboardInterrupt):
  """Ctrl-C inside `session`: carries the workdir the rerun resumes from."""

  def __init__(self, workdir: str):
    super().__init__(workdir)
    self.workdir = workdir


def interrupted(e: KeyboardInterrupt) -> NoReturn:
  """One line saying how to resume, exit 130 (`--verbosity=1`: the traceback)."""
  if _verbose():
    raise e
  workdir = getattr(e, "workdir", None)
  where = f" from what {workdir} holds (its checkpoints are kept)" if workdir else ""
  fail(f"rerunning the same command resumes{where}", EXIT_INTERRUPTED, prefix="interrupted: ")


def guard(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """`main` with the expected failures turned into one line on stderr and exit 2 (see the module doc)."""

  def guarded(argv):
    try:
      main(argv)
    except checks.UserError as e:
      if _verbose():
        raise
      fail(str(e))
    except UnicodeDecodeError as e:  # a text file that is not UTF-8, read without a name to report
      if _verbose():
        raise
      fail(f"a file is not UTF-8 text ({e.reason} at byte {e.start}); give a UTF-8 text file")
    except OSError as e:
      message = path_kind_message(e)
      if message is None or _verbose():
        raise
      fail(message)
    except KeyboardInterrupt as e:
      interrupted(e)

  return guarded


def _exit_now(status: int) -> NoReturn:
  """Exits with `status` without the interpreter's teardown, once the logs are flushed.

  A job interrupted while JAX compiles leaves the compilation running on an XLA thread, and the teardown
  frees the client under it: a segfault (exit -11 instead of 130) in 4 of 7 Ctrl-Cs 3-6 s into QA-tuning on
  2026-12-06, 0 of 14 with this exit. What a run keeps is on disk by then: orbax commits a checkpoint by
  renaming it, and `session` has written the manifest.
  """
  py_logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)` with the project's flag parsing and error handling (the process's entry)."""
  interrupts.install()
  try:
    try:
      app.run(guard(main), flags_parser=parse_flags)
    except KeyboardInterrupt as e:  # while the flags (and the config file) load
      interrupted(e)
  except SystemExit as e:
    if e.code == EXIT_INTERRUPTED:
      _exit_now(EXIT_INTERRUPTED)
    raise


# ------------------------------------------------------------------------------------------------
# Logging: libraries to <workdir>/log.txt, the terminal to progress bars, phases and results.


def phase(message: str) -> None:
  """One line on the terminal (and in the log) saying what the job does next."""
  logging.info("%s", message)
  print(message, flush=True)


def _log_unraisable(u) -> None:
  """Errors Python can only report (e.g. in a coroutine orbax drops after a failed read) go to the log."""
  text = "".join(traceback.format_exception(u.exc_type, u.exc_value, u.exc_traceback))
  logging.warning("%s: %s", u.err_msg or "Exception ignored", text)


class _ProcessLog:
  """<workdir>/log.txt, open for the whole process: `close` (which `logging.shutdown` calls at exit) only
  flushes, so what is logged while objects are collected after it (a read orbax dropped, a task asyncio
  never retrieved) still reaches the file instead of a "--- Logging error ---" on the terminal."""

  def __init__(self, path: str):
    self.name = path
    self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by the interpreter at exit)

  def write(self, text: str) -> int:
    return self._file.write(text)

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.flush()


def route_logs(workdir: str) -> None:
  """Sends absl/Python logging (and warnings) to <workdir>/log.txt; also to stderr with --verbosity=1."""
  os.makedirs(workdir, exist_ok=True)
  handler = logging.get_absl_handler()
  handler.python_handler.stream = _ProcessLog(os.path.join(workdir, LOG_FILE))
  flags.FLAGS.alsologtostderr = _verbose()
  py_logging.captureWarnings(True)
  sys.unraisablehook = _log_unraisable
  logging.info("command: %s", " ".join(sys.argv))


def check_workdir(workdir: str) -> None:
  """A workdir that is (or lies under) a file is one `checks.UserError`, before anything is written."""
  blocker = _file_on(workdir)
  if blocker is not None:
    where = "" if os.path.abspath(blocker) == os.path.abspath(workdir) else f" (in the workdir {workdir})"
    raise checks.UserError(f"{blocker}: is a file, where the workdir (a directory: checkpoints, logs, results) "
                           f"is expected{where}; give a directory with --workdir")


# ------------------------------------------------------------------------------------------------
# The manifest and the resume check.


def config_dict(config: ml_collections.ConfigDict) -> dict:
  """The resolved config as JSON types (tuples become lists)."""
  return json.loads(json.dumps(config.to_dict(), default=list))


def _git_commit() -> dict | None:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.isdir(os.path.join(root, ".git")):
    return None
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                            timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return {"commit": commit, "dirty": bool(dirty)}


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def environment() -> dict:
  """Package version, git commit, library versions, devices and processes of this run."""
  import jax  # here, not at import: the flags (and the log routing) come first

  return {
      "package": {"camels_jax": _version("camels_jax"), "git": _git_commit()},
      "libraries": {name: _version(name) for name in LIBRARIES},
      "python": platform.python_version(),
      "host": platform.node(),
      "devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
      "process_count": jax.process_count(),
  }


def config_differences(old: dict, new: dict) -> dict[str, tuple]:
  """{dotted key: (old value, new value)} of every leaf that differs (missing leaves are None)."""
  flat_old = checks.leaves(ml_collections.ConfigDict(old, type_safe=False))
  flat_new = checks.leaves(ml_collections.ConfigDict(new, type_safe=False))
  return {k: (flat_old.get(k), flat_new.get(k)) for k in sorted(set(flat_old) | set(flat_new))
          if flat_old.get(k) != flat_new.get(k)}


def _is_safe(key: str, safe: Sequence[str]) -> bool:
  return any(fnmatch.fnmatchcase(key, pattern) for pattern in (*ALWAYS_SAFE, *safe))


def check_resume(workdir: str, config: dict, safe: Sequence[str],
                 introduced: Mapping[str, Any] | None = None) -> dict[str, tuple]:
  """The safe differences between `config` and the one <workdir>/config.json holds (an earlier run's);
  raises `checks.ConfigError` listing the unsafe ones. A field in `introduced` ({dotted key: the value that
  behaves as the code before that field existed}) that the earlier config lacks and this one sets to that
  value is no difference: runs made before the field was added go on."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
  except (OSError, ValueError) as e:
    raise checks.ConfigError(f"{path}: unreadable ({one_line(e)}); delete it or use another workdir") from None
  diffs = {k: v for k, v in config_differences(old, config).items()
           if not (v[0] is None and k in (introduced or {}) and v[1] == introduced[k])}
  unsafe = {k: v for k, v in diffs.items() if not _is_safe(k, safe)}
  if unsafe:
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in unsafe.items())
    raise checks.ConfigError(
        f"{workdir} holds a run made with a different config ({listed}); use another workdir, or the "
        f"earlier values (only {', '.join((*ALWAYS_SAFE, *safe))} may change on resume)")
  return diffs


@dataclasses.dataclass
class Session:
  """The running entry point's workdir, manifest and config (see `session`)."""

  entry: str
  workdir: str
  config: dict
  record: dict

  @property
  def manifest_path(self) -> str:
    return os.path.join(self.workdir, MANIFEST_FILE)


def manifest_path(workdir: str) -> str:
  """Where results files point to: the manifest of the workdir's runs."""
  return os.path.join(workdir, MANIFEST_FILE)


def _write_manifest(workdir: str, update: Callable[[dict], None]) -> None:
  path = manifest_path(workdir)
  manifest = {"runs": []}
  if os.path.exists(path):
    with contextlib.suppress(OSError, ValueError), open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  update(manifest)
  io_utils.write_json(path, manifest)


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def session(entry: str, config: ml_collections.ConfigDict, workdir: str, rules: checks.Rules,
            cross: Sequence[Callable] = (), safe: Sequence[str] = (),
            prerequisites: Callable[[ml_collections.ConfigDict, str], None] | None = None,
            distributed: bool | None = None, introduced: Mapping[str, Any] | None = None):
  """Checks the config (and the entry point's prerequisites), routes the logs, writes config.json and
  the manifest's record of this run, and completes the record (end time, status) when the run ends.

  Args:
    entry: the entry point's name ("train", "evaluate", ...).
    config: the job config; `workdir`: where this run writes.
    rules, cross: the config's `checks` rules and cross-field checks.
    safe: fnmatch patterns of fields that may differ from the workdir's earlier runs (`check_resume`).
    introduced: fields added since runs were made, with the value that keeps their behaviour (`check_resume`).
    prerequisites: prerequisites(config, workdir) raises `checks.UserError` when the run cannot succeed
      (e.g. evaluate without a trained weighting model); called before anything is loaded.
    distributed: join a multi-process run (`sharding.initialize_distributed`); None detects it from the
      environment. It happens here, before the first JAX call (the manifest lists the devices).
  """
  checks.validate(config, rules, cross)
  check_workdir(workdir)
  resolved = config_dict(config)
  changes = check_resume(workdir, resolved, safe, introduced)
  route_logs(workdir)
  import jax  # after the log routing: JAX logs its backend probes when it starts

  from camels_jax import sharding

  sharding.initialize_distributed(distributed)
  if prerequisites is not None:  # after joining: they may open checkpoints, which starts JAX's backend
    prerequisites(config, workdir)

  writer = jax.process_index() == 0  # one process writes the workdir's files
  record = {"entry": entry, "command": [sys.executable, *sys.argv], "cwd": os.getcwd(), "start": _now(),
            "end": None, "status": "running",
            "config_changes": {k: list(v) for k, v in changes.items()}} | environment()
  if writer:
    io_utils.write_json(os.path.join(workdir, CONFIG_FILE), resolved)
    _write_manifest(workdir, lambda m: m["runs"].append(record))
  status = "failed"
  try:
    yield Session(entry, workdir, resolved, record)
    status = "ok"
  except KeyboardInterrupt as e:
    status = "interrupted"
    raise Interrupted(workdir) from e
  except checks.UserError as e:
    status = f"error: {one_line(e)}"
    raise
  finally:
    def finish(m, status=status):
      for run_record in reversed(m["runs"]):
        if run_record.get("start") == record["start"] and run_record.get("entry") == entry:
          run_record.update(end=_now(), status=status)
          break
    if writer:
      _write_manifest(workdir, finish)
