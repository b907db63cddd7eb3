"""Pictures: F1-vs-documents curves with intervals (coinciding curves, missing intervals), heatmap PNGs."""

import matplotlib.image
import numpy as np
import pytest

from camels_jax import plots


def _curve(f1s, lo=-0.1, hi=0.1, vs=None):
  points = []
  for k, f1 in enumerate(f1s):
    p = {"docs": 2 * (k + 1), "f1": f1, "lo": None if lo is None else f1 + lo,
         "hi": None if hi is None else f1 + hi}
    if vs is not None:
      p["vs_uniform"] = vs
    points.append(p)
  return points


def _read(path):
  image = matplotlib.image.imread(str(path))
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  assert image[..., :3].std() > 0.01  # not blank
  return image


def test_coinciding_curves_are_drawn_with_a_second_panel(tmp_path):
  same = [0.2, 0.3, 0.3, 0.35]
  zero = {"mean": 0.0, "lo": -0.05, "hi": 0.05, "n": 12}
  results = {"methods": {
      "uniform": {"lr": 1e-4, "curve": _curve(same)},
      "ssm": {"lr": 1e-4, "curve": _curve(same, vs=zero)},
      "tfidf": {"lr": 2.5e-5, "curve": _curve(same, vs=zero)},
      "camels": {"lr": 1e-4, "curve": _curve(same, vs=zero)},
  }}
  path = tmp_path / "out" / "f1_curve.png"
  plots.plot_curves(str(path), results)
  wide = _read(path)
  assert sorted(p.name for p in path.parent.iterdir()) == ["f1_curve.png"]  # no temporary files left
  for r in results["methods"].values():
    for p in r["curve"]:
      p.pop("vs_uniform", None)
  plots.plot_curves(str(path), results)
  assert _read(path).shape[1] < wide.shape[1]  # one panel without comparisons


def test_curves_with_missing_intervals_and_points(tmp_path):
  results = {"methods": {
      "uniform": {"lr": 1e-4, "curve": _curve([0.1, 0.2], lo=None, hi=None)},
      "camels": {"lr": None, "curve": [{"docs": 2, "f1": None, "lo": None, "hi": None},
                                      {"docs": 4, "f1": 0.25, "lo": 0.3, "hi": 0.4,  # beside its mean
                                       "vs_uniform": {"mean": None, "lo": None, "hi": None, "n": 0}}]},
      "ssm": {"lr": 1e-4, "curve": []},  # no points: left out
  }}
  path = tmp_path / "f1.png"
  plots.plot_curves(str(path), results)
  _read(path)
  plots.plot_curves(str(path), {"methods": {}})  # nothing to draw is still a picture (axes only)
  assert path.exists()


def test_method_points_are_shifted_apart_within_half_a_gap():
  shifts = plots._shifts(4, [2, 4, 6, 8])
  assert np.allclose(shifts, -shifts[::-1]) and len(set(shifts.round(9))) == 4
  assert shifts.max() - shifts.min() < 1.0  # half the gap of 2 documents
  assert plots._shifts(1, [3]).tolist() == [0.0]


def test_point_and_error():
  assert plots._point_and_error(0.5, 0.4, 0.7) == pytest.approx((0.5, 0.1, 0.2))
  y, below, above = plots._point_and_error(0.5, None, 0.7)
  assert y == 0.5 and np.isnan(below) and np.isnan(above)
  assert np.isnan(plots._point_and_error(None, None, None)[0])
  assert plots._point_and_error(0.2, 0.3, 0.4)[1] == 0.0  # never a negative bar


def test_heatmap_png_of_uniform_and_empty_documents(tmp_path):
  docs = [(["Hello", " world", "\n", "again"], np.ones(4)), ([], np.zeros(0)), (["x"], np.zeros(3))]
  path = tmp_path / "w.png"
  plots.heatmap_png(str(path), docs, ["uniform", "empty", "zeros"], width=20)
  _read(path)


def test_context_length_plot_with_and_without_intervals(tmp_path):
  rows = [{"context": n, "static": {"ppl": 30.0 / k, "seconds": 10.0 * k},
           "dynamic": {"ppl": 25.0 / k, "seconds": 25.0 * k, "ppl_lo": 24.0 / k if k > 1 else None,
                       "ppl_hi": 26.0 / k if k > 1 else None}}
          for k, n in enumerate((64, 128, 256, 512, 1024), start=1)]
  path = tmp_path / "context_length.png"
  plots.plot_context_length(str(path), rows)
  _read(path)


def test_bank_size_plot(tmp_path):
  rows = [{"method": m, "bank_docs": n, "test": {"nll": 2.6 + 0.01 * k, "f1": 0.1,
                                                  "ci": {"f1": {"lo": 0.05, "hi": 0.15}} if k else {}}}
          for m in ("mac", "retrieval") for k, n in enumerate((3, 103, 303))]
  path = tmp_path / "bank.png"
  plots.plot_bank_size(str(path), rows)
  _read(path)
