"""Bootstrap intervals over questions: coverage of the mean, width, pairing, determinism, empty input."""

import json

import numpy as np
import pytest

from camels_jax import stats


def _bernoulli(n, p=0.4, seed=1):
  return (np.random.default_rng(seed).random(n) < p).astype(np.float64)


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
