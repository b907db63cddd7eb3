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
from orbax.checkpoint import checkpoint_managers as ocp_managers

PyTree = Any

_STATE, _META = "state", "meta"  # item names inside a step directory


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
    self._manager = ocp.CheckpointManager(self.directory, options=options)

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
      step: the step to restore; None for the latest.
      abstract_state: a pytree shaped like the saved state whose leaves are `jax.Array`s (their
        shardings are reused), `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`; their
        `.sharding` is used when set) or numpy arrays. None restores the saved tree as nested
        dicts of arrays (for inspection only: containers such as nnx.State are not rebuilt).
      sharding: for leaves that carry no sharding; default: the first local device.

    Returns:
      The restored state, meta, rng, metrics and step.

    Raises:
      FileNotFoundError: if there is no checkpoint (or not that step).
    """
    self.wait()  # a step still being written in the background is not yet readable
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"Checkpointer.restore: no checkpoint in {self.directory}")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f"Checkpointer.restore: no step {step} in {self.directory} "
                              f"(kept steps: {self.all_steps()})")
    if abstract_state is None:
      state_args = ocp.args.StandardRestore()
    else:
      state_args = ocp.args.StandardRestore(_abstract(abstract_state, sharding))
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{_STATE: state_args, _META: ocp.args.JsonRestore()}))
    document = restored[_META]
    rng = None if document["rng"] is None else key_from_json(document["rng"])
    return Restored(restored[_STATE], document["meta"], rng, document["metrics"], step)

  def restore_best(self, abstract_state: PyTree | None,
                   sharding: jax.sharding.Sharding | None = None) -> Restored:
    """`restore` of `best_step()`; same arguments and errors."""
    step = self.best_step()
    if step is None:
      raise FileNotFoundError(f"Checkpointer.restore_best: no checkpoint with metric "
                              f"{self.best_metric!r} in {self.directory}")
    return self.restore(step, abstract_state, sharding)

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
