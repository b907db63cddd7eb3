"""bench/common.py's interleaved timing: every variant is timed in every round, rounds rotate the order, and
ratios are taken round by round."""

import pytest

from bench import common


def test_every_fn_runs_once_per_round_in_rotated_order():
  calls = []
  fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
  seconds = common.interleaved_seconds(fns, rounds=4)
  assert calls == list("abc" "bca" "cab" "abc")
  assert {n: len(s) for n, s in seconds.items()} == {"a": 4, "b": 4, "c": 4}
  assert all(t >= 0 for s in seconds.values() for t in s)


def test_ratios_are_taken_within_each_round():
  # A machine that slows down round by round: each round's ratio stays 0.5, a ratio across rounds would not.
  seconds = {"ref": [1.0, 2.0, 4.0], "half": [0.5, 1.0, 2.0], "odd": [1.0, 1.0, 8.0]}
  r = common.round_ratios(seconds, "ref")
  assert r["half"] == {"ratios": [0.5, 0.5, 0.5], "median": 0.5, "lo": 0.5, "hi": 0.5}
  assert r["ref"]["median"] == 1.0
  assert r["odd"]["ratios"] == [1.0, 0.5, 2.0]
  assert (r["odd"]["median"], r["odd"]["lo"], r["odd"]["hi"]) == (1.0, 0.5, 2.0)


def test_an_even_number_of_rounds_takes_the_middle_pair():
  r = common.round_ratios({"ref": [1.0, 1.0], "x": [1.0, 2.0]}, "ref")
  assert r["x"]["median"] == pytest.approx(1.5)
