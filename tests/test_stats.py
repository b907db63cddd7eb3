"""Bootstrap intervals over questions: against a plain percentile computation, coverage of a known mean,
width, pairing, determinism, empty input."""

import json
import math

import numpy as np
import pytest
import scipy.stats

from camels_jax import stats


def _bernoulli(n, p=0.4, seed=1):
  return (np.random.default_rng(seed).random(n) < p).astype(np.float64)


def _percentile(sorted_R, q):
  """The q-quantile of sorted values, interpolating linearly between order statistics (Hyndman-Fan type 7)."""
  h = (len(sorted_R) - 1) * q
  k = math.floor(h)
  upper = sorted_R[min(k + 1, len(sorted_R) - 1)]
  return float(sorted_R[k] + (h - k) * (upper - sorted_R[k]))


def _plain_bootstrap(values_N, n_boot, seed, level, rows):
  """The percentile bootstrap written out: resample indices from default_rng(seed) `rows` resamples at a
  time (the draws stats.py makes), average each resample, take the (1-level)/2 and (1+level)/2 percentiles."""
  rng = np.random.default_rng(seed)
  n = len(values_N)
  means = []
  for start in range(0, n_boot, rows):
    for idx_N in rng.integers(0, n, size=(min(rows, n_boot - start), n)):
      means.append(sum(values_N[i] for i in idx_N) / n)
  means_R = np.sort(np.array(means))
  return _percentile(means_R, (1 - level) / 2), _percentile(means_R, (1 + level) / 2)


@pytest.mark.parametrize("level", [0.95, 0.8, 0.5])
def test_interval_is_the_plain_percentile_bootstrap(level):
  values = np.random.default_rng(5).normal(0.3, 1.0, 60)
  ci = stats.bootstrap_ci(values, n_boot=1500, seed=7, level=level)
  lo, hi = _plain_bootstrap(values, 1500, 7, level, rows=1500)
  assert ci["lo"] == pytest.approx(lo, abs=1e-12) and ci["hi"] == pytest.approx(hi, abs=1e-12)
  assert ci["mean"] == pytest.approx(values.mean(), abs=1e-15) and ci["n"] == 60


def test_blocked_resampling_is_the_plain_percentile_bootstrap(monkeypatch):
  """Many questions are resampled a block of rows at a time; the draws are those of the same blocks."""
  values = np.random.default_rng(6).random(40)
  monkeypatch.setattr(stats, "_BLOCK_ENTRIES", 40 * 7)  # 7 resamples per block, the last block has 3
  ci = stats.bootstrap_ci(values, n_boot=500, seed=2, level=0.9)
  lo, hi = _plain_bootstrap(values, 500, 2, 0.9, rows=7)
  assert ci["lo"] == pytest.approx(lo, abs=1e-12) and ci["hi"] == pytest.approx(hi, abs=1e-12)


def test_paired_interval_resamples_both_methods_with_the_same_questions():
  rng = np.random.default_rng(8)
  a, b = rng.random(70), rng.random(70)
  ci = stats.paired_bootstrap_ci(a, b, n_boot=800, seed=4, level=0.9)
  idx_RxN = np.random.default_rng(4).integers(0, 70, size=(800, 70))
  diffs_R = np.sort(a[idx_RxN].mean(axis=1) - b[idx_RxN].mean(axis=1))
  assert ci["lo"] == pytest.approx(_percentile(diffs_R, 0.05), abs=1e-12)
  assert ci["hi"] == pytest.approx(_percentile(diffs_R, 0.95), abs=1e-12)
  assert ci["mean"] == pytest.approx(a.mean() - b.mean(), abs=1e-15)


@pytest.mark.parametrize("level", [0.95, 0.8])
def test_interval_covers_a_known_mean_at_its_level(level):
  """2,000 samples of 50 normal values: the fraction of intervals holding the true mean is the level's.

  For a normal mean the percentile interval is close to mean +- z * s * sqrt((n-1)/n) / sqrt(n), which covers
  with probability P(|t_{n-1}| < z sqrt((n-1)/n)): 0.942 at 95%, 0.789 at 80% (small samples cover a little
  less than the level). The tolerance is 3.5 binomial standard errors (~0.018 at 95%, ~0.032 at 80%), so an
  interval at the wrong level (90% or 99% for 95%, 75% or 85% for 80%) fails.
  """
  reps, n, mu = 2000, 50, 3.0
  samples_RxN = np.random.default_rng(0).normal(mu, 2.0, size=(reps, n))
  covered = 0
  for i, x in enumerate(samples_RxN):
    ci = stats.bootstrap_ci(x, n_boot=1000, seed=i, level=level)
    covered += ci["lo"] <= mu <= ci["hi"]
  z = scipy.stats.norm.ppf((1 + level) / 2)
  expected = 2 * scipy.stats.t.cdf(z * math.sqrt((n - 1) / n), n - 1) - 1
  assert abs(expected - level) < 0.012
  assert abs(covered / reps - expected) < 3.5 * math.sqrt(expected * (1 - expected) / reps)


def test_interval_contains_the_mean_and_shrinks_with_more_questions():
  small, large = stats.bootstrap_ci(_bernoulli(50)), stats.bootstrap_ci(_bernoulli(800))
  for ci, n in ((small, 50), (large, 800)):
    assert ci["n"] == n and ci["lo"] <= ci["mean"] <= ci["hi"]
    assert 0.0 <= ci["lo"] < ci["hi"] <= 1.0
  assert large["hi"] - large["lo"] < 0.5 * (small["hi"] - small["lo"])  # ~1/sqrt(N): 4x more questions
  # Binomial standard error for p=0.4, N=800 is ~0.017: a 95% interval is ~0.07 wide.
  assert 0.04 < large["hi"] - large["lo"] < 0.10


def test_higher_level_gives_a_wider_interval():
  values = _bernoulli(200)
  narrow, wide = stats.bootstrap_ci(values, level=0.5), stats.bootstrap_ci(values, level=0.99)
  assert wide["lo"] < narrow["lo"] <= narrow["hi"] < wide["hi"]


def test_same_seed_same_result_and_other_seed_differs():
  values = np.random.default_rng(0).random(300)
  assert stats.bootstrap_ci(values, seed=3) == stats.bootstrap_ci(values, seed=3)
  assert stats.bootstrap_ci(values, seed=3) != stats.bootstrap_ci(values, seed=4)
  assert stats.paired_bootstrap_ci(values, values[::-1], seed=3) == stats.paired_bootstrap_ci(
      values, values[::-1], seed=3)


def test_paired_interval_of_a_method_against_itself_is_zero():
  values = np.random.default_rng(0).random(100)
  assert stats.paired_bootstrap_ci(values, values) == {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n": 100}


def test_pairing_removes_shared_question_difficulty():
  rng = np.random.default_rng(0)
  difficulty = rng.random(200)
  a, b = difficulty + 0.05, difficulty + rng.normal(0, 0.01, 200)
  paired = stats.paired_bootstrap_ci(a, b)
  assert 0.0 < paired["lo"] < paired["mean"] < paired["hi"]  # a clear gain, though the scores overlap
  alone = stats.bootstrap_ci(a)
  assert paired["hi"] - paired["lo"] < 0.2 * (alone["hi"] - alone["lo"])
  with pytest.raises(ValueError, match="same questions"):
    stats.paired_bootstrap_ci(a, b[:-1])


def test_empty_or_non_finite_input_gives_none_and_strict_json():
  for ci in (stats.bootstrap_ci([]), stats.paired_bootstrap_ci([], []), stats.bootstrap_ci([0.5, np.nan])):
    assert ci["mean"] is None and ci["lo"] is None and ci["hi"] is None
    json.dumps(ci, allow_nan=False)
  one = stats.bootstrap_ci([0.25])
  assert one == {"mean": 0.25, "lo": 0.25, "hi": 0.25, "n": 1}
  assert all(type(one[k]) is float for k in ("mean", "lo", "hi"))  # not numpy scalars: plain JSON


def test_many_questions_are_resampled_in_blocks():
  values = _bernoulli(5000, seed=2)
  ci = stats.bootstrap_ci(values, n_boot=1000)
  assert ci["lo"] < ci["mean"] < ci["hi"] and ci["n"] == 5000
