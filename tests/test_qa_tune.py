"""QA tuning: the early-stopping rule, the jitted step, the loop (validation, best params, resume)."""

import inspect

import jax
import ml_collections
import numpy as np
import pytest

from camels_jax import data, qa_tune
from camels_jax.models import loading


class RecordingWriter:
  """A MetricWriter stand-in that keeps every write_scalars call."""

  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, {k: float(v) for k, v in scalars.items()}))

  def steps(self, key):
    return [s for s, d in self.scalars if key in d]


# ------------------------------------------------------------------------------------------------
# The stopping rule (pure).


def test_stop_rule_falls_back_to_nll_when_a_max_metric_never_changes():
  flat = [dict(f1=0.0, nll=n) for n in (3.0, 2.0, 2.5, 2.6)]
  assert qa_tune.stop_rule(flat, "f1", 2)  # nll: 2.0 earlier beats 2.5, 2.6
  improving = [dict(f1=0.0, nll=n) for n in (3.0, 2.0, 1.5, 1.4)]
  assert not qa_tune.stop_rule(improving, "f1", 2)
  assert qa_tune.stop_rule([dict(f1=f, nll=0.0) for f in (0.1, 0.5, 0.4, 0.3)], "f1", 2)


def test_config_fields_are_commented_and_checked():
  source = inspect.getsource(qa_tune.qa_tune_config)
  config = qa_tune.qa_tune_config()
  for name in config:
    line = next(l for l in source.splitlines() if l.strip().startswith(f"c.{name} ="))
    assert "#" in line, name
  assert config.lr == 2.5e-5 and config.optimizer == "adam" and config.grad_clip == 100
  config.stop_metric = "f1"
  with pytest.raises(ValueError, match="needs qa_tune.val_decoding"):
    qa_tune._check(config)
  config.stop_metric = "bleu"
  with pytest.raises(ValueError, match="stop_metric='bleu'"):
    qa_tune._check(config)


# ------------------------------------------------------------------------------------------------
# A tiny random model on a small generated dataset.


@pytest.fixture(scope="module")
def tiny():
  return loading.load(loading.model_config("random", tokenizer="gpt2", vocab_size=50304, d_model=32,
                                           n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=128))


def _small_data(tok, workdir, qa_train=8, qa_val=4, qa_batch_size=4, qa_len=32):
  config = data.get_data_config()
  config.split_sizes.update(qa_train=qa_train, qa_val=qa_val, meta_train=1, meta_val=1, test=1)
  config.generated.loc_docs = 1
  config.update(qa_batch_size=qa_batch_size, qa_len=qa_len, max_answer_len=16)
  return data.load(config, tok, str(workdir))


@pytest.fixture(scope="module")
def small(tiny, tmp_path_factory):
  return _small_data(tiny.tokenizer, tmp_path_factory.mktemp("qa_tune"))


def _config(**kw):
  config = qa_tune.qa_tune_config()
  config.update(dict(lr=3e-3, max_steps=30, val_every=10, log_every=5, patience=100) | kw)
  return config


def _trees_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_train_step_accumulation_averages_micro_batch_gradients(tiny, small):
  opt = qa_tune.make_optimizer(_config(optimizer="sgd", lr=0.1, grad_clip=0.0))
  loader = small.qa_loader()
  b1, b2 = next(loader), next(loader)
  keys = qa_tune._TRAIN_KEYS
  state = opt.init(tiny.params)
  p1, _, m1 = qa_tune.train_step(tiny.graphdef, opt, tiny.params, state, {k: b1[k] for k in keys})
  p2, _, m2 = qa_tune.train_step(tiny.graphdef, opt, tiny.params, state, {k: b2[k] for k in keys})
  p12, _, m12 = qa_tune.train_step(tiny.graphdef, opt, tiny.params, state, qa_tune.stack([b1, b2]))
  # SGD is linear in the gradient: the accumulated update is the mean of the two single updates.
  want = jax.tree.map(lambda a, b: (a + b) / 2, p1, p2)
  for x, y in zip(jax.tree.leaves(p12), jax.tree.leaves(want)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  assert float(m12["loss"]) == pytest.approx((float(m1["loss"]) + float(m2["loss"])) / 2, rel=1e-5)
  assert float(m1["grad_norm"]) > 0


def test_qa_tuning_lowers_val_nll_and_returns_the_best_params(tiny, small):
  before = [np.array(x) for x in jax.tree.leaves(tiny.params)]
  writer = RecordingWriter()
  best, history = qa_tune.qa_tune(tiny, small, _config(), writer, progress=False)
  nll = [h["nll"] for h in history]
  assert [h["step"] for h in history] == [0, 10, 20, 30]
  assert nll[-1] < nll[0] - 0.5, nll
  assert history[int(np.argmin(nll))]["is_best"]
  again = qa_tune.validate(tiny, small, _config(), best)
  assert again["nll"] == pytest.approx(min(nll), rel=1e-6)
  assert writer.steps("qa_tune/val/nll") == [0, 10, 20, 30]
  assert writer.steps("qa_tune/train/loss") == [5, 10, 15, 20, 25, 30]
  assert "qa_tune/val/f1" not in dict(writer.scalars)[0]  # no decoding: no F1 scalar
  assert _trees_equal(tiny.params, before)  # the input params are not modified (nor donated)


def test_early_stopping_on_a_plateau_keeps_the_best_params(tiny, small, monkeypatch):
  # Scripted validation NLLs: the best is at the 3rd validation (step 4); patience 2 stops at step 8.
  scripted = iter([5.0, 4.0, 3.0, 3.2, 3.1, 2.0])
  seen = {}

  def fake_validate(model, data_, config, params, progress=False):
    seen[2 * len(seen)] = params
    return dict(nll=next(scripted), em=float("nan"), prefix_em=float("nan"), f1=float("nan"), n=1, tokens=1)

  monkeypatch.setattr(qa_tune, "validate", fake_validate)
  best, history = qa_tune.qa_tune(tiny, small, _config(val_every=2, patience=2), RecordingWriter(),
                                  progress=False)
  assert [h["step"] for h in history] == [0, 2, 4, 6, 8]
  assert [h["stop"] for h in history] == [False] * 4 + [True]
  assert [h["is_best"] for h in history] == [True, True, True, False, False]
  assert best is seen[4] and not _trees_equal(best, seen[8])


def test_a_qa_tuning_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tiny, small, tmp_path,
                                                                                  monkeypatch):
  config = _config(max_steps=12, val_every=4)
  full_best, full_history = qa_tune.qa_tune(tiny, small, config, RecordingWriter(), progress=False,
                                            workdir=str(tmp_path / "whole"))
  step = qa_tune.train_step
  calls = []

  def dies_at_step_6(*args):
    calls.append(1)
    if len(calls) == 7:  # the 7th update: after the step-4 checkpoint, before the step-8 one
      raise KeyboardInterrupt
    return step(*args)

  monkeypatch.setattr(qa_tune, "train_step", dies_at_step_6)
  with pytest.raises(KeyboardInterrupt):
    qa_tune.qa_tune(tiny, small, config, RecordingWriter(), progress=False, workdir=str(tmp_path / "killed"))
  monkeypatch.setattr(qa_tune, "train_step", step)
  writer = RecordingWriter()
  best, history = qa_tune.qa_tune(tiny, small, config, writer, progress=False, workdir=str(tmp_path / "killed"))
  assert writer.steps("qa_tune/val/nll") == [8, 12]  # step 4 is not validated again
  assert [h["step"] for h in history] == [0, 4, 8, 12]
  for a, b in zip(history, full_history):
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-6) and a["is_best"] == b["is_best"]
  for x, y in zip(jax.tree.leaves(best), jax.tree.leaves(full_best)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_tuned_params_trains_once_then_loads(tiny, small, tmp_path):
  config = ml_collections.ConfigDict({"qa_tune": _config(max_steps=4, val_every=2), "mesh": {"fsdp": 1}})
  said = []
  params, history = qa_tune.tuned_params(config, tiny, small, str(tmp_path), RecordingWriter(), progress=False,
                                         say=said.append)
  again, history_again = qa_tune.tuned_params(config, tiny, small, str(tmp_path), RecordingWriter(),
                                              progress=False, say=said.append)
  assert "QA-tuning" in said[0] and "loaded" in said[1]
  assert [(h["step"], h["nll"]) for h in history_again] == [(h["step"], h["nll"]) for h in history]
  assert _trees_equal(again, params)
  assert not _trees_equal(params, tiny.params)


def test_f1_stopping_with_greedy_validation(tiny, small):
  config = _config(max_steps=4, val_every=2, stop_metric="f1", val_decoding="greedy", max_new_tokens=4)
  writer = RecordingWriter()
  _, history = qa_tune.qa_tune(tiny, small, config, writer, progress=False)
  assert [h["step"] for h in history] == [0, 2, 4]
  assert all(0.0 <= h[k] <= 1.0 for h in history for k in ("f1", "em", "prefix_em"))
  assert history[0]["n"] == len(data.pipeline.questions(small.splits["qa_val"]))
  assert writer.steps("qa_tune/val/f1") == [0, 2, 4]


# ------------------------------------------------------------------------------------------------
# SmolLM2.


@pytest.mark.slow
def test_qa_tuning_smollm2_lowers_val_nll(tmp_path):
  # About 45 s on 2 idle cores: 13 s loading the GGUF, ~15 s compiling, 4 updates of 4 x 32 tokens.
  model = loading.load(loading.model_config("smollm2"))
  small_data = _small_data(model.tokenizer, tmp_path, qa_train=4, qa_val=2, qa_batch_size=4, qa_len=32)
  config = qa_tune.qa_tune_config()
  config.update(max_steps=4, val_every=4, log_every=1)  # the reference lr, 2.5e-5
  best, history = qa_tune.qa_tune(model, small_data, config, RecordingWriter(), progress=False)
  assert [h["step"] for h in history] == [0, 4]
  assert history[1]["nll"] < history[0]["nll"] - 1.0, history  # measured: 7.48 -> 4.93
  assert history[1]["is_best"]
