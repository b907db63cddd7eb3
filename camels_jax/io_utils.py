"""Result files written atomically (a reader sees the whole file or none of it), and a workdir's config read back."""

import json
import math
import os
import tempfile

import ml_collections

from camels_jax import checks


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file in the same folder and a rename."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def strict_json(obj):
  """`obj` with every NaN / infinite float replaced by None and numpy scalars made plain Python.

  Python's json writes NaN and Infinity, which strict JSON readers (jq, JavaScript, most other languages)
  reject; a missing value is None ("null") instead.
  """
  if isinstance(obj, dict):
    return {k: strict_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [strict_json(v) for v in obj]
  if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / jax scalars
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def write_json(path: str, obj) -> None:
  """Writes `obj` as strict JSON (non-finite floats become null), atomically."""
  write_atomic(path, json.dumps(strict_json(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


CONFIG_FILE = "config.json"  # <workdir>/config.json: the resolved config every run writes (cli.session)


def read_workdir_json(workdir: str, name: str, what: str):
  """<workdir>/<name>, parsed; one `checks.UserError` naming the file when it is missing or unreadable (`what`:
  which run should have written it, for the message)."""
  path = os.path.join(workdir, name)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise checks.UserError(f"{path}: not found; {workdir} must be the workdir of {what}") from None
  except (OSError, ValueError) as e:
    raise checks.UserError(f"{path}: unreadable ({' '.join(str(e).split())})") from None


def workdir_config(workdir: str, what: str) -> ml_collections.ConfigDict:
  """The config a finished run wrote to <workdir>/config.json, as a ConfigDict (`read_workdir_json`)."""
  return ml_collections.ConfigDict(read_workdir_json(workdir, CONFIG_FILE, what))
