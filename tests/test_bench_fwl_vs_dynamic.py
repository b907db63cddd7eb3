"""bench/fwl_vs_dynamic.py's cross-length pairs and its per-token NLL file (the scoring itself is tested with
dynamic_eval and fwl)."""

import json

import numpy as np
import pytest

from bench import fwl_vs_dynamic
from camels_jax import stats


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
