"""The shared training loop: resume (state, data position, RNG), best-step restore, finiteness, early stop,
TensorBoard tags. Every job trains through it, so these are tested here once, on a toy problem whose every
step depends on the state, the data position and the RNG."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from camels_jax import interrupts, loop


class Writer:
  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))

  def tags(self):
    return sorted({k for _, d in self.scalars for k in d})


class Loader:
  """Data 0, 1, 2, ... with a checkpointable position."""

  def __init__(self):
    self.index = 0

  @property
  def state(self):
    return {"index": self.index}

  def restore(self, state):
    self.index = state["index"]

  def __next__(self):
    self.index += 1
    return float(self.index - 1)


class Interrupted(Exception):
  pass


def _job(loader, interrupt_at=None, nan_at=None):
  """A step that moves w towards the data with RNG noise: its result depends on all three."""

  @jax.jit
  def update(w, x, rng):
    return w + 0.1 * (x - w) + 0.01 * jax.random.normal(rng, w.shape)

  def step_fn(state, carry, step, rng):
    if step == interrupt_at:
      raise Interrupted(step)
    carry = (carry or 0) + 1  # steps since the (re)start: never saved
    w = update(state["w"], next(loader), rng)
    loss = jnp.float32(math.nan) if step == nan_at else jnp.mean(w ** 2)
    return {"w": w}, carry, {"loss": loss, "grad_norm": jnp.float32(1.0)}
  return step_fn


def _validate(state):
  return {"val_loss": float(jnp.mean((state["w"] - 3.0) ** 2))}


def _run(workdir, steps=10, val_every=3, interrupt_at=None, validate=_validate, **kw):
  loader = Loader()
  cfg = loop.LoopConfig("toy", steps, val_every, "val_loss", **kw)
  return loop.run(cfg, {"w": jnp.zeros(4)}, _job(loader, interrupt_at), validate, workdir=workdir,
                  writer=Writer(), rng=jax.random.key(0), loader=loader, progress=False)


def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_result(tmp_path):
  whole = _run(str(tmp_path / "a"))
  with pytest.raises(Interrupted):
    _run(str(tmp_path / "b"), interrupt_at=7)  # after the step-6 checkpoint
  resumed = _run(str(tmp_path / "b"))
  np.testing.assert_array_equal(resumed.state["w"], whole.state["w"])
  assert resumed.history == whole.history
  assert [h["step"] for h in whole.history] == [0, 3, 6, 9, 10]
  assert resumed.best_step == whole.best_step and resumed.steps_run == 10


def test_resume_restores_the_rng_and_the_data_position(tmp_path):
  # Without the saved key and position, the resumed steps would draw other noise or other data.
  whole = _run(str(tmp_path / "a"), steps=6, val_every=2)
  with pytest.raises(Interrupted):
    _run(str(tmp_path / "b"), steps=6, val_every=2, interrupt_at=5)
  again = _run(str(tmp_path / "b"), steps=6, val_every=2)
  np.testing.assert_array_equal(again.state["w"], whole.state["w"])
  fresh_rng = loop.run(loop.LoopConfig("toy", 6, 2, "val_loss"), {"w": jnp.zeros(4)}, _job(Loader()), _validate,
                       workdir=None, writer=Writer(), rng=jax.random.key(1), progress=False)
  assert not np.array_equal(fresh_rng.state["w"], whole.state["w"])


def test_the_best_step_is_restored_even_when_older_than_the_kept_checkpoints(tmp_path):
  values = iter([5.0, 2.0, 4.0, 3.0, 2.0, 6.0])  # steps 0, 2, ..., 10; the best (2.0) first at step 2 (a tie later)
  seen = {}

  def validate(state):
    value = next(values)
    seen[len(seen) * 2] = np.asarray(state["w"])
    return {"val_loss": value}

  r = _run(str(tmp_path), steps=10, val_every=2, validate=validate, max_to_keep=1)
  assert r.best_step == 2 and r.best["val_loss"] == 2.0
  np.testing.assert_array_equal(r.state["w"], seen[2])
  assert [h["is_best"] for h in r.history] == [True, True, False, False, False, False]
  # And by a later process, from disk: what a job's load_trained does.
  restored = loop.restore_best(str(tmp_path / "toy"), {"w": jnp.zeros(4)}, ValueError)
  np.testing.assert_array_equal(restored["w"], seen[2])


def test_max_mode_picks_the_highest():
  values = iter([0.1, 0.5, 0.3])
  r = loop.run(loop.LoopConfig("toy", 4, 2, "f1", best_mode="max"), {"w": jnp.zeros(4)}, _job(Loader()),
               lambda s: {"f1": next(values)}, workdir=None, writer=Writer(), rng=jax.random.key(0), progress=False)
  assert r.best_step == 2


def test_a_non_finite_loss_aborts_naming_the_step(tmp_path):
  loader = Loader()
  with pytest.raises(FloatingPointError, match=r"^step 4: non-finite loss$"):
    loop.run(loop.LoopConfig("toy", 10, 3, "val_loss"), {"w": jnp.zeros(4)}, _job(loader, nan_at=4), _validate,
             workdir=str(tmp_path), writer=Writer(), rng=jax.random.key(0), progress=False)


def test_a_non_finite_validation_aborts_naming_the_step(tmp_path):
  values = iter([1.0, math.nan])
  with pytest.raises(FloatingPointError, match=r"^step 3: non-finite val_loss$"):
    _run(str(tmp_path), validate=lambda s: {"val_loss": next(values)})


def test_early_stop_ends_the_run_and_a_rerun_does_not_continue_it(tmp_path):
  stop = lambda history: history[-1]["step"] >= 4
  cfg = loop.LoopConfig("toy", 10, 2, "val_loss")
  r = loop.run(cfg, {"w": jnp.zeros(4)}, _job(Loader()), _validate, workdir=str(tmp_path), writer=Writer(),
               rng=jax.random.key(0), stop_fn=stop, progress=False)
  assert r.steps_run == 4 and [h["stop"] for h in r.history] == [False, False, True]
  again = loop.run(cfg, {"w": jnp.zeros(4)}, _job(Loader(), interrupt_at=4), _validate, workdir=str(tmp_path),
                   writer=Writer(), rng=jax.random.key(0), stop_fn=stop, progress=False)
  assert again.history == r.history


def test_without_a_workdir_nothing_is_written_and_the_best_state_is_kept(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  values = iter([3.0, 1.0, 2.0])
  seen = []

  def validate(state):
    seen.append(np.asarray(state["w"]))
    return {"val_loss": next(values)}

  r = loop.run(loop.LoopConfig("toy", 4, 2, "val_loss"), {"w": jnp.zeros(4)}, _job(Loader()), validate,
               workdir=None, writer=Writer(), rng=jax.random.key(0), progress=False)
  np.testing.assert_array_equal(r.state["w"], seen[1])
  assert list(tmp_path.iterdir()) == []


def test_tensorboard_tags_follow_one_scheme_and_train_means_cover_log_every():
  writer = Writer()
  loop.run(loop.LoopConfig("toy", 4, 2, "val_loss", log_every=2), {"w": jnp.zeros(4)}, _job(Loader()),
           lambda s: {"val_loss": 1.0, "val_tokens": 7, "nested": {"a": 1.0}, "flag": True}, workdir=None,
           writer=writer, rng=jax.random.key(0), progress=False)
  assert writer.tags() == ["toy/train/grad_norm", "toy/train/loss", "toy/val/loss", "toy/val/tokens"]
  assert [s for s, d in writer.scalars if "toy/train/loss" in d] == [2, 4]


def test_require_trained_fails_on_a_missing_or_empty_directory(tmp_path):
  err = lambda d: RuntimeError(f"nothing in {d}")
  with pytest.raises(RuntimeError, match="nothing in"):
    loop.require_trained(str(tmp_path / "none"), err)
  (tmp_path / "empty").mkdir()
  with pytest.raises(RuntimeError, match="nothing in"):
    loop.require_trained(str(tmp_path / "empty"), err)
  _run(str(tmp_path), steps=2, val_every=2)
  loop.require_trained(str(tmp_path / "toy"), err)


def test_a_bad_loop_config_is_refused():
  with pytest.raises(ValueError, match="best_mode='low'"):
    loop.LoopConfig("toy", 4, 2, "val_loss", best_mode="low")
  with pytest.raises(ValueError, match="val_every=0"):
    loop.LoopConfig("toy", 4, 0, "val_loss")


@pytest.mark.parametrize("history, patience, mode, stop", [
    ([5, 4, 3, 3.1, 3.2], 2, "min", True),  # the best (3) is older than the last 2
    ([5, 4, 3, 3.1, 3.2], 3, "min", False),  # 3 is among the last 3
    ([5, 4], 2, "min", False),  # not more than `patience` validations yet
    ([2, 2, 2, 2, 2], 2, "min", False),  # ties are not worse (the reference's strict <)
    ([0.1, 0.5, 0.4, 0.3], 2, "max", True),
    ([0.1, 0.5, 0.4, 0.6], 2, "max", False),
])
def test_should_stop(history, patience, mode, stop):
  assert loop.should_stop(history, patience, mode) is stop


def test_should_stop_on_a_plateau_after_patience_validations():
  # Improves until validation 3, then wobbles above its best: the stop comes `patience` validations later.
  nll = [5.0, 4.0, 3.5, 3.0, 3.01, 3.2, 3.05, 3.3, 3.1, 3.02]
  for patience in (1, 3, 5):
    first = next(i for i in range(len(nll)) if loop.should_stop(nll[:i + 1], patience, "min"))
    assert first == 3 + patience


def test_a_ctrl_c_that_library_code_absorbed_stops_the_loop_before_its_next_step(tmp_path, monkeypatch):
  # The jobs' SIGINT handler (interrupts._on_sigint) sets the flag as it raises; should the KeyboardInterrupt
  # be caught below the loop, the next step raises it again (after the step-3 checkpoint: a rerun resumes there).
  steps = []
  loader = Loader()
  job = _job(loader)

  def counting(state, carry, step, rng):
    steps.append(step)
    if step == 4:
      monkeypatch.setattr(interrupts, "_requested", True)
    return job(state, carry, step, rng)

  with pytest.raises(KeyboardInterrupt):
    loop.run(loop.LoopConfig("toy", 10, 3, "val_loss"), {"w": jnp.zeros(4)}, counting, _validate,
             workdir=str(tmp_path), writer=Writer(), rng=jax.random.key(0), loader=loader, progress=False)
  assert steps == [0, 1, 2, 3, 4]
  monkeypatch.setattr(interrupts, "_requested", False)
  assert _run(str(tmp_path)).steps_run == 10
