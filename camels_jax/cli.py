"""What every entry point (train, evaluate, perplexity, ...) shares on the command line.

- One-line errors: an expected failure (`checks.UserError`: bad data, a bad config, a missing prerequisite,
  an unreadable file) prints `error: <what, where, what to do>` on stderr and exits 2; a config that does not
  parse (unknown key, bad value, missing file) too. `--verbosity=1` shows the traceback. Anything else is a
  bug and keeps its traceback.
- The config is checked whole, every violation listed at once, before a model or dataset is loaded.
- A quiet terminal: progress bars, one line per phase and the results. Library logs (absl, JAX's backend
  probes, TFDS, orbax, Python warnings) go to <workdir>/log.txt; `--verbosity=1` shows them as well.
- A run manifest: <workdir>/config.json (the resolved config) and <workdir>/manifest.json (command line,
  package version and git commit, library versions, devices, processes, start and end of every run). A
  rerun in a workdir whose config.json differs outside the entry point's `safe` fields is refused with the
  differences listed.

An entry point's main is

  def main(argv):
    with cli.session("train", FLAGS.config, workdir, RULES, CROSS, SAFE_ON_RESUME):
      ...

  if __name__ == "__main__":
    define_flags()
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
from collections.abc import Callable, Sequence

import ml_collections
from absl import app, flags, logging

from camels_jax import checks, io_utils

LOG_FILE = "log.txt"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"
EXIT_USER_ERROR = 2
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tensorflow-datasets",
             "numpy", "ml-collections")
# Fields that never change what a workdir's artifacts are (every entry point's own list adds to these).
ALWAYS_SAFE = ("workdir", "jobs")


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


def fail(message: str) -> None:
  """Prints `error: message` (one line) on stderr and exits 2."""
  sys.stderr.write(f"error: {one_line(message)}\n")
  sys.stderr.flush()
  sys.exit(EXIT_USER_ERROR)


def _flag_error_message(e: Exception, argv: Sequence[str]) -> str:
  """What went wrong while parsing the flags (which includes loading and overriding the config)."""
  text = one_line(e)
  if isinstance(e, AttributeError):  # ml_collections: an override names a field the config does not have
    key = next(iter(re.findall(r"[A-Za-z_]\w*", text)), "?")
    override = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.") and
                     a.split("=", 1)[0].split(".")[-1] == key), f"--config...{key}")
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    hint = f' (did you mean "{suggestion.group(1)}"?)' if suggestion else ""
    return f"{override}: the config has no field {key!r}{hint}"
  if isinstance(e, SyntaxError) and e.filename:
    return f"{e.filename}, line {e.lineno}: not a Python config file ({e.msg})"
  return text


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with one-line errors (exit 2) instead of absl's usage dump."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # the config file is user code: any failure in it is the user's to fix
    if _verbose(argv):
      raise
    fail(_flag_error_message(e, argv))
  return []


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)` with the project's flag parsing and error handling."""

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

  app.run(guarded, flags_parser=parse_flags)


# ------------------------------------------------------------------------------------------------
# Logging: libraries to <workdir>/log.txt, the terminal to progress bars, phases and results.


def phase(message: str) -> None:
  """One line on the terminal (and in the log) saying what the job does next."""
  logging.info("%s", message)
  print(message, flush=True)


def route_logs(workdir: str) -> None:
  """Sends absl/Python logging (and warnings) to <workdir>/log.txt; also to stderr with --verbosity=1."""
  os.makedirs(workdir, exist_ok=True)
  handler = logging.get_absl_handler()
  stream = open(os.path.join(workdir, LOG_FILE), "a", encoding="utf-8")  # noqa: SIM115 (process lifetime)
  handler.python_handler.stream = stream
  flags.FLAGS.alsologtostderr = _verbose()
  py_logging.captureWarnings(True)
  logging.info("command: %s", " ".join(sys.argv))


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


def check_resume(workdir: str, config: dict, safe: Sequence[str]) -> dict[str, tuple]:
  """The safe differences between `config` and the one <workdir>/config.json holds (an earlier run's);
  raises `checks.ConfigError` listing the unsafe ones."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
  except (OSError, ValueError) as e:
    raise checks.ConfigError(f"{path}: unreadable ({one_line(e)}); delete it or use another workdir") from None
  diffs = config_differences(old, config)
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
            distributed: bool | None = None):
  """Checks the config (and the entry point's prerequisites), routes the logs, writes config.json and
  the manifest's record of this run, and completes the record (end time, status) when the run ends.

  Args:
    entry: the entry point's name ("train", "evaluate", ...).
    config: the job config; `workdir`: where this run writes.
    rules, cross: the config's `checks` rules and cross-field checks.
    safe: fnmatch patterns of fields that may differ from the workdir's earlier runs (`check_resume`).
    prerequisites: prerequisites(config, workdir) raises `checks.UserError` when the run cannot succeed
      (e.g. evaluate without a trained weighting model); called before anything is loaded.
    distributed: join a multi-process run (`sharding.initialize_distributed`); None detects it from the
      environment. It happens here, before the first JAX call (the manifest lists the devices).
  """
  checks.validate(config, rules, cross)
  resolved = config_dict(config)
  changes = check_resume(workdir, resolved, safe)
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
  except KeyboardInterrupt:
    status = "interrupted"
    raise
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
