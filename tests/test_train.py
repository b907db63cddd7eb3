"""The train job end to end on a tiny model: it learns, and a killed run resumes to the same result."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from camels_jax import train
from tests.tiny_config import REPO, tiny_default

_CHILD = """
import sys
sys.path.insert(0, {repo!r})
from tests.tiny_config import tiny_default
from camels_jax import train
train.run(tiny_default(), {workdir!r}, progress=False)
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  return train.run(tiny_default(), str(tmp_path_factory.mktemp("full")), progress=False)


def test_tiny_run_lowers_the_outer_validation_loss(uninterrupted):
  history = uninterrupted["camels"]["history"]
  assert [h["step"] for h in history] == [0, 4, 8]
  assert history[-1]["val_loss"] < history[0]["val_loss"]
  assert uninterrupted["camels"]["best_step"] == 8
  # Weights start at ln2/3 and move.
  assert history[0]["val_weight_mean"] == pytest.approx(np.log(2) / 3, rel=1e-5)
  assert history[-1]["val_weight_mean"] != pytest.approx(history[0]["val_weight_mean"], rel=1e-4)


def test_killed_run_resumes_to_the_same_final_metrics(tmp_path, uninterrupted):
  workdir = str(tmp_path / "killed")
  child = subprocess.Popen([sys.executable, "-c", _CHILD.format(repo=REPO, workdir=workdir)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  # Kill it once the step-4 checkpoint is committed, i.e. in the middle of steps 5-8.
  marker = os.path.join(workdir, "camels", "4", "_CHECKPOINT_METADATA")
  deadline = time.time() + 600
  while not os.path.exists(marker) and child.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert child.poll() is None, "the job finished before it could be killed"
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert not os.path.exists(os.path.join(workdir, "train_results.json"))

  resumed = train.run(tiny_default(), workdir, progress=False)
  want, got = uninterrupted["camels"], resumed["camels"]
  assert [h["step"] for h in got["history"]] == [0, 4, 8]
  for a, b in zip(want["history"], got["history"]):
    assert a.keys() == b.keys()
    for k in a:
      assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), (a["step"], k)
  assert got["best_step"] == want["best_step"]


def test_non_finite_meta_loss_aborts_naming_the_step(tmp_path):
  c = tiny_default()
  c.jobs = "camels"
  c.camels.inner_lr = 1e30  # the first inner step overflows
  with pytest.raises(FloatingPointError, match=r"step 0: non-finite"):
    train.run(c, str(tmp_path), progress=False)
