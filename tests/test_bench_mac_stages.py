"""bench/mac_stages.py: how far documents lie apart at each stage of MAC's path to the prefix."""

import jax
import numpy as np
import pytest

from bench import mac_stages
from camels_jax.methods import mac
from tests.methods.test_mac import _base, _config, _docs, _randomized


def test_spread_is_zero_for_identical_rows_and_relative_to_the_mean():
  assert mac_stages.spread(np.ones((3, 4))) == 0.0
  assert mac_stages.spread(np.array([[1.0, 0.0], [3.0, 0.0]])) == pytest.approx(0.5)
  assert np.isnan(mac_stages.spread(np.zeros((2, 3))))


def test_stages_see_documents_differ_and_the_untrained_prefix_values_are_all_zero():
  base = _base()
  graphdef, params = mac.build(_config(), base)
  tokens, mask = _docs(5)
  untrained = mac_stages.stages(graphdef, params, tokens, mask)
  assert np.isnan(untrained["prefix values"])  # zero-initialised: no prefix at all, for every document
  assert all(untrained[k] > 0.01 for k in ("encoder features, one token", "modulation tokens", "prefix keys"))
  assert 0.0 < untrained["amortizer attention entropy / ln(tokens)"] <= 1.0 + 1e-6
  randomized = mac_stages.stages(graphdef, _randomized(params), tokens, mask)
  assert randomized["prefix values"] > 0.01
  # The same document five times: nothing differs at any stage.
  same = mac_stages.stages(graphdef, _randomized(params), jax.numpy.repeat(tokens[:1], 5, 0),
                           jax.numpy.repeat(mask[:1], 5, 0))
  assert all(v == pytest.approx(0.0, abs=1e-6) for k, v in same.items() if "entropy" not in k)
