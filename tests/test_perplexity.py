"""The perplexity job: windows, and SmolLM2's perplexity on real text."""

import json

import numpy as np
import pytest

from camels_jax import checks, perplexity
from camels_jax.data import text
from camels_jax.methods import dynamic_sweep
from tests.tiny_config import load_config


def test_windows_cover_the_tokens_once():
  tokens, mask = text.windows(list(range(1, 11)), 4, pad_id=0)
  assert tokens.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
  assert mask.sum() == 10


@pytest.mark.slow
def test_smollm2_perplexity_on_the_first_1024_wikitext_tokens(tmp_path, shared_data):
  config = load_config("ppl_smollm2")
  config.text_file = shared_data("wikitext2_raw_test.txt")
  config.max_tokens = 1024
  result = perplexity.run(config, str(tmp_path), progress=False)
  # An independent numpy forward pass of the same GGUF measured 13.7.
  assert result["ppl"] == pytest.approx(13.7, abs=1.0)
  assert result["tokens"] == 1023
  with open(tmp_path / "perplexity.json") as f:
    assert json.load(f)["ppl"] == result["ppl"]


def _articles(seed: int, n: int, words: int = 120) -> list[str]:
  rng = np.random.default_rng(seed)
  vocab = ["river", "castle", "the", "of", "king", "north", "battle", "song", "was", "in", "a", "city", "and"]
  return [f" = Article {i} = \n\n" + " ".join(rng.choice(vocab, words)) + " ." for i in range(n)]


def _tiny_sweep(text_file: str):
  c = load_config("ppl_smollm2")
  c.model = load_config("fwl_small").model
  c.model.random.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_len=128)
  c.update(method="dynamic", text_file=text_file)
  c.dynamic.update(window=48, stride=24, stat_segments=4)
  c.sweep.update(enabled=True, optimizers="sgd,rms", sgd_lrs=(3e-2, 3e-1), rms_lrs=(1e-3,), rms_decays=(0.0, 0.1),
                 val_fraction=0.2, heldout_fraction=0.2, val_tokens=0)
  return c


def test_the_sweep_never_reads_the_test_articles(tmp_path):
  articles = _articles(0, 10)
  clean, poisoned = tmp_path / "clean.txt", tmp_path / "poisoned.txt"
  clean.write_text("\n".join(articles), encoding="utf-8")
  # The test articles (the last 2) replaced by other text: the selection must not move at all.
  poisoned.write_text("\n".join(articles[:8] + [a.upper() for a in _articles(9, 2, words=300)]), encoding="utf-8")
  a = perplexity.run(_tiny_sweep(str(clean)), str(tmp_path / "a"), progress=False)
  b = perplexity.run(_tiny_sweep(str(poisoned)), str(tmp_path / "b"), progress=False)
  assert a["split"] | {"test_tokens": 0, "test_first_lines": 0} == b["split"] | {"test_tokens": 0,
                                                                                 "test_first_lines": 0}
  assert a["split"]["train_articles"] == 6 and a["split"]["val_articles"] == 2 and a["split"]["test_articles"] == 2
  assert [r["val_nll"] for r in a["sweep"]["candidates"]] == [r["val_nll"] for r in b["sweep"]["candidates"]]
  assert a["sweep"]["selected"] == b["sweep"]["selected"]
  assert len(a["sweep"]["candidates"]) == 4
  assert [b["optimizer"] for b in a["sweep"]["optimizer_bests"]] == ["sgd", "rms"]
  assert a["static"]["ppl"] != pytest.approx(b["static"]["ppl"], rel=1e-3)  # the test text did change
  d = a["dynamic_minus_static_nll"]
  assert d["lo"] <= d["mean"] <= d["hi"] and d["n"] == a["tokens"] == a["split"]["test_tokens"] - 1
  with open(tmp_path / "a" / "perplexity.json") as f:
    assert json.load(f)["sweep"]["selected"] == a["sweep"]["selected"]


def test_an_edge_pick_is_flagged_and_a_fixed_setting_is_not():
  s = dynamic_sweep.sweep_config()
  assert dynamic_sweep.edges(dynamic_sweep.Candidate("adam", 1e-3), s) == [
      "adam lr 0.001 is the largest of [3e-05, 0.0001, 0.0003, 0.001]"]
  assert dynamic_sweep.edges(dynamic_sweep.Candidate("sgd", 3e-3), s)[0].startswith("sgd lr 0.003 is the smallest")
  assert dynamic_sweep.edges(dynamic_sweep.Candidate("adam", 1e-4), s) == []
  assert dynamic_sweep.edges(dynamic_sweep.Candidate("rms", 1e-4, 1e-2), s) == [
      "rms decay 0.01 is the largest of [0.0, 0.01]"]
  assert dynamic_sweep.edges(dynamic_sweep.Candidate("rms", 1e-4, 0.0), s) == []
  s.update(adam_lrs=(1e-3,))
  assert dynamic_sweep.edges(dynamic_sweep.Candidate("adam", 1e-3), s) == []
  assert len(dynamic_sweep.candidates(dynamic_sweep.sweep_config())) == 3 + 4 + 4 * 2
  rows = [{"optimizer": "sgd", "lr": lr, "decay": 0.0, "val_nll": nll, "val_ppl": 1.0}
          for lr, nll in ((3e-3, 3.0), (1e-2, 2.0), (3e-2, None))]
  rows += [{"optimizer": "adam", "lr": lr, "decay": 0.0, "val_nll": 2.5 + lr, "val_ppl": 1.0} for lr in (3e-5, 1e-4)]
  s.update(optimizers="sgd,adam,rms", adam_lrs=(3e-5, 1e-4))
  bests = dynamic_sweep.optimizer_bests(rows[:3] + rows[3:5], s)
  assert [(b["optimizer"], b.get("lr"), b["edge"] == []) for b in bests] == [
      ("sgd", 1e-2, True), ("adam", 3e-5, False), ("rms", None, False)]


def test_sweep_settings_that_cannot_work_are_one_clear_error():
  c = load_config("ppl_smollm2")
  c.sweep.enabled = True
  with pytest.raises(checks.ConfigError, match="sweep.enabled=True .* needs method='dynamic'"):
    checks.validate(c, perplexity.RULES, perplexity.CROSS)
  c.update(method="dynamic")
  c.sweep.update(val_fraction=0.5, heldout_fraction=0.5)
  with pytest.raises(checks.ConfigError, match="must be < 1"):
    checks.validate(c, perplexity.RULES, perplexity.CROSS)
  c.sweep.update(enabled=False, val_fraction=0.1, heldout_fraction=0.1)
  c.dynamic.optimizer = "rms"
  with pytest.raises(checks.ConfigError, match="optimizer='rms' needs sweep.enabled=True"):
    checks.validate(c, perplexity.RULES, perplexity.CROSS)


def test_articles_split_three_ways_in_order():
  items = [str(i) for i in range(10)]
  assert text.split_three(items, 0.2, 0.1) == (items[:7], items[7:9], items[9:])
  assert text.split_three(items[:3], 0.5, 0.5) == (["0"], ["1"], ["2"])
  with pytest.raises(checks.UserError, match="at least 3"):
    text.split_three(items[:2], 0.1, 0.1)
