"""The train job end to end on a tiny model: it learns, and a killed run resumes to the same result."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from camels_jax import report, train
from tests import test_metrics
from tests.tiny_config import REPO, tiny_default

_CHILD = """
import sys
sys.path.insert(0, {repo!r})
from tests.tiny_config import tiny_default
from camels_jax import report, train
train.run(tiny_default(), {workdir!r}, progress=False)
"""


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  return workdir, train.run(tiny_default(), workdir, progress=False)


@pytest.fixture(scope="module")
def uninterrupted(full_run):
  return full_run[1]


@pytest.mark.slow  # builds the module's tiny train run (~3 min)
def test_tiny_run_lowers_the_outer_validation_loss(uninterrupted):
  history = uninterrupted["camels"]["history"]
  assert [h["step"] for h in history] == [0, 4, 8]
  assert history[-1]["val_loss"] < history[0]["val_loss"]
  assert uninterrupted["camels"]["best_step"] == 8
  # Weights start at ln2/3 on every token; with the default's fixed mean weight they keep that mean and
  # learn where to put it.
  assert history[0]["val_weight_mean"] == pytest.approx(np.log(2) / 3, rel=1e-5)
  assert history[0]["val_facts_filler"] == pytest.approx(1.0, abs=1e-6)
  assert history[-1]["val_facts_filler"] != pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
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
  before = test_metrics.tensorboard_threads()
  with pytest.raises(FloatingPointError, match=r"step 0: non-finite"):
    train.run(c, str(tmp_path), progress=False)
  assert test_metrics.tensorboard_threads() == before  # the job's TensorBoard writer closed on the way out


@pytest.mark.slow
def test_validation_reports_uptake_against_mean_matched_uniform_and_facts_filler(uninterrupted):
  r = uninterrupted["camels"]
  first, last = r["history"][0], r["history"][-1]
  for h in r["history"]:
    assert h["val_uptake"] == pytest.approx(h["val_qa_before"] - h["val_qa"], abs=1e-5)
    assert h["val_uniform_uptake"] == pytest.approx(h["val_qa_before"] - h["val_uniform_qa"], abs=1e-5)
  # At init every token has the same weight: learned and mean-matched uniform weights are the same step.
  assert first["val_facts_filler"] == pytest.approx(1.0, abs=1e-5)
  assert first["val_uptake"] == pytest.approx(first["val_uniform_uptake"], rel=1e-4)
  assert first["val_qa_before"] == pytest.approx(last["val_qa_before"], rel=1e-6)  # same questions
  compare = r["compare"]
  assert list(compare) == ["learned", "uniform", "ssm", "tfidf", "oracle"]
  for name, m in compare.items():  # every weighting takes the learned weights' step
    assert m["weight_mean"] == pytest.approx(compare["learned"]["weight_mean"], rel=1e-4), name
    assert m["qa_before"] == compare["learned"]["qa_before"]
  assert compare["uniform"]["x_uniform"] == pytest.approx(1.0)
  assert compare["oracle"]["facts_filler"] is None  # no weight at all on the filler
  assert compare["uniform"]["facts_filler"] == pytest.approx(1.0)
  assert "uptake" in report.camels_summary(r) and "learned > SSM" in report.camels_summary(r)
  # The same comparison at 1/2 .. 2 times the learned step (the default's compare_octaves=1), the learned
  # step's entry being `compare` itself.
  by_step = r["compare_by_step"]
  assert list(by_step) == ["0.5", "1", "2"] and by_step["1"] == compare
  for scale, rows in by_step.items():
    assert list(rows) == list(compare)
    assert rows["learned"]["weight_mean"] == pytest.approx(float(scale) * compare["learned"]["weight_mean"], rel=1e-4)
    assert all(m["question_uptake"]["n"] == compare["learned"]["question_uptake"]["n"] for m in rows.values())
  assert "step × 0.5" in report.camels_summary(r) and "step × 0.25" not in report.camels_summary(r)


@pytest.mark.slow
def test_train_writes_the_uptake_against_step_plot(full_run):
  workdir, _ = full_run
  assert os.path.getsize(os.path.join(workdir, train.UPTAKE_PLOT)) > 10_000


@pytest.mark.slow
def test_camels_job_alone_meta_trains_the_qa_tuned_model_of_its_workdir(tmp_path, full_run):
  import shutil
  workdir = str(tmp_path / "camels_only")
  shutil.copytree(os.path.join(full_run[0], "qa_tuned"), os.path.join(workdir, "qa_tuned"))
  c = tiny_default()
  c.jobs, c.camels.steps, c.camels.compare = "camels", 0, ""
  got = train.run(c, workdir, progress=False)["camels"]
  want = full_run[1]["camels"]
  assert got["base_model"] == want["base_model"] == "qa_tuned"
  # The same QA-tuned model, the same meta-val questions: the same NLL before adaptation.
  assert got["history"][0]["val_qa_before"] == pytest.approx(want["history"][0]["val_qa_before"], rel=1e-6)
  raw = train.run(c, str(tmp_path / "raw"), progress=False)["camels"]
  assert raw["base_model"] == "raw"
  assert raw["history"][0]["val_qa_before"] != pytest.approx(got["history"][0]["val_qa_before"], rel=1e-3)


@pytest.mark.slow
def test_a_preconditioned_inner_step_meta_trains_and_compares_with_its_preconditioner(tmp_path, full_run):
  import shutil
  workdir = str(tmp_path / "preconditioned")
  shutil.copytree(os.path.join(full_run[0], "qa_tuned"), os.path.join(workdir, "qa_tuned"))
  c = tiny_default()
  c.jobs, c.camels.steps, c.camels.val_every, c.camels.compare_octaves = "camels", 2, 2, 0
  c.camels.precond_docs, c.camels.inner_lr = 4, 1e-3  # in Adam's units: ~1e-3 per parameter and step
  got = train.run(c, workdir, progress=False)["camels"]
  first, last = got["history"][0], got["history"][-1]
  assert last["step"] == 2 and np.isfinite(last["val_loss"])
  # From the same QA-tuned model the preconditioned step teaches another amount than plain SGD's.
  plain = full_run[1]["camels"]["history"][0]
  assert first["val_qa_before"] == pytest.approx(plain["val_qa_before"], rel=1e-6)
  assert first["val_uptake"] != pytest.approx(plain["val_uptake"], rel=1e-2)
  assert set(got["compare"]) >= {"learned", "uniform"}
