"""bench/fwl_vs_dynamic.py's cross-length pairs and its per-token NLL file (the scoring itself is tested with
dynamic_eval and fwl)."""

import json

import ml_collections
import numpy as np
import pytest

from bench import fwl_vs_dynamic
from camels_jax import stats
from camels_jax.methods import dynamic_eval, dynamic_sweep


def test_dynamic_at_each_length_is_paired_with_static_at_every_longer_one():
  rng = np.random.default_rng(0)
  ctx_nll = {n: (rng.normal(3.0, 1.0, 500), rng.normal(2.5, 1.0, 500)) for n in (512, 64, 128)}
  rows = fwl_vs_dynamic.cross_length_rows(ctx_nll)
  assert [(r["dynamic_context"], r["static_context"]) for r in rows] == [(64, 128), (64, 512), (128, 512)]
  r = rows[1]
  assert r["nll_dynamic_minus_static"] == stats.paired_bootstrap_ci(ctx_nll[64][1], ctx_nll[512][0])
  assert r["dynamic_ppl"] == pytest.approx(np.exp(ctx_nll[64][1].mean()))
  assert r["static_ppl"] == pytest.approx(np.exp(ctx_nll[512][0].mean()))


def test_the_verdict_follows_the_interval(capsys):
  static = np.full(400, 3.0)
  ctx_nll = {64: (static + 1.0, static - 0.5 + np.linspace(-0.1, 0.1, 400)), 512: (static, static)}
  fwl_vs_dynamic.print_cross_length(fwl_vs_dynamic.cross_length_rows(ctx_nll))
  last = capsys.readouterr().out.splitlines()[-1]
  assert last.startswith("| 64 | 512 |") and last.endswith("| yes |")
  ctx_nll[64] = (static, static + np.linspace(-1, 1, 400))  # centred on 0: a tie
  fwl_vs_dynamic.print_cross_length(fwl_vs_dynamic.cross_length_rows(ctx_nll))
  assert capsys.readouterr().out.splitlines()[-1].endswith("| tie |")


def test_nll_file_holds_every_variant_in_order(tmp_path):
  nll = {"static, overlap 512/256": np.arange(5.0), "FWL, windows 512": np.ones(5)}
  path = str(tmp_path / "sub" / "nll.npz")
  fwl_vs_dynamic.write_nll(path, nll)
  with np.load(path) as f:
    assert list(f["names"]) == list(nll)
    np.testing.assert_array_equal(f["nll_VxT"], np.stack(list(nll.values())))
  assert [p.name for p in (tmp_path / "sub").iterdir()] == ["nll.npz"]


def test_nll_file_refuses_variants_of_different_lengths(tmp_path):
  path = tmp_path / "nll.npz"
  with pytest.raises(SystemExit, match="different numbers of tokens"):
    fwl_vs_dynamic.write_nll(str(path), {"a": np.ones(3), "b": np.ones(4)})
  assert not path.exists()


def test_context_selection_is_read_from_a_previous_run(tmp_path):
  path = tmp_path / "bench.json"
  sel = {"optimizer": "adam", "lr": 1e-4, "decay": 0.0}
  path.write_text(json.dumps({"contexts": [{"context": n, "selected": sel, "edge": []} for n in (64, 512)]}))
  got = fwl_vs_dynamic.read_context_selection(str(path), [64, 512])
  assert got == {64: {"selected": sel, "edge": []}, 512: {"selected": sel, "edge": []}}
  # Overlap's own length needs no earlier selection; any other missing length is refused by name.
  assert set(fwl_vs_dynamic.read_context_selection(str(path), [64])) == {64}
  with pytest.raises(SystemExit, match=r"no context rows for lengths \[128\]"):
    fwl_vs_dynamic.read_context_selection(str(path), [64, 128, 512])


def _sweep(workdir, optimizers, scores, window=512, **grid):
  """A perplexity sweep's (result, config) as read_sweep returns them; scores: {(optimizer, lr, decay): val nll}."""
  config = ml_collections.ConfigDict({"workdir": workdir, "text_file": "t.txt", "sweep": dynamic_sweep.sweep_config(),
                                      "dynamic": dynamic_eval.dynamic_config()})
  config.dynamic.window = window
  config.sweep.update(optimizers=optimizers, **grid)
  rows = [{"optimizer": o, "lr": lr, "decay": d, "val_nll": v, "val_ppl": None if v is None else float(np.exp(v))}
          for (o, lr, d), v in scores.items()]
  best = min((r for r in rows if r["val_nll"] is not None), key=lambda r: r["val_nll"])
  result = {"split": {"val_articles": 7}, "sweep": {"val_tokens": 4096, "candidates": rows, "edge": [],
                                                    "selected": {k: best[k] for k in ("optimizer", "lr", "decay")}}}
  return result, config


def test_an_extra_sweep_extends_the_grid_and_can_take_the_win():
  base = _sweep("a", "adam,rms", {("adam", 1e-4, 0.0): 3.07, ("rms", 3e-5, 0.0): 3.13, ("rms", 1e-4, 0.0): 3.43,
                                  ("rms", 3e-4, 0.0): None}, adam_lrs=(1e-4,), rms_lrs=(3e-5, 1e-4, 3e-4),
                rms_decays=(0.0,))
  extra = _sweep("b", "rms", {("rms", 1e-5, 0.0): 3.18, ("rms", 3e-6, 0.0): 3.22, ("rms", 3e-5, 0.0): 3.13},
                 rms_lrs=(3e-6, 1e-5, 3e-5), rms_decays=(0.0,))
  bests = {b["optimizer"]: b for b in dynamic_sweep.optimizer_bests(base[0]["sweep"]["candidates"], base[1].sweep)}
  assert bests["rms"]["edge"]  # 3e-5 is the smallest rms lr of the base grid
  result, config = fwl_vs_dynamic.merge_sweeps(base, {"b": extra})
  assert tuple(config.sweep.rms_lrs) == (3e-6, 1e-5, 3e-5, 1e-4, 3e-4)
  # 3e-5, in both grids, is one row; rows follow the pooled grid.
  assert [(r["optimizer"], r["lr"]) for r in result["sweep"]["candidates"]] == [
      ("adam", 1e-4), ("rms", 3e-6), ("rms", 1e-5), ("rms", 3e-5), ("rms", 1e-4), ("rms", 3e-4)]
  assert result["sweep"]["selected"] == {"optimizer": "adam", "lr": 1e-4, "decay": 0.0}
  bests = {b["optimizer"]: b for b in result["sweep"]["optimizer_bests"]}
  assert bests["rms"]["lr"] == 3e-5 and bests["rms"]["edge"] == []  # now bracketed by 1e-5 and 1e-4
  assert len(base[0]["sweep"]["candidates"]) == 4  # the base is not changed

  winner = _sweep("c", "rms", {("rms", 1e-5, 0.0): 3.0}, rms_lrs=(1e-5,), rms_decays=(0.0,))
  result, _ = fwl_vs_dynamic.merge_sweeps(base, {"c": winner})
  assert result["sweep"]["selected"] == {"optimizer": "rms", "lr": 1e-5, "decay": 0.0}
  assert result["sweep"]["edge"] == ["rms lr 1e-05 is the smallest of [1e-05, 3e-05, 0.0001, 0.0003]"]


def test_sweeps_of_another_setting_are_not_pooled():
  base = _sweep("a", "adam", {("adam", 1e-4, 0.0): 3.07}, adam_lrs=(1e-4,))
  other = _sweep("b", "adam", {("adam", 3e-4, 0.0): 3.0}, window=1024, adam_lrs=(3e-4,))
  with pytest.raises(SystemExit, match="--overlap_extra b: its segmentation"):
    fwl_vs_dynamic.merge_sweeps(base, {"b": other})
  # A field the older run's config lacks counts at its default, and sink placement without sinks is ignored.
  older = _sweep("d", "adam", {("adam", 3e-4, 0.0): 3.0}, adam_lrs=(3e-4,))
  del older[1].dynamic["sink_positions"]
  same = _sweep("e", "adam", {("adam", 1e-3, 0.0): 3.1}, adam_lrs=(1e-3,))
  same[1].dynamic.sink_positions = "absolute"
  result, _ = fwl_vs_dynamic.merge_sweeps(older, {"e": same})
  assert len(result["sweep"]["candidates"]) == 2
