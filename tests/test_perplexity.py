"""The perplexity job: windows, and SmolLM2's perplexity on real text."""

import json

import pytest

from camels_jax import perplexity
from camels_jax.data import text
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
