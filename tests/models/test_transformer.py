"""The block scan, and model options that must not change the numbers: block remat, the KV cache."""

import jax
import numpy as np
import pytest

from camels_jax.adapt import loss
from camels_jax.models import transformer
from camels_jax.models.config import REMAT_POLICIES, ModelConfig

CFG = ModelConfig(arch="llama", vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                  max_len=32, tie_embeddings=False)


def _grads(cfg, params, tokens):
  graphdef, _ = transformer.abstract(cfg)

  def f(p):
    return loss.token_nll(transformer.apply(graphdef, p, tokens), tokens).sum()
  return jax.jit(jax.grad(f))(params), graphdef


@pytest.mark.parametrize("policy", REMAT_POLICIES)
def test_block_remat_gives_the_same_gradients_and_is_really_rematerialised(policy):
  _, params = transformer.init(CFG)
  tokens = np.arange(24).reshape(2, 12) % 50
  plain, _ = _grads(CFG, params, tokens)
  remat, graphdef = _grads(CFG.replace(remat=True, remat_policy=policy), params, tokens)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)  # float32; remat refuses some fusions
  jaxpr = str(jax.make_jaxpr(lambda p: transformer.apply(graphdef, p, tokens).sum())(params))
  assert "remat" in jaxpr or "checkpoint" in jaxpr


def _residual_bytes(cfg, params, tokens) -> int:
  """Compiled temporaries of a gradient: what the forward pass keeps for the backward pass, mostly."""
  graphdef, _ = transformer.abstract(cfg)
  f = lambda p: loss.token_nll(transformer.apply(graphdef, p, tokens), tokens).sum()
  return jax.jit(jax.grad(f)).lower(params).compile().memory_analysis().temp_size_in_bytes


def test_remat_policies_keep_less_the_less_they_save():
  # Long enough that the attention matrices (recomputed by the no-batch-dims policy) are the bulk.
  cfg = CFG.replace(n_layers=4, max_len=256)
  _, params = transformer.init(cfg)
  tokens = np.arange(2 * 256).reshape(2, 256) % 50
  kept = {p: _residual_bytes(cfg.replace(remat=True, remat_policy=p), params, tokens) for p in REMAT_POLICIES}
  kept["none"] = _residual_bytes(cfg, params, tokens)
  assert (kept["nothing_saveable"] < kept["dots_with_no_batch_dims_saveable"] < kept["dots_saveable"]
          <= kept["none"]), kept


def test_an_unknown_remat_policy_is_refused():
  with pytest.raises(ValueError, match="remat_policy"):
    CFG.replace(remat=True, remat_policy="everything_saveable")


def _dot_count(n_layers: int) -> int:
  cfg = CFG.replace(n_layers=n_layers)
  graphdef, params = transformer.abstract(cfg)
  tokens = np.zeros((1, 8), np.int32)
  hlo = jax.jit(lambda p: transformer.apply(graphdef, p, tokens)).lower(params).as_text()
  return hlo.count("dot_general")


def test_blocks_are_scanned_so_the_program_does_not_grow_with_depth():
  _, params = transformer.abstract(CFG.replace(n_layers=5))
  assert params["blocks"]["attn"]["q"]["kernel"].shape == (5, CFG.d_model, CFG.d_model)
  assert _dot_count(2) == _dot_count(12) > 0


def test_prefill_then_steps_with_the_cache_equal_the_full_forward():
  graphdef, params = transformer.init(CFG)
  tokens = np.arange(1, 11)[None]
  want = transformer.apply(graphdef, params, tokens)
  cache = transformer.empty_cache(CFG, 1, 10)
  logits, cache = transformer.decode_step(graphdef, params, tokens[:, :6], np.arange(6)[None],
                                          np.ones((1, 6), int), cache)
  got = [logits]
  for t in range(6, 10):
    logits, cache = transformer.decode_step(graphdef, params, tokens[:, t:t + 1], np.array([[t]]),
                                            np.ones((1, 1), int), cache)
    got.append(logits)
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=1e-5)
