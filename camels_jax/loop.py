"""The training loop every job shares (QA-tuning, CaMeLS meta-training, MAC, the FWL head).

A job builds its state (a pytree of arrays: parameters, optimizer state), a step and a validation, and calls
`run`. The loop owns everything around them, written once:

  * resume from the newest checkpoint of <workdir>/<job>: the state, the data position (`loader.state`),
    the RNG key and the validation history, so a run killed at any step ends where an uninterrupted one does;
  * the step: `state, carry, metrics = step_fn(state, carry, step, rng)` with a fresh key split off the
    run's RNG every step (`carry` is what a step hands the next one but is never saved: it must be
    rebuildable at a checkpoint step, e.g. CaMeLS's per-stream base models, reset there);
  * the finiteness check, one way: the step's "loss" and "grad_norm" and the validation's best metric,
    "step N: non-finite loss" (`checkpoint.check_finite`);
  * a tqdm bar and TensorBoard scalars under one scheme: `<job>/train/<name>` (means over `log_every`
    steps) and `<job>/val/<name>` (a validation's "val_" prefix dropped);
  * validation at step 0, every `val_every` steps and at the last step, each also a checkpoint; an early
    stop (`stop_fn`) after any validation;
  * the best step's state restored at the end. The best is the first validation that reaches the best
    value of `best_metric` (a tie is no improvement), and stays on disk however old it is.

Without a workdir (the evaluation's light-tune) nothing is written and the best state is kept in memory (so
that step_fn must not donate its state).
"""

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from camels_jax import checkpoint, checks, interrupts

PyTree = Any
StepFn = Callable[[PyTree, Any, int, jax.Array], tuple[PyTree, Any, Mapping[str, jax.Array]]]

# Orbax keeps the step with the highest rank: the count of improvements so far at an improving validation,
# -1 elsewhere. The newest improvement is then the first step at the best value, whatever the mode.
_RANK = "best_rank"


class Loader(Protocol):
  """A data source whose position is saved with every checkpoint (`pipeline.Loader` is one)."""

  @property
  def state(self) -> dict: ...

  def restore(self, state: dict) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How a job's loop runs (every job fills it from its own config section)."""

  job: str  # checkpoints in <workdir>/<job>; TensorBoard tags <job>/train/..., <job>/val/...
  steps: int  # the last step (>= 0); 0 = validate the initial state only
  val_every: int  # steps between validations (each is a checkpoint)
  best_metric: str  # a key of the validation dict that ranks steps
  best_mode: str = "min"  # "min" (a loss) or "max" (an accuracy)
  log_every: int = 1  # steps between train scalars (means over the interval)
  max_to_keep: int = 2  # newest checkpoints kept besides the best one

  def __post_init__(self):
    if self.best_mode not in ("min", "max"):
      raise ValueError(f"LoopConfig({self.job}): best_mode={self.best_mode!r} is not 'min' or 'max'")
    if self.steps < 0 or self.val_every < 1 or self.log_every < 1:
      raise ValueError(f"LoopConfig({self.job}): steps={self.steps} must be >= 0, val_every={self.val_every} and "
                       f"log_every={self.log_every} >= 1")


@dataclasses.dataclass(frozen=True)
class Result:
  """What `run` returns."""

  state: PyTree  # the best step's state
  best_step: int
  best: dict  # the best step's history entry
  # Every validation: {"step", "train_loss" (mean since the previous one), **validation, "is_best" (an
  # improvement), "stop" (stop_fn's answer)}.
  history: list
  steps_run: int  # the step the loop stopped at (an early stop ends before cfg.steps)


def improves(value: float, best: float | None, mode: str) -> bool:
  """Strictly better than `best` (None: nothing yet)."""
  return best is None or (value < best if mode == "min" else value > best)


def best_entry(history, metric: str, mode: str) -> dict:
  """The first validation record that reaches the best value of `metric`."""
  best = None
  for entry in history:
    if improves(entry[metric], None if best is None else best[metric], mode):
      best = entry
  return best


def _val_tags(job: str, val: Mapping[str, Any]) -> dict:
  # Numbers only (a nested dict or a flag is not a scalar); NaN marks a metric that was not computed.
  return {f"{job}/val/{k.removeprefix('val_')}": v for k, v in val.items()
          if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and not math.isnan(v)}


class _Checkpoints:
  """<workdir>/<job>'s checkpoints, or the best state in memory when there is no workdir."""

  def __init__(self, cfg: LoopConfig, workdir: str | None):
    self.ckpt = None if workdir is None else checkpoint.Checkpointer(
        os.path.join(workdir, cfg.job), max_to_keep=cfg.max_to_keep, best_metric=_RANK, best_mode="max")
    self.best_state = None

  def resume(self, state):
    if self.ckpt is None or self.ckpt.latest_step() is None:
      return None
    restored = self.ckpt.restore(None, state)
    logging.info("resumed from step %d of %s", restored.step, self.ckpt.directory)
    return restored

  def save(self, step, state, meta, rng, rank: int):
    if self.ckpt is None:
      if rank >= 0:
        self.best_state = state
      return
    self.ckpt.save(step, state, meta=meta, rng=rng, metrics={_RANK: rank})

  def best(self, state, best_step: int, last_step: int):
    if self.ckpt is None:
      return self.best_state
    self.ckpt.wait()
    if best_step == last_step:  # the state in hand
      return state
    return self.ckpt.restore(best_step, state).state

  def close(self):
    if self.ckpt is not None:
      self.ckpt.close()


def should_stop(history: Sequence[float], patience: int, mode: str = "min") -> bool:
  """The CaMeLS reference's early-stopping rule on one metric's validation history (QA-tune, FWL).

  With more than `patience` values: stop if the best of all but the last `patience` is strictly better
  than the best of the last `patience`. A tie is not worse, so an exactly flat history never stops
  (as in the reference); `qa_tune.stop_rule` adds the reference's fallback for flat "max" metrics.

  Args:
    history: the metric at each validation, oldest first.
    patience: number of trailing validations that must all fail to beat the earlier best.
    mode: "min" (lower is better, e.g. NLL) or "max" (e.g. F1).

  Returns:
    Whether to stop training.
  """
  if mode not in ("min", "max"):
    raise ValueError(f"mode={mode!r} is not 'min' or 'max'")
  if len(history) <= patience:
    return False
  earlier, recent = history[:-patience], history[-patience:]
  if mode == "min":
    return min(earlier) < min(recent)
  return max(earlier) > max(recent)


def run(cfg: LoopConfig, state: PyTree, step_fn: StepFn, validate_fn: Callable[[PyTree], dict], *,
        workdir: str | None, writer, rng: jax.Array, loader: Loader | None = None,
        stop_fn: Callable[[list], bool] | None = None, progress: bool = True, desc: str | None = None) -> Result:
  """Trains `state` from step 0, or from the newest checkpoint in <workdir>/<cfg.job> (see the module doc).

  Args:
    cfg: the loop's settings.
    state: the initial state; its structure and shardings are those a checkpoint is restored onto.
    step_fn: (state, carry, step, rng) -> (state, carry, metrics); carry starts as None at every (re)start.
    validate_fn: state -> {name: number}, holding `cfg.best_metric`.
    workdir: the job's checkpoints go to <workdir>/<cfg.job>; None keeps nothing on disk.
    writer: `metrics.MetricWriter` (write_scalars).
    rng: the run's key (saved and restored with the state).
    loader: the data source whose position is saved (None: the step number is the position).
    stop_fn: history -> whether to stop early, asked after every validation.
    progress: show a tqdm bar.

  Returns:
    The best state, its step and validation, the history, and the step the loop ended at.

  Raises:
    FloatingPointError: "step N: non-finite loss" (or grad_norm, or the best metric).
  """
  ckpts = _Checkpoints(cfg, workdir)
  try:
    return _run(cfg, state, step_fn, validate_fn, ckpts, writer, rng, loader, stop_fn, progress, desc)
  finally:
    ckpts.close()


def _run(cfg, state, step_fn, validate_fn, ckpts, writer, rng, loader, stop_fn, progress, desc) -> Result:
  step, history, stopped = 0, [], False
  restored = ckpts.resume(state)
  if restored is not None:
    state, step, rng = restored.state, restored.step, restored.rng
    history, stopped = restored.meta["history"], restored.meta["stopped"]
    if loader is not None:
      loader.restore(restored.meta["data"])
  train_sums, n_train, loss_sum, n_loss = {}, 0, 0.0, 0

  def validate_and_save(step):
    nonlocal stopped, loss_sum, n_loss
    val = dict(validate_fn(state))
    checkpoint.check_finite(step, **{cfg.best_metric: jnp.asarray(val[cfg.best_metric], jnp.float32)})
    best = best_entry(history, cfg.best_metric, cfg.best_mode) if history else None
    is_best = improves(val[cfg.best_metric], None if best is None else best[cfg.best_metric], cfg.best_mode)
    entry = {"step": step} | ({"train_loss": loss_sum / n_loss} if n_loss else {}) | val | {"is_best": is_best}
    history.append(entry)
    loss_sum, n_loss = 0.0, 0
    stopped = entry["stop"] = bool(stop_fn(history)) if stop_fn is not None else False
    writer.write_scalars(step, _val_tags(cfg.job, val))
    rank = sum(h["is_best"] for h in history) if is_best else -1
    meta = {"history": history, "stopped": stopped, "data": None if loader is None else loader.state}
    ckpts.save(step, state, meta, rng, rank)

  if not history:
    validate_and_save(0)
  bar = tqdm.tqdm(total=cfg.steps, initial=step, desc=desc or cfg.job, disable=not progress)
  carry = None
  while step < cfg.steps and not stopped:
    interrupts.raise_if_requested()
    rng, step_rng = jax.random.split(rng)
    state, carry, m = step_fn(state, carry, step, step_rng)
    checkpoint.check_finite(step, **{k: m[k] for k in ("loss", "grad_norm") if k in m})
    m = {k: float(v) for k, v in m.items()}
    step += 1
    bar.update(1)
    loss_sum, n_loss = loss_sum + m.get("loss", math.nan), n_loss + 1
    train_sums, n_train = {k: train_sums.get(k, 0.0) + v for k, v in m.items()}, n_train + 1
    if step % cfg.log_every == 0 or step == cfg.steps:
      means = {k: v / n_train for k, v in train_sums.items()}
      writer.write_scalars(step, {f"{cfg.job}/train/{k}": v for k, v in means.items()})
      bar.set_postfix(loss=f"{means.get('loss', math.nan):.4f}")
      train_sums, n_train = {}, 0
    if step % cfg.val_every == 0 or step == cfg.steps:
      validate_and_save(step)
  bar.close()
  best = best_entry(history, cfg.best_metric, cfg.best_mode)
  state = ckpts.best(state, best["step"], step)
  return Result(state, best["step"], best, history, step)


def require_trained(directory: str, error: Callable[[str], checks.UserError]) -> None:
  """Raises `error(directory)` unless `directory` holds a finished loop's checkpoints (cheap: no restore)."""
  if not os.path.isdir(directory):
    raise error(directory)
  with checkpoint.Checkpointer(directory, best_metric=_RANK, best_mode="max") as ckpt:
    if ckpt.best_step() is None:
      raise error(directory)


def restore_best(directory: str, state: PyTree, error: Callable[[str], checks.UserError]) -> PyTree:
  """The best step's state of the loop that wrote `directory`, restored onto `state`'s structure and
  shardings (what a job's `load_trained` returns); `error(directory)` when there is none."""
  require_trained(directory, error)
  with checkpoint.Checkpointer(directory, best_metric=_RANK, best_mode="max") as ckpt:
    return ckpt.restore_best(state).state
