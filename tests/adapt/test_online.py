"""Online adaptation: uniform weights through the weighted path is plain fine-tuning; lr 0 is a no-op."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from camels_jax.adapt import inner, loss, online
from camels_jax.models import transformer
from tests.methods import camels_fixtures as fx


def _stream(n=3):
  b = fx.batch(n)
  return [{"doc_tokens_BxL": b["doc_tokens_BxL"][i:i + 1], "doc_mask_BxL": b["doc_mask_BxL"][i:i + 1]}
          for i in range(n)]


def _uniform(i, batch):
  return batch["doc_mask_BxL"].astype(jnp.float32)


def test_uniform_weights_equal_plain_fine_tuning():
  # float64: Adam divides by sqrt(v), which turns float32 rounding in near-zero gradients into
  # lr-sized differences, so a float32 comparison depends on XLA's operation order.
  with jax.enable_x64(True):
    _check_uniform_equals_plain()


def _check_uniform_equals_plain():
  base, _, _ = fx.tiny("float64")
  c = online.online_config()
  c.lr, c.normalization, c.grad_clip = 1e-2, "tokens", 0.5
  adapted, _ = online.adapt_stream(base.graphdef, base.params, _stream(), _uniform, c,
                                   online.inner_config(c, (12,)), progress=False)

  # Plain fine-tuning, written independently: mean next-token NLL over real tokens, clipped Adam.
  def plain_loss(params, tokens, mask):
    nll = loss.token_nll(transformer.apply(base.graphdef, params, tokens, mask), tokens)
    m = loss.target_mask(mask)
    return (nll * m).sum() / m.sum()

  opt = optax.chain(optax.clip_by_global_norm(0.5), optax.adam(1e-2))
  params, state = base.params, opt.init(base.params)
  for doc in _stream():
    grads = jax.grad(plain_loss)(params, doc["doc_tokens_BxL"], doc["doc_mask_BxL"])
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  for a, b in zip(jax.tree.leaves(adapted), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(adapted), jax.tree.leaves(base.params)))


def test_padded_normalisation_divides_by_the_fixed_length():
  base, _, _ = fx.tiny()
  doc = _stream(1)[0]
  w = _uniform(0, doc)
  tokens_loss = inner.doc_loss(base.graphdef, base.params, doc["doc_tokens_BxL"], doc["doc_mask_BxL"], w,
                               inner.InnerConfig(normalization="tokens"))
  padded_loss = inner.doc_loss(base.graphdef, base.params, doc["doc_tokens_BxL"], doc["doc_mask_BxL"], w,
                               inner.InnerConfig(normalization="padded", padded_len=1024))
  n_targets = float(loss.target_mask(doc["doc_mask_BxL"]).sum())  # doc 0 has 9 real tokens: 8 targets
  np.testing.assert_allclose(padded_loss, tokens_loss * n_targets / 1023, rtol=1e-6)


def test_zero_learning_rate_leaves_the_model_unchanged():
  base, _, _ = fx.tiny()
  c = online.online_config()
  c.lr = 0.0
  adapted, losses = online.adapt_stream(base.graphdef, base.params, _stream(), _uniform, c,
                                        online.inner_config(c, (12,)), progress=False)
  for a, b in zip(jax.tree.leaves(adapted), jax.tree.leaves(base.params)):
    np.testing.assert_array_equal(a, b)
  assert len(losses) == 3 and all(np.isfinite(losses))


def test_sgd_stream_is_the_inner_sgd_step_per_document():
  # online.optimizer="sgd": each document moves the params by -lr * (clipped) gradient of its weighted loss,
  # the update CaMeLS's inner loop takes (written here without the library's step).
  base, _, _ = fx.tiny()
  c = online.online_config()
  c.optimizer, c.lr, c.grad_clip, c.normalization = "sgd", 0.3, 1e9, "tokens"
  icfg = online.inner_config(c, (12,))
  adapted, _ = online.adapt_stream(base.graphdef, base.params, _stream(2), _uniform, c, icfg, progress=False)
  params = base.params
  for doc in _stream(2):
    grads = jax.grad(inner.doc_loss, argnums=1)(base.graphdef, params, doc["doc_tokens_BxL"], doc["doc_mask_BxL"],
                                                _uniform(0, doc), icfg)
    params = jax.tree.map(lambda p, g: p - 0.3 * g, params, grads)
  for a, b in zip(jax.tree.leaves(adapted), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
