"""Uncertainty of per-question scores: percentile bootstrap intervals over questions.

A score such as F1 is a mean over N questions; how much it would move with other questions of the same
kind is what the interval gives. A comparison of two methods on the *same* questions is paired: both are
resampled with the same question indices, which cancels the questions' shared difficulty (a method against
itself gets exactly [0, 0]).

Every function returns {"mean", "lo", "hi", "n"} with plain floats, or None where there is nothing to
estimate (no questions), so the result goes into strict JSON as it is.
"""

import math

import numpy as np

# Resampled index matrices are built in row blocks of at most this many entries (memory stays ~32 MB for
# any number of questions, while the blocks depend only on N, so a seed still fixes the result).
_BLOCK_ENTRIES = 1 << 22


def finite_or_none(x) -> float | None:
  """`x` as a plain float, or None when it is None, NaN or infinite (strict JSON has no NaN)."""
  if x is None:
    return None
  x = float(x)
  return x if math.isfinite(x) else None


def _resampled_means_R(values_N: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
  """Means of `n_boot` resamples (with replacement, size N) of values_N."""
  n = len(values_N)
  rng = np.random.default_rng(seed)
  rows = max(1, _BLOCK_ENTRIES // n)
  means = []
  for start in range(0, n_boot, rows):
    idx_RxN = rng.integers(0, n, size=(min(rows, n_boot - start), n))
    means.append(values_N[idx_RxN].mean(axis=1))
  return np.concatenate(means)


def bootstrap_ci(values_N, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
  """Mean of per-question values and its percentile bootstrap interval over questions.

  Args:
    values_N: one value per question (e.g. each question's F1, 0/1 for EM).
    n_boot: resamples.
    seed: the resampling RNG's seed (same seed and values, same interval).
    level: coverage of the interval (0.95: the 2.5% and 97.5% percentiles of the resampled means).

  Returns:
    {"mean", "lo", "hi", "n"}; mean/lo/hi are None when there are no values (or a value is not finite).
  """
  if n_boot < 1:
    raise ValueError(f"n_boot={n_boot} must be >= 1")
  if not 0.0 < level < 1.0:
    raise ValueError(f"level={level} must be in (0, 1)")
  values_N = np.asarray(values_N, np.float64).reshape(-1)
  n = len(values_N)
  if n == 0 or not np.isfinite(values_N).all():
    return {"mean": None, "lo": None, "hi": None, "n": n}
  means_R = _resampled_means_R(values_N, n_boot, seed)
  tail = (1.0 - level) / 2
  lo, hi = np.quantile(means_R, [tail, 1.0 - tail])
  return {"mean": finite_or_none(values_N.mean()), "lo": finite_or_none(lo), "hi": finite_or_none(hi),
          "n": n}


def paired_bootstrap_ci(a_N, b_N, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
  """mean(a - b) over questions with its paired bootstrap interval.

  Resampling the same question indices for both a and b is resampling the per-question differences, so
  this is `bootstrap_ci(a_N - b_N)`.

  Args:
    a_N, b_N: per-question values of two methods on the same questions, in the same order.
    n_boot, seed, level: as `bootstrap_ci`.

  Returns:
    {"mean", "lo", "hi", "n"} of the difference a - b.
  """
  a_N = np.asarray(a_N, np.float64).reshape(-1)
  b_N = np.asarray(b_N, np.float64).reshape(-1)
  if a_N.shape != b_N.shape:
    raise ValueError(f"paired_bootstrap_ci: {len(a_N)} vs {len(b_N)} values; pairs need the same questions")
  return bootstrap_ci(a_N - b_N, n_boot=n_boot, seed=seed, level=level)
