"""The fwl train job (checkpoints, resume) and FWL scoring in the perplexity job, on a tiny random model."""

import json
import os
import sys
from unittest import mock

import matplotlib.image
import pytest

from bench import fwl_from_scratch
from camels_jax import checks, cli, io_utils, perplexity, train
from camels_jax.methods import fwl
from tests.tiny_config import Killed, kill_job_at, load_config


def tiny_fwl():
  c = load_config("fwl_small")
  c.model.random.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_len=128)
  c.text.generated_docs = 24
  c.fwl.update(seq_len=64, batch_size=2, steps=4, val_every=2, val_windows=2, chunk=16, lr=1e-2, body_lr=1e-2)
  return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("fwl"))
  config = tiny_fwl()
  results = train.run(config, workdir, progress=False)
  io_utils.write_json(os.path.join(workdir, cli.CONFIG_FILE), cli.config_dict(config))  # as cli.session does
  return config, workdir, results


def test_training_lowers_the_held_out_loss_and_validates_on_schedule(trained):
  _, workdir, results = trained
  history = results["fwl"]["history"]
  assert [h["step"] for h in history] == [0, 2, 4]
  assert history[-1]["val_nll"] < history[0]["val_nll"] - 0.1
  image = matplotlib.image.imread(os.path.join(workdir, train.FWL_PLOT))
  assert image.shape[0] > 100 and image[..., :3].std() > 0.01
  f = results["fwl"]
  assert f["test_articles"] == f["val_articles"] == 3 and f["train_articles"] == 18 and f["train_windows"] >= 2


def test_resumed_run_equals_an_uninterrupted_one(trained, tmp_path):
  config, workdir, _ = trained
  longer = tiny_fwl()
  longer.fwl.steps = 6
  resumed = train.run(longer, workdir, progress=False)["fwl"]["history"]
  fresh = train.run(longer, str(tmp_path), progress=False)["fwl"]["history"]
  assert [h["step"] for h in resumed] == [0, 2, 4, 6]
  assert resumed[-1]["val_nll"] == pytest.approx(fresh[-1]["val_nll"], abs=1e-5)


def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_result(trained, tmp_path, monkeypatch):
  _, _, results = trained
  kill_job_at(monkeypatch, "fwl", 3)  # after the step-2 checkpoint
  with pytest.raises(Killed):
    train.run(tiny_fwl(), str(tmp_path), progress=False)
  resumed = train.run(tiny_fwl(), str(tmp_path), progress=False)["fwl"]
  assert [h["step"] for h in resumed["history"]] == [0, 2, 4]
  for a, b in zip(results["fwl"]["history"], resumed["history"]):
    for k in ("val_nll", "train_loss"):
      if k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-6), (a["step"], k)


def test_perplexity_scores_with_the_trained_head(trained, tmp_path):
  config, workdir, results = trained
  ppl = load_config("ppl_smollm2")
  ppl.model = config.model
  ppl.update(method="fwl", fwl_workdir=workdir, generated_docs=2)
  ppl.dynamic.window = 64
  result = perplexity.run(ppl, str(tmp_path), progress=False)
  assert result["method"] == "fwl" and result["tokens"] > 100
  assert 1.0 < result["ppl"] < 1e6 and 1.0 < result["static_same_windows"]["ppl"] < 1e6


def test_perplexity_refuses_a_head_trained_on_another_model(trained, tmp_path):
  _, workdir, _ = trained
  ppl = load_config("ppl_smollm2")
  ppl.update(method="fwl", fwl_workdir=workdir)
  with pytest.raises(Exception, match="trained on another model"):
    perplexity.check_prerequisites(ppl)


def test_perplexity_refuses_a_workdir_without_a_trained_head_before_loading(trained, tmp_path):
  config, workdir, _ = trained
  empty = tmp_path / "no_head"
  empty.mkdir()
  (empty / cli.CONFIG_FILE).write_text(open(os.path.join(workdir, cli.CONFIG_FILE)).read())
  ppl = load_config("ppl_smollm2")
  ppl.model = config.model
  ppl.update(method="fwl", fwl_workdir=str(empty))
  with pytest.raises(Exception, match="no trained FWL head"):
    perplexity.check_prerequisites(ppl)


def test_training_stops_when_the_validation_loss_plateaus(tmp_path):
  config = tiny_fwl()
  config.fwl.update(steps=40, val_every=1, patience=2, lr=0.3)  # a step far too large: validation gets worse
  results = train.run(config, str(tmp_path), progress=False)["fwl"]
  nll = [h["val_nll"] for h in results["history"]]
  assert results["steps_run"] < 40 and len(nll) == results["steps_run"] + 1
  assert min(nll[:-2]) < min(nll[-2:])  # the last 2 validations both failed to beat an earlier one
  assert results["best"]["val_nll"] == min(nll)


def test_the_baseline_trains_the_body_without_the_head(trained, tmp_path):
  """fast_weights=False (the from-scratch comparison): the body learns from its own static loss, the head gets
  no gradient (its step sizes stay where they started), and validation and perplexity score the model without
  its head."""
  config, _, results = trained
  baseline = tiny_fwl()
  baseline.fwl.fast_weights = False
  workdir = str(tmp_path / "baseline")
  r = train.run(baseline, workdir, progress=False)["fwl"]
  io_utils.write_json(os.path.join(workdir, cli.CONFIG_FILE), cli.config_dict(baseline))
  history = r["history"]
  assert r["fast_weights"] is False and [h["step"] for h in history] == [0, 2, 4]
  for h in history:
    assert h["val_ppl"] == pytest.approx(h["val_static_ppl"], rel=1e-9)
    assert all(h[f"eta/{g}"] == pytest.approx(baseline.fwl.step_init, rel=1e-5) for g in fwl.STEP_GROUPS)
  assert history[-1]["val_nll"] < history[0]["val_nll"] - 0.1
  # Same init and data as the FWL run: only the training loss differs, so their first validations agree on the
  # static model and their trained bodies do not.
  fwl_history = results["fwl"]["history"]
  assert history[0]["val_static_ppl"] == pytest.approx(fwl_history[0]["val_static_ppl"], rel=1e-6)
  assert history[-1]["val_static_ppl"] != pytest.approx(fwl_history[-1]["val_static_ppl"], rel=1e-4)
  ppl = load_config("ppl_smollm2")
  ppl.model = config.model
  ppl.update(method="fwl", fwl_workdir=workdir, generated_docs=2)
  ppl.dynamic.window = 64
  result = perplexity.run(ppl, str(tmp_path / "ppl"), progress=False)
  assert result["ppl"] == result["static_same_windows"]["ppl"]
  # The from-scratch bench pairs the two runs on the test articles.
  out = tmp_path / "scratch.json"
  with mock.patch.object(sys, "argv", ["fwl_from_scratch", "--fwl", trained[1], "--baseline", workdir,
                                       "--json", str(out)]):
    fwl_from_scratch.main()
  rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
  assert rows["trained without FWL"]["nll_minus_baseline"] is None
  for name in ("FWL (trained with the head)", "its body without the head"):
    assert rows[name]["nll_minus_baseline"]["n"] > 100 and 1.0 < rows[name]["ppl"] < 1e6


def test_a_baseline_with_a_frozen_body_is_a_config_error():
  c = tiny_fwl()
  c.fwl.update(fast_weights=False, train_body=False)
  found = checks.violations(c.fwl, fwl.RULES, fwl.CROSS)
  assert len(found) == 1 and "train_body" in found[0], found
