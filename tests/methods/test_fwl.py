"""Fast Weight Layers: the chunked linear-attention head equals the explicit per-token SGD loop (float64),
chunking and padding change nothing, step size 0 is the plain model, exact gradients, config ranges."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from camels_jax import checks
from camels_jax.adapt import loss
from camels_jax.methods import dynamic_eval, fwl
from camels_jax.models import transformer
from camels_jax.models.config import ModelConfig

V, D, L = 23, 8, 9
_head_logits = jax.jit(fwl.head_logits, static_argnums=(0, 5, 6))  # graphdef, unembed_fn, chunk
_logits = jax.jit(fwl.logits, static_argnums=(0, 2, 6))  # graphdefs, chunk


@pytest.fixture
def x64():
  old = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", old)


def _base(dtype="float64", seed=0):
  cfg = ModelConfig(arch="llama", vocab_size=V, d_model=D, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16,
                    max_len=32, tie_embeddings=False, dtype=dtype, param_dtype=dtype)
  return transformer.init(cfg, seed)


def _head(residual=True, dtype="float64", seed=0, randomize=True, eta=0.05):
  """A head with every parameter random (so every layer gets a gradient), step sizes `eta`."""
  cfg = fwl.fwl_config()
  cfg.residual, cfg.hidden_mult = residual, 2
  graphdef, params = fwl.init_head(cfg, D, seed, param_dtype=dtype)
  if randomize:
    keys = iter(jax.random.split(jax.random.key(seed + 100), 8))
    flat = []
    for path, var in nnx.to_flat_state(params):
      x = var.get_value()
      if path[-1] == "bias":
        x = 0.3 * jax.random.normal(next(keys), x.shape, x.dtype)
      elif path == ("norm", "scale"):
        x = 1.0 + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype)
      flat.append((path, var.replace(x)))
    params = nnx.from_flat_state(flat)
  return graphdef, fwl.with_step_sizes(params, eta)


def _data(b=3, l=L, seed=0, pad=(0, 3, 0)):
  """Random tokens, right padding of pad[i] tokens in row i, and random hidden states."""
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(0, V, (b, l)))
  mask = jnp.asarray(np.arange(l)[None, :] < (l - np.asarray(pad[:b]))[:, None])
  h = jnp.asarray(rng.normal(size=(b, l, D)))
  return tokens, mask, h


def _unembed(dtype="float64"):
  return fwl.base_unembed(*_base(dtype))


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "paper"])
def test_fast_weights_equal_explicit_sgd_loop(x64, residual):
  graphdef, params = _head(residual)
  tokens, mask, h = _data()
  unembed = _unembed()
  fast = fwl.head_logits(graphdef, params, h, tokens, mask, unembed, chunk=4)
  ref = fwl.reference_logits(graphdef, params, h, tokens, mask, unembed)
  np.testing.assert_allclose(fast, ref, atol=1e-6, rtol=0)
  slow = fwl.slow_logits(graphdef, params, h, unembed)
  assert float(jnp.abs(fast - slow).max()) > 1e-2  # the update is not negligible
  np.testing.assert_allclose(fast[:, 0], slow[:, 0], atol=1e-12)  # the first token has nothing to learn from


@pytest.mark.parametrize("groups", [("norm.scale",), ("norm.bias",), ("fc1.kernel", "fc1.bias"),
                                    ("fc2.kernel", "fc2.bias")], ids=["ln-gain", "ln-bias", "fc1", "fc2"])
def test_each_step_size_group_alone_equals_explicit_loop(x64, groups):
  """Only `groups` have a nonzero step size: each part of the update is exercised (and correct) alone."""
  graphdef, params = _head()
  params = fwl.with_step_sizes(fwl.with_step_sizes(params, 0.0), {g: 0.2 for g in groups})
  tokens, mask, h = _data()
  unembed = _unembed()
  fast = fwl.head_logits(graphdef, params, h, tokens, mask, unembed, chunk=L)
  np.testing.assert_allclose(fast, fwl.reference_logits(graphdef, params, h, tokens, mask, unembed), atol=1e-6)
  assert float(jnp.abs(fast - fwl.slow_logits(graphdef, params, h, unembed)).max()) > 1e-3


def test_chunked_equals_unchunked_with_padding(x64):
  graphdef, params = _head(eta=0.1)
  tokens, mask, h = _data(l=11, pad=(0, 4, 1))
  unembed = _unembed()
  whole = _head_logits(graphdef, params, h, tokens, mask, unembed, 11)
  for chunk in (1, 3, 4, 7, 16):
    np.testing.assert_allclose(_head_logits(graphdef, params, h, tokens, mask, unembed, chunk), whole, atol=1e-10,
                               err_msg=f"chunk={chunk}")


def test_padding_contributes_nothing(x64):
  """Changing padded tokens and hidden states leaves every real position's logits unchanged."""
  graphdef, params = _head(eta=0.1)
  tokens, mask, h = _data(l=10, pad=(0, 4, 2))
  unembed = _unembed()
  m = np.asarray(mask)[..., None]
  rng = np.random.default_rng(5)
  tokens2 = jnp.where(mask, tokens, jnp.asarray(rng.integers(0, V, tokens.shape)))
  h2 = jnp.where(m, h, jnp.asarray(rng.normal(size=h.shape)))
  a = _head_logits(graphdef, params, h, tokens, mask, unembed, 3)
  b = _head_logits(graphdef, params, h2, tokens2, mask, unembed, 3)
  np.testing.assert_allclose(np.where(m, a, 0), np.where(m, b, 0), atol=1e-12)
  # A sequence's logits depend on its own tokens only: alone or in a batch, the same.
  alone = fwl.head_logits(graphdef, params, h[1:2], tokens[1:2], mask[1:2], unembed, chunk=3)
  np.testing.assert_allclose(alone[0], a[1], atol=1e-12)


def test_step_size_zero_is_the_slow_model(x64):
  base_graphdef, base_params = _base()
  tokens, mask, _ = _data()
  # A fresh residual head (LayerNorm gain and bias 0) with step size 0 is exactly the base model.
  graphdef, params = fwl.init_head(fwl.fwl_config(), D, 0, param_dtype="float64")
  zero = fwl.with_step_sizes(params, 0.0)
  np.testing.assert_allclose(_logits(base_graphdef, base_params, graphdef, zero, tokens, mask, 4),
                             transformer.apply(base_graphdef, base_params, tokens, mask), atol=1e-12)
  # ... and with its initial step sizes it already differs (the fast LayerNorm update), after token 0.
  init = _logits(base_graphdef, base_params, graphdef, params, tokens, mask, 4)
  plain = transformer.apply(base_graphdef, base_params, tokens, mask)
  np.testing.assert_allclose(init[:, 0], plain[:, 0], atol=1e-12)
  assert float(jnp.abs(init - plain).max()) > 1e-8
  # Any head at step size 0: body + slow head + base unembedding.
  for residual in (True, False):
    graphdef, params = _head(residual, eta=0.0)
    h = transformer.hidden(base_graphdef, base_params, tokens, mask)
    unembed = fwl.base_unembed(base_graphdef, base_params)
    np.testing.assert_allclose(_logits(base_graphdef, base_params, graphdef, params, tokens, mask, 4),
                               fwl.slow_logits(graphdef, params, h, unembed), atol=1e-12)


def _directional_fd(f, params, direction, eps=1e-5):
  shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)
  return (f(shift(eps)) - f(shift(-eps))) / (2 * eps)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "paper"])
def test_head_gradient_matches_central_finite_differences(x64, residual):
  base_graphdef, base_params = _base()
  graphdef, params = _head(residual, eta=0.1)
  tokens, mask, _ = _data()
  f = jax.jit(lambda p: fwl.lm_loss(base_graphdef, base_params, graphdef, p, tokens, mask, 4))
  grads = jax.grad(f)(params)
  for path, g in nnx.to_flat_state(grads):  # every parameter gets a gradient, and so does every step size
    assert float(jnp.abs(g.get_value()).max()) > 0, path
  assert float(jnp.abs(grads["log_step"].get_value()).min()) > 0
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), 2 * len(leaves))
  for trial in range(2):
    direction = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                             for k, x in zip(keys[trial::2], leaves)])
    analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    numeric = _directional_fd(f, params, direction)
    assert abs(analytic - numeric) / max(abs(numeric), 1e-12) < 1e-6, (trial, float(analytic), float(numeric))
  # The step sizes alone (the meta-learned part), coordinate by coordinate.
  log_step = params["log_step"].get_value()
  for i, group in enumerate(fwl.STEP_GROUPS):
    def f_i(x, i=i):
      return f(fwl.with_step_sizes(params, {fwl.STEP_GROUPS[i]: jnp.exp(x)}))
    numeric = (f_i(log_step[i] + 1e-5) - f_i(log_step[i] - 1e-5)) / 2e-5
    analytic = grads["log_step"].get_value()[i]
    assert abs(analytic - numeric) <= 1e-6 * max(abs(numeric), 1e-6), (group, float(analytic), float(numeric))


def test_body_gradient_flows():
  """With train_body the whole model trains: the base params get a gradient through the head."""
  base_graphdef, base_params = _base("float32")
  graphdef, params = _head(dtype="float32", eta=0.1)
  tokens, mask, _ = _data()
  grads = jax.jit(jax.grad(lambda bp: fwl.lm_loss(base_graphdef, bp, graphdef, params, tokens, mask, 4)))(base_params)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  assert float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(grads))) > 0


def test_fast_weights_learn_repeated_text():
  """On a random token sequence shown twice, the fast update lowers the loss of the repetition."""
  base_graphdef, base_params = _base("float32")
  graphdef, params = fwl.init_head(fwl.fwl_config(), D, 0)
  rng = np.random.default_rng(0)
  seq = rng.integers(0, V, (4, 16))
  tokens = jnp.asarray(np.concatenate([seq, seq], axis=1))
  mask = jnp.ones_like(tokens)

  def second_half_loss(p):
    logits = _logits(base_graphdef, base_params, graphdef, p, tokens, mask, 8)
    return float(loss.token_nll(logits, tokens)[:, 16:-1].mean())

  assert second_half_loss(fwl.with_step_sizes(params, {"norm.bias": 0.2})) < second_half_loss(
      fwl.with_step_sizes(params, 0.0)) - 0.05  # measured: 3.29 vs 3.42


def test_token_nlls_are_the_summed_nlls_per_position():
  """`token_nlls` (what the bench pairs over tokens) sums to `nll_sums`, padding included, and its static row
  is the plain model's NLL."""
  base_graphdef, base_params = _base("float32")
  graphdef, params = _head(dtype="float32")
  tokens, mask, _ = _data()
  fast, static, lw = fwl.token_nlls(base_graphdef, base_params, graphdef, params, tokens, mask, chunk=4)
  f, n, s = fwl.nll_sums(base_graphdef, base_params, graphdef, params, tokens, mask, chunk=4)
  np.testing.assert_allclose([fast.sum(), lw.sum(), static.sum()], [f, n, s], rtol=1e-6)
  assert float(jnp.abs(fast * (1 - lw)).sum()) == 0.0
  plain = fwl.static_lm_loss(base_graphdef, base_params, tokens, mask)
  np.testing.assert_allclose(float(plain), float(static.sum() / lw.sum()), rtol=1e-6)


def test_token_scores_pair_with_dynamic_evaluations_windows():
  """`token_scores`' static NLLs are, token for token, static `dynamic_eval.score` on non-overlapping windows of
  the same length (the bench pairs FWL with it); its fast NLLs are `token_nlls` of the same windows."""
  cfg = ModelConfig(arch="llama", vocab_size=V, d_model=D, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=16,
                    max_len=32, tie_embeddings=False, dtype="float32", param_dtype="float32")
  base_graphdef, base_params = transformer.init(cfg, 0)
  graphdef, params = _head(dtype="float32")
  ids = np.random.default_rng(3).integers(0, V, 30)  # 29 targets: 3 windows of 8 and one of 5
  fast_T, static_T = fwl.token_scores(base_graphdef, base_params, graphdef, params, ids, 8, 3, 4)
  c = dynamic_eval.dynamic_config()
  c.update(window=8, stride=8)
  expected = dynamic_eval.score(base_graphdef, base_params, cfg, ids, c, dynamic=False).nll_T
  assert fast_T.shape == static_T.shape == (29,)
  np.testing.assert_allclose(static_T, expected, rtol=1e-5, atol=1e-6)
  window = jnp.asarray(ids[8:17][None])
  f, _, _ = fwl.token_nlls(base_graphdef, base_params, graphdef, params, window, jnp.ones_like(window), chunk=4)
  np.testing.assert_allclose(fast_T[8:16], np.asarray(f)[0, :8], rtol=1e-5)
  assert np.abs(fast_T - static_T).max() > 1e-3  # the head does change the scores


def test_step_size_helpers():
  cfg = fwl.fwl_config()
  _, params = fwl.init_head(cfg, D, 0)
  etas = fwl.step_sizes(params)
  assert list(etas) == list(fwl.STEP_GROUPS)
  np.testing.assert_allclose([float(e) for e in etas.values()], cfg.step_init, rtol=1e-6)
  etas = fwl.step_sizes(fwl.with_step_sizes(params, {"fc2.bias": 0.0, "norm.scale": 0.5}))
  assert float(etas["fc2.bias"]) == 0.0 and abs(float(etas["norm.scale"]) - 0.5) < 1e-6
  with pytest.raises(ValueError, match="unknown group"):
    fwl.with_step_sizes(params, {"fc3.kernel": 1.0})


def test_default_config_passes_its_rules():
  assert checks.violations(fwl.fwl_config(), fwl.RULES, fwl.CROSS) == []
  numeric = [k for k, v in checks.leaves(fwl.fwl_config()).items() if not isinstance(v, str)]
  assert sorted(numeric) == sorted(checks.flat_rules(fwl.RULES))  # every field has a rule


@pytest.mark.parametrize("key,value", [("chunk", 0), ("chunk", -4), ("chunk", 2.5), ("hidden_mult", 0),
                                       ("step_init", 0.0), ("step_init", -1e-3), ("lr", 0.0), ("body_lr", -1.0),
                                       ("grad_clip", 0.0), ("steps", -1), ("seed", -1), ("residual", 1),
                                       ("train_body", "yes"), ("fast_weights", "no")])
def test_rules_reject_out_of_range(key, value):
  c = ml_collections.ConfigDict({**fwl.fwl_config().to_dict(), key: value})  # a wrong type, too
  found = checks.violations(c, fwl.RULES, fwl.CROSS)
  assert len(found) == 1 and found[0].startswith(f"{key}="), found
