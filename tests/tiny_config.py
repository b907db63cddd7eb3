"""Loading the shipped job configs in tests (configs/tiny.py is what most tests run)."""

import os

from camels_jax import config_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str):
  return config_files.load(os.path.join(REPO, "configs", f"{name}.py"))


def tiny_default():
  """configs/tiny.py: the default job on a tiny random model."""
  return load_config("tiny")


class Killed(BaseException):
  """Stands for a SIGKILL in the middle of a job (a BaseException, so no job code catches it)."""


def kill_job_at(monkeypatch, job: str, step: int):
  """The next `loop.run` of `job` dies before its step `step` (0-based), as a killed process would: whatever
  it checkpointed stays, nothing after it is written. Later runs are untouched."""
  from camels_jax import loop  # pylint: disable=g-import-not-at-top

  run = loop.run
  armed = [True]

  def dying_run(cfg, state, step_fn, *args, **kw):
    if cfg.job != job or not armed[0]:
      return run(cfg, state, step_fn, *args, **kw)
    armed[0] = False

    def step_or_die(state, carry, i, rng):
      if i == step:
        raise Killed(f"{job} killed before step {step}")
      return step_fn(state, carry, i, rng)
    return run(cfg, state, step_or_die, *args, **kw)

  monkeypatch.setattr(loop, "run", dying_run)
