"""The mac train job on a tiny random model: validation on schedule, checkpoints, an exact resume."""

import os

import numpy as np
import pytest

from camels_jax import report, train
from tests.tiny_config import Killed, kill_job_at, tiny_default

# Every test trains or resumes the tiny mac job (~3.5 min for the file on 2 cores).
pytestmark = pytest.mark.slow


def _meta_val(workdir):
  from camels_jax import data  # pylint: disable=g-import-not-at-top
  from camels_jax.models import loading
  c = tiny_mac()
  return data.load(c.data, loading.load(c.model).tokenizer, workdir).splits["meta_val"]


def tiny_mac(steps=4):
  c = tiny_default()
  c.jobs = "qa_tune,mac"
  c.mac.update(steps=steps, val_every=2)
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mac"))
  return workdir, train.run(tiny_mac(), workdir, progress=False)


def test_validates_on_schedule_against_another_bank_and_the_base_model(trained):
  workdir, results = trained
  r = results["mac"]
  assert [h["step"] for h in r["history"]] == [0, 2, 4] and r["base_model"] == "qa_tuned"
  first = r["history"][0]
  # Untrained, MAC is exactly the base model, whatever the bank.
  assert first["val_nll"] == pytest.approx(first["val_nll_base"], abs=1e-6)
  assert first["val_nll_other_bank"] == pytest.approx(first["val_nll_base"], abs=1e-6)
  assert r["best"]["val_nll"] == min(h["val_nll"] for h in r["history"])
  assert r["bank_bytes_per_doc"] == 4 * 2 * 32 and r["params"] > 0
  # The best networks per meta-val question: own bank against another bank and none, paired.
  vb = r["val_by_question"]
  assert vb["questions"] == sum(len(d.qas) for d in _meta_val(workdir)) and vb["own_minus_base"]["n"] == vb["questions"]
  assert vb["own_minus_other_bank"]["mean"] == pytest.approx(vb["nll"] - vb["nll_other_bank"])
  assert vb["own_minus_base"]["mean"] == pytest.approx(vb["nll"] - vb["nll_base"])
  assert vb["own_minus_base"]["lo"] <= vb["own_minus_base"]["mean"] <= vb["own_minus_base"]["hi"]
  assert "own bank - other bank" in report.mac_summary(r)
  assert os.path.isdir(os.path.join(workdir, "mac"))
  assert r["train_docs"] == tiny_mac().data.split_sizes.meta_train  # mac.train_docs = 0: the split


def test_trains_on_more_generated_documents_than_the_meta_train_split(tmp_path):
  c = tiny_mac(steps=2)
  c.mac.train_docs = 3 * c.data.split_sizes.meta_train
  c.mac.val_docs = 2  # validates on the first 2 meta-val documents only
  r = train.run(c, str(tmp_path), progress=False)["mac"]
  assert r["train_docs"] == c.mac.train_docs and [h["step"] for h in r["history"]] == [0, 2]
  first_two = _meta_val(str(tmp_path))[:2]
  assert len(_meta_val(str(tmp_path))) > 2 and r["val_docs"] == 2
  assert r["val_by_question"]["questions"] == sum(len(d.qas) for d in first_two)


def test_resumed_run_equals_an_uninterrupted_one(trained, tmp_path):
  workdir, _ = trained
  resumed = train.run(tiny_mac(steps=6), workdir, progress=False)["mac"]["history"]
  fresh = train.run(tiny_mac(steps=6), str(tmp_path), progress=False)["mac"]["history"]
  assert [h["step"] for h in resumed] == [0, 2, 4, 6]
  assert resumed[-1]["val_nll"] == pytest.approx(fresh[-1]["val_nll"], abs=1e-5)
  assert resumed[-1]["val_nll_other_bank"] == pytest.approx(fresh[-1]["val_nll_other_bank"], abs=1e-5)


def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_result(trained, tmp_path, monkeypatch):
  _, results = trained
  workdir = str(tmp_path)
  kill_job_at(monkeypatch, "mac", 3)  # after the step-2 checkpoint
  with pytest.raises(Killed):
    train.run(tiny_mac(), workdir, progress=False)
  assert not os.path.exists(os.path.join(workdir, "train_results.json"))
  resumed = train.run(tiny_mac(), workdir, progress=False)["mac"]
  want = results["mac"]
  assert [h["step"] for h in resumed["history"]] == [0, 2, 4]
  for a, b in zip(want["history"], resumed["history"]):
    for k in ("val_nll", "val_nll_other_bank", "train_loss"):
      if k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-6), (a["step"], k)
  assert resumed["best_step"] == want["best_step"]


def test_the_contrastive_term_enters_the_jobs_loss(trained, tmp_path):
  _, results = trained
  c = tiny_mac(steps=2)
  c.mac.contrast = 1.0
  got = train.run(c, str(tmp_path), progress=False)["mac"]["history"]
  want = results["mac"]["history"]
  assert got[0]["val_nll"] == pytest.approx(want[0]["val_nll"], abs=1e-6)  # the same untrained networks
  # Untrained, the prefix ignores the bank (zero values): every own document is worth 0 nats, so the first
  # step's hinge is the whole margin, 0.5, and the loss over the first steps is about that much higher.
  assert 0.3 < got[1]["train_loss"] - want[1]["train_loss"] < 0.7


def test_retrieval_steps_come_first_and_leave_the_base_model_exact(trained, tmp_path):
  _, results = trained
  c = tiny_mac(steps=4)
  c.mac.update(retrieve_steps=2, retrieve_lr=1e-2)
  history = train.run(c, str(tmp_path), progress=False)["mac"]["history"]
  assert [h["step"] for h in history] == [0, 2, 4]
  # Steps 1-2 train the retrieval term alone: its InfoNCE over 8-document banks, and MAC still the base model.
  assert history[1]["train_loss"] == pytest.approx(np.log(tiny_mac().mac.bank_docs), abs=0.5)
  assert history[1]["val_nll"] == pytest.approx(history[1]["val_nll_base"], abs=1e-6)
  assert 0.0 <= history[1]["val_retrieval_acc"] <= 1.0
  # Steps 3-4 are the paper's loss, from the moved networks: the answer NLL moves off the base model.
  assert history[2]["val_nll"] != pytest.approx(history[2]["val_nll_base"], abs=1e-6)
  assert history[0]["val_nll"] == pytest.approx(results["mac"]["history"][0]["val_nll"], abs=1e-6)


def test_the_reconstruction_term_enters_the_jobs_loss_and_validation(trained, tmp_path):
  _, results = trained
  c = tiny_mac(steps=2)
  c.mac.reconstruct = 1.0
  r = train.run(c, str(tmp_path), progress=False)["mac"]
  got, want = r["history"], results["mac"]["history"]
  assert got[0]["val_nll"] == pytest.approx(want[0]["val_nll"], abs=1e-6)  # the same untrained networks
  # Untrained (zero values), a document's own tokens and another's give the same prefix: none.
  assert got[0]["val_doc_nll"] == pytest.approx(got[0]["val_doc_nll_other"], abs=1e-6)
  # The loss adds each back-propagated document's NLL per token, about the random model's ln V.
  assert got[1]["train_loss"] - want[1]["train_loss"] > 0.5 * np.log(c.model.random.vocab_size)
  # Per meta-val document (each paired with the next bank's document in its slot), own against other.
  docs = r["val_by_question"]["documents"]
  assert docs["docs"] == len(_meta_val(str(tmp_path)))
  assert docs["own_minus_other"]["mean"] == pytest.approx(docs["doc_nll"] - docs["doc_nll_other"])
  assert "documents" not in results["mac"]["val_by_question"]
