"""Checkpoints of a training run: the state pytree, the data position, the RNG key and metrics.

One `Checkpointer` wraps one orbax `CheckpointManager` (the `args=` API). Each step directory holds
two items:

  state/  the state pytree (params, optimizer state, ... any pytree of arrays, e.g. nnx.State),
          written by `StandardSave` and restored by `StandardRestore` onto the shardings asked for;
  meta/   one JSON document: the caller's `meta` dict (the data loader's position, a config
          hash...), the RNG key as raw key data, and the step's metrics.

Guarantees (orbax's, checked against its docs and source):

  * Atomic: a step is written into `<step>.orbax-checkpoint-tmp` and renamed to `<step>` only
    after every byte (and a `commit_success.txt`) is written, and listing ignores tmp directories.
    A crash mid-save therefore leaves `latest_step()` on the previous complete step; the next
    `Checkpointer` on the directory deletes the leftover tmp directory.
  * Async: `save` returns once the arrays are copied to host memory (so the caller may update or
    donate them right away); files are written by a background thread. Errors of that thread
    surface on the next `save`, `wait` or `close`. Call `close()` (or use `with`) before exiting,
    or the last save may be lost (never half-written). `restore` waits for pending saves first.
  * Retention: the `max_to_keep` latest steps are kept, plus, when `best_metric` is set, the step
    with the best value of that metric, however old.
  * Multi-process: every process calls `save` and `restore` with its part of the global arrays;
    orbax coordinates the processes and the primary one writes the JSON.
  * Damage (a file truncated or overwritten after the save, e.g. by a partial copy): `restore(None, ...)`
    resumes from the newest step that reads back whole, setting the unreadable newer steps aside as
    `<step>.damaged` (kept, never deleted; new saves take their numbers); a damaged step asked for by
    number or as the best, or no readable step at all, raises `DamagedCheckpoint`, one line naming the
    step and what to do.

Typical use:

  with Checkpointer(workdir, best_metric="val_loss") as ckpt:
    if ckpt.latest_step() is not None:
      r = ckpt.restore(None, abstract_state)  # r.state, r.meta, r.rng, r.metrics, r.step
      loader.set_position(r.meta["data"])
    ...
    ckpt.save(step, state, meta={"data": loader.position()}, rng=rng, metrics={"val_loss": loss})
"""

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_managers

from camels_jax import checks

PyTree = Any

_STATE, _META = "state", "meta"  # item names inside a step directory
DAMAGED_SUFFIX = ".damaged"  # an unreadable step set aside: <directory>/<step>.damaged


class DamagedCheckpoint(checks.UserError):
  """A checkpoint step that cannot be read back; the message names the step and what to do."""


class Restored(NamedTuple):
  """What `Checkpointer.restore` returns."""

  state: PyTree  # the state pytree, with the structure and shardings of `abstract_state`
  meta: dict  # the `meta` dict given to `save` (JSON types: lists, not tuples)
  rng: jax.Array | None  # the RNG key given to `save` (typed or raw uint32, as it was saved)
  metrics: dict | None  # the `metrics` given to `save`
  step: int


class Checkpointer:
  """Saves and restores training checkpoints in one directory (see the module docstring).

  Attributes:
    directory: absolute path (or URL, e.g. gs://...) of the checkpoint directory.
    best_metric: name of the metric that ranks checkpoints, or None.
  """

  def __init__(self, directory: str, max_to_keep: int = 2, best_metric: str | None = None,
               best_mode: str = "min"):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: where the step directories live. Local paths are made absolute.
      max_to_keep: how many of the latest steps to keep (>= 1); older ones are deleted.
      best_metric: if set, `save` needs `metrics[best_metric]` to rank a step, and the best step
        is kept in addition to the `max_to_keep` latest ones.
      best_mode: "min" (e.g. a loss) or "max" (e.g. an accuracy).

    Raises:
      ValueError: on a bad `max_to_keep` or `best_mode`.
    """
    if max_to_keep < 1:
      raise ValueError(f"Checkpointer: max_to_keep={max_to_keep} must be >= 1")
    if best_mode not in ("min", "max"):
      raise ValueError(f"Checkpointer: best_mode={best_mode!r} is not 'min' or 'max'")
    # orbax wants absolute local paths; URLs (gs://...) pass through.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise checks.UserError(f"{self.directory}: is a file, where a checkpoint directory is expected; move it "
                             f"away or use another workdir")
    self.best_metric = best_metric
    policies: list[ocp_managers.PreservationPolicy] = [ocp_managers.LatestN(n=max_to_keep)]
    best_fn = None
    if best_metric is not None:
      best_fn = lambda metrics: metrics[best_metric]  # noqa: E731
      # BestN keeps the n highest values of best_fn, hence reverse for "min". Steps saved without
      # metrics are left to LatestN rather than kept forever.
      policies.append(ocp_managers.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                                         keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        # best_fn/best_mode are still what makes orbax write the metrics and answer best_step();
        # which steps survive is decided by preservation_policy alone (it overrides max_to_keep).
        best_fn=best_fn,
        best_mode=best_mode,
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
        cleanup_tmp_directories=True,  # leftovers of a crashed save
        create=True,
    )
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options)
    except Exception as e:  # orbax reads every kept step's metrics here: one that does not parse
      step = _unreadable_metrics(self.directory)
      if step is None:
        raise
      raise DamagedCheckpoint(self._damaged(step, f"its metrics do not read back: {_one_line(e)}")) from e

  # ----------------------------------------------------------------------------------------------
  # Queries.

  def latest_step(self) -> int | None:
    """The newest saved step (including one still being written in the background), or None."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The kept step with the best `best_metric`, or None if no kept step has metrics.

    Raises:
      ValueError: if the Checkpointer has no `best_metric`.
    """
    if self.best_metric is None:
      raise ValueError("Checkpointer.best_step: no best_metric was given to the Checkpointer")
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    """Every kept step, ascending."""
    return sorted(self._manager.all_steps())

  # ----------------------------------------------------------------------------------------------
  # Save and restore.

  def save(self, step: int, state: PyTree, *, meta: dict | None = None,
           rng: jax.Array | None = None, metrics: dict | None = None) -> None:
    """Starts saving `state`, `meta`, `rng` and `metrics` as `step` (see "Async" in the module doc).

    Args:
      step: the training step; must be newer than every saved step.
      state: pytree of arrays (jax or numpy), e.g. {"params": nnx.State, "opt": optax state}.
      meta: JSON-able dict, e.g. {"data": loader position, "config_hash": ...}. numpy scalars and
        small arrays are converted to Python numbers and lists.
      rng: a PRNG key, typed (`jax.random.key`) or raw uint32 (`jax.random.PRNGKey`); any shape.
      metrics: dict of numbers; must hold `best_metric` (finite) for the step to rank as best.

    Raises:
      ValueError: if `step` is not newer than `latest_step()`, or `metrics` lacks `best_metric`
        or it is not finite.
      TypeError: if `meta` or `metrics` cannot be written as JSON.
    """
    latest = self.latest_step()
    if latest is not None and step <= latest:
      # orbax would silently skip such a save (its save-decision policy returns False).
      raise ValueError(f"Checkpointer.save: step {step} is not newer than the latest saved step "
                       f"{latest} in {self.directory}")
    meta_json = _to_json(meta or {}, "meta")
    metrics_json = None
    if metrics is not None:
      metrics_json = _to_json(metrics, "metrics")
      if self.best_metric is not None:
        if self.best_metric not in metrics_json:
          raise ValueError(f"Checkpointer.save(step={step}): metrics {sorted(metrics_json)} lack "
                           f"best_metric {self.best_metric!r}")
        if not np.isfinite(metrics_json[self.best_metric]):
          raise ValueError(f"Checkpointer.save(step={step}): metric {self.best_metric!r} is "
                           f"{metrics_json[self.best_metric]}, not a finite number")
    document = {"meta": meta_json, "rng": None if rng is None else key_to_json(rng),
                "metrics": metrics_json}
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                 _META: ocp.args.JsonSave(document)})
    # Orbax only writes (and ranks by) metrics when best_fn is set, so pass them only then; they
    # are always in the meta document too.
    saved = self._manager.save(step, args=args,
                               metrics=metrics_json if self.best_metric is not None else None)
    if not saved:  # cannot happen with orbax's default policy, which saves every newer step
      raise RuntimeError(f"Checkpointer.save: orbax declined to save step {step}")

  def restore(self, step: int | None, abstract_state: PyTree | None,
              sharding: jax.sharding.Sharding | None = None) -> Restored:
    """Restores a step onto the shapes, dtypes and shardings of `abstract_state`.

    Args:
      step: the step to restore; None for the latest that reads back whole (newer unreadable steps
        are set aside as `<step>.damaged`, with a warning in the log).
      abstract_state: a pytree shaped like the saved state whose leaves are `jax.Array`s (their
        shardings are reused), `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`; their
        `.sharding` is used when set) or numpy arrays. None restores the saved tree as nested
        dicts of arrays (for inspection only: containers such as nnx.State are not rebuilt).
      sharding: for leaves that carry no sharding; default: the first local device.

    Returns:
      The restored state, meta, rng, metrics and step.

    Raises:
      FileNotFoundError: if there is no checkpoint (or not that step).
      DamagedCheckpoint: if the step asked for, or (step None) every kept step, does not read back.
    """
    self.wait()  # a step still being written in the background is not yet readable
    if step is None:
      steps = self.all_steps()
      if not steps:
        raise FileNotFoundError(f"Checkpointer.restore: no checkpoint in {self.directory}")
      return self._restore_newest_intact(steps, abstract_state, sharding)
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"Checkpointer.restore: no step {step} in {self.directory} "
                              f"(kept steps: {self.all_steps()})")
    return self._read(step, abstract_state, sharding)

  def restore_best(self, abstract_state: PyTree | None,
                   sharding: jax.sharding.Sharding | None = None) -> Restored:
    """`restore` of `best_step()`; same arguments and errors (a damaged best step is never replaced
    by another one silently: `DamagedCheckpoint` says which it is)."""
    step = self.best_step()
    if step is None:
      raise FileNotFoundError(f"Checkpointer.restore_best: no checkpoint with metric "
                              f"{self.best_metric!r} in {self.directory}")
    return self.restore(step, abstract_state, sharding)

  # ----------------------------------------------------------------------------------------------
  # Reading back, and what a damaged step becomes.

  def _read(self, step: int, abstract_state: PyTree | None, sharding) -> Restored:
    """One step as `Restored`; `DamagedCheckpoint` if any of its files does not read back (on any process)."""
    if abstract_state is None:
      state_args = ocp.args.StandardRestore()
    else:
      state_args = ocp.args.StandardRestore(_abstract(abstract_state, sharding))
    error = None
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(**{_STATE: state_args, _META: ocp.args.JsonRestore()}))
      document = restored[_META]
      rng = None if document["rng"] is None else key_from_json(document["rng"])
      result = Restored(restored[_STATE], document["meta"], rng, document["metrics"], step)
    except Exception as e:  # tensorstore, JSON and orbax each raise their own kinds for a bad file
      error = e
    if not _everywhere(error is None):  # the processes of one run resume from the same step
      cause = _one_line(error) if error is not None else "another process could not read it"
      raise DamagedCheckpoint(self._damaged(step, cause)) from error
    return result

  def _restore_newest_intact(self, steps: list[int], abstract_state: PyTree | None, sharding) -> Restored:
    """The newest of `steps` that reads back; the newer ones are set aside (see the module doc)."""
    damaged = []
    for step in reversed(steps):
      try:
        restored = self._read(step, abstract_state, sharding)
      except DamagedCheckpoint as e:
        damaged.append((step, e))
        continue
      for (s, e), name in zip(damaged, self._set_aside([s for s, _ in damaged]) if damaged else []):
        logging.warning("%s; resuming from step %d (step %d set aside as %s)", e, step, s, name)
      return restored
    newest, error = damaged[0]
    if len(steps) == 1:
      raise error  # "checkpoint step N in DIR is damaged (...)"
    cause = _one_line(error.__cause__ or error)
    raise DamagedCheckpoint(f"no checkpoint in {self.directory} reads back (steps {', '.join(map(str, steps))}; "
                            f"step {newest}: {cause}); remove {self.directory} to start again") from error

  def _step_path(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def _set_aside(self, steps: list[int]) -> list[str]:
    """Renames each step directory to <step>.damaged (kept for inspection; its number becomes free);
    returns the new names."""
    names = []
    for step in steps:
      path = self._step_path(step)
      target, n = path.parent / f"{path.name}{DAMAGED_SUFFIX}", 1
      while target.exists():
        target, n = path.parent / f"{path.name}{DAMAGED_SUFFIX}{n}", n + 1
      names.append(target.name)
      if jax.process_index() == 0 and path.exists():  # one process renames; the others wait for it
        path.rename(target)
    ocp.multihost.sync_global_processes(f"camels_jax_set_aside_{'_'.join(map(str, steps))}")
    self._manager.reload()
    return names

  def _damaged(self, step: int, cause: str) -> str:
    """One line: which step of which directory cannot be read, why, and what to do."""
    path = self._step_path(step)
    earlier = [s for s in _step_numbers(self.directory) if s < step]
    what = (f"remove {path} to go on from step {earlier[-1]}, or remove {self.directory} to start again"
            if earlier else f"remove {self.directory} to start again")
    return f"checkpoint step {step} in {self.directory} is damaged ({cause}); {what}"

  def wait(self) -> None:
    """Blocks until background saves are on disk; raises their errors."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for background saves and releases the manager's threads."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ------------------------------------------------------------------------------------------------
# Helpers.


def _one_line(e: BaseException, limit: int = 300) -> str:
  """An exception as one short line (tensorstore's messages run to pages of JSON)."""
  text = " ".join(str(e).split()).split(" See full TensorStore details")[0] or type(e).__name__
  return text if len(text) <= limit else text[:limit] + "..."


def _step_numbers(directory: str) -> list[int]:
  """The step directories' numbers (those orbax lists: digits only), ascending."""
  try:
    names = [p.name for p in epath.Path(directory).iterdir()]
  except OSError:
    return []
  return sorted(int(n) for n in names if n.isdigit())


def _unreadable_metrics(directory: str) -> int | None:
  """The first step whose metrics file is not JSON (what stops orbax from opening the directory)."""
  for step in _step_numbers(directory):
    path = epath.Path(directory) / str(step) / "metrics" / "metrics"
    if not path.exists():
      continue
    try:
      json.loads(path.read_text())
    except (OSError, ValueError):
      return step
  return None


def _everywhere(ok: bool) -> bool:
  """`ok` on every process (one small all-gather when there are several)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(np.all(multihost_utils.process_allgather(np.asarray([ok]))))


def key_to_json(key: jax.Array) -> dict:
  """A PRNG key (typed or raw uint32, any shape) as a JSON-able dict; inverse of key_from_json."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return {"impl": str(jax.random.key_impl(key)),
            "data": np.asarray(jax.random.key_data(key)).tolist()}
  # A raw key is just its uint32 words; impl None marks it so it comes back raw, not typed.
  return {"impl": None, "data": np.asarray(key, np.uint32).tolist()}


def key_from_json(obj: dict) -> jax.Array:
  """The PRNG key saved by key_to_json, bit-identical and of the same kind (typed or raw)."""
  data = np.asarray(obj["data"], np.uint32)
  if obj["impl"] is None:
    return jnp.asarray(data)
  return jax.random.wrap_key_data(data, impl=obj["impl"])


def _json_default(x):
  # The data loader and metrics code hand over numpy / jax scalars; JSON only knows Python ones.
  if isinstance(x, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"{type(x).__name__} is not JSON serializable")


def _to_json(obj: dict, what: str) -> dict:
  """`obj` as plain JSON types, checked here rather than later in orbax's background thread."""
  if not isinstance(obj, dict):
    raise TypeError(f"Checkpointer.save: {what} must be a dict, not {type(obj).__name__}")
  try:
    return json.loads(json.dumps(obj, default=_json_default))
  except (TypeError, ValueError) as e:
    raise TypeError(f"Checkpointer.save: {what} is not JSON-serializable: {e}") from e


def _abstract(tree: PyTree, sharding: jax.sharding.Sharding | None) -> PyTree:
  """`tree` with every leaf a ShapeDtypeStruct that carries a sharding (orbax restores onto it)."""
  default = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct):
      return x if x.sharding is not None else jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                   sharding=default)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)

  return jax.tree.map(leaf, tree)


@jax.jit
def _all_finite(trees: tuple) -> jax.Array:
  """bool[len(trees)]: whether every float leaf of each tree is free of NaN and Inf."""
  flags = []
  for tree in trees:
    finite = jnp.array(True)
    for x in jax.tree.leaves(tree):
      x = jnp.asarray(x)
      if jnp.issubdtype(x.dtype, jnp.inexact):  # integer leaves (step counters) are always finite
        finite &= jnp.isfinite(x).all()
    flags.append(finite)
  return jnp.stack(flags)


def check_finite(step: int, **trees: PyTree) -> None:
  """Raises if any float leaf of the named trees holds a NaN or Inf.

  All trees are reduced on device by one jitted function, so the check costs a single host
  transfer of a few bools however many leaves there are.

  Args:
    step: the training step, for the message.
    **trees: named pytrees, e.g. check_finite(step, loss=loss, grad=grads).

  Raises:
    FloatingPointError: "step {step}: non-finite {name}" naming every offending tree.
  """
  if not trees:
    return
  names = list(trees)
  finite = np.asarray(_all_finite(tuple(trees.values())))
  if not finite.all():
    bad = ", ".join(name for name, ok in zip(names, finite) if not ok)
    raise FloatingPointError(f"step {step}: non-finite {bad}")
