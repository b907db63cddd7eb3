"""The block scan, and model options that must not change the numbers: block remat, the KV cache."""

import jax
import numpy as np

from camels_jax.adapt import loss
from camels_jax.models import transformer
from camels_jax.models.config import ModelConfig

CFG = ModelConfig(arch="llama", vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                  max_len=32, tie_embeddings=False)


def _grads(cfg, params, tokens):
  graphdef, _ = transformer.abstract(cfg)

  def f(p):
    return loss.token_nll(transformer.apply(graphdef, p, tokens), tokens).sum()
  return jax.jit(jax.grad(f))(params), graphdef


def test_block_remat_gives_the_same_gradients_and_is_really_rematerialised():
  _, params = transformer.init(CFG)
  tokens = np.arange(24).reshape(2, 12) % 50
  plain, _ = _grads(CFG, params, tokens)
  remat, graphdef = _grads(CFG.replace(remat=True), params, tokens)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)  # float32; remat refuses some fusions
  jaxpr = str(jax.make_jaxpr(lambda p: transformer.apply(graphdef, p, tokens).sum())(params))
  assert "remat" in jaxpr or "checkpoint" in jaxpr


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
