"""CaMeLS: exact meta-gradients (float64 finite differences), remat, first-order, init weights."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from camels_jax.adapt import inner
from camels_jax.methods import camels
from camels_jax.models import transformer
from tests.methods import camels_fixtures as fx


def _loss_fn(base, wm_graphdef, mcfg, batch, precond=None):
  return functools.partial(
      lambda meta, base_params: camels.meta_loss(meta, base_params, batch, precond, graphdef=base.graphdef,
                                                 wm_graphdef=wm_graphdef, mcfg=mcfg)[0],
      base_params=base.params)


def _precond(params, seed=5):
  """A positive diagonal preconditioner of `params`' shapes, far from constant."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jnp.exp(jax.random.normal(k, x.shape, x.dtype)) for k, x in zip(keys, leaves)])


def _directional_fd(f, params, direction, eps=1e-5):
  shift = lambda s: jax.tree.map(lambda p, d: p + s * d, params, direction)
  return (f(shift(eps)) - f(shift(-eps))) / (2 * eps)


@pytest.mark.slow  # 35-50 s per case on 2 cores
@pytest.mark.parametrize("n_docs,steps,learn_lr,mixing,precond", [
    (1, 1, False, False, False),
    (3, 1, True, False, True),  # the learned lr and the preconditioner scale the same step: one case
    (3, 2, False, True, False),
], ids=["k1", "k3-learned-lr-preconditioned", "k3-2steps-mixing"])
def test_meta_gradient_matches_central_finite_differences(n_docs, steps, learn_lr, mixing, precond):
  with jax.enable_x64(True):
    base, wm_graphdef, wm_params = fx.tiny("float64")
    mcfg = camels.MetaConfig(inner=inner.InnerConfig(steps=steps), inner_lr=0.5, learn_inner_lr=learn_lr,
                             mixing=mixing)
    meta = camels.init_meta_params(wm_params, mcfg)
    f = jax.jit(_loss_fn(base, wm_graphdef, mcfg, fx.batch(n_docs), _precond(base.params) if precond else None))
    grads = jax.grad(f)(meta)
    leaves, treedef = jax.tree.flatten(meta)
    keys = jax.random.split(jax.random.key(7), 2 * len(leaves))
    for trial in range(2):
      direction = jax.tree.unflatten(treedef, [
          jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys[trial::2], leaves)])
      analytic = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
      numeric = _directional_fd(f, meta, direction)
      rel = abs(analytic - numeric) / max(abs(numeric), 1e-12)
      assert rel < 1e-4, (trial, float(analytic), float(numeric))
    # Each part of the meta-parameters gets a gradient through the inner update (not just the head).
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
      assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)


def _meta_grad(icfg, n_docs=3, block_remat=""):
  base, wm_graphdef, wm_params = fx.tiny("float64")
  if block_remat:  # the base model's blocks rematerialised too (ModelConfig.remat, with this policy)
    cfg = base.cfg.replace(remat=True, remat_policy=block_remat)
    base = dataclasses.replace(base, graphdef=transformer.abstract(cfg)[0])
  mcfg = camels.MetaConfig(inner=icfg, inner_lr=0.5)
  f = _loss_fn(base, wm_graphdef, mcfg, fx.batch(n_docs))
  meta = camels.init_meta_params(wm_params, mcfg)
  return jax.jit(jax.grad(f))(meta), f, meta


@pytest.fixture(scope="module")
def exact_3docs():
  # float64 throughout, so that XLA's different fusion of two programs cannot hide a real difference.
  with jax.enable_x64(True):
    yield _meta_grad(inner.InnerConfig())[0]


def test_remat_gives_identical_meta_gradient_and_really_rematerialises(exact_3docs):
  with jax.enable_x64(True):
    remat, f, meta = _meta_grad(inner.InnerConfig(remat=True))
    for a, b in zip(jax.tree.leaves(exact_3docs), jax.tree.leaves(remat)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    jaxpr = str(jax.make_jaxpr(jax.grad(f))(meta))
  assert "remat" in jaxpr or "checkpoint" in jaxpr


@pytest.mark.parametrize("inner_remat,policy", [(True, "nothing_saveable"),
                                                (False, "dots_with_no_batch_dims_saveable")])
def test_block_remat_of_the_base_model_gives_identical_meta_gradient(exact_3docs, inner_remat, policy):
  # Inside the meta step the base params are not what the outer grad differentiates: remat of the
  # blocks must trace there (nnx.remat over modules raised flax's TraceContextError).
  with jax.enable_x64(True):
    remat, f, meta = _meta_grad(inner.InnerConfig(remat=inner_remat), block_remat=policy)
    for a, b in zip(jax.tree.leaves(exact_3docs), jax.tree.leaves(remat)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def _cat(tree):
  return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


@pytest.mark.slow
def test_first_order_differs_from_exact_over_several_documents(exact_3docs):
  with jax.enable_x64(True):
    e, f = _cat(exact_3docs), _cat(_meta_grad(inner.InnerConfig(first_order=True))[0])
    assert float(jnp.linalg.norm(e - f) / jnp.linalg.norm(e)) > 1e-3
    # ...yet still an approximation of it.
    assert float(jnp.vdot(e, f) / (jnp.linalg.norm(e) * jnp.linalg.norm(f))) > 0.5


@pytest.mark.slow
def test_first_order_equals_exact_for_one_step_on_one_document():
  # The inner gradient is taken at the (constant) base params, so nothing is dropped.
  with jax.enable_x64(True):
    e = _cat(_meta_grad(inner.InnerConfig(), n_docs=1)[0])
    f = _cat(_meta_grad(inner.InnerConfig(first_order=True), n_docs=1)[0])
    np.testing.assert_allclose(e, f, rtol=1e-10, atol=1e-14)


def test_weights_at_init_are_ln2_over_3_on_real_tokens_and_0_on_padding():
  base, wm_graphdef, _ = fx.tiny()
  wcfg = camels.weighting_config()
  wcfg.base_layers = 1
  wm_graphdef, wm_params = camels.build_weighting_model(wcfg, base)
  b = fx.batch(2)
  w = camels.token_weights(wm_graphdef, wm_params, b["doc_tokens_BxL"], b["doc_mask_BxL"])
  np.testing.assert_allclose(w[b["doc_mask_BxL"]], math.log(2) / 3, rtol=1e-6)
  assert float(jnp.abs(w[~b["doc_mask_BxL"]]).max()) == 0.0
  assert camels.INIT_WEIGHT == pytest.approx(0.23104906)


def test_base_backbone_is_initialised_from_the_base_model():
  base, _, _ = fx.tiny()
  wcfg = camels.weighting_config()
  wcfg.base_layers = 1
  _, wm_params = camels.build_weighting_model(wcfg, base)
  assert base.cfg.n_layers > 1
  wm_q = wm_params["backbone"]["blocks"]["attn"]["q"]["kernel"][...]
  assert wm_q.shape[0] == 1  # blocks are stacked on a leading layer axis
  np.testing.assert_array_equal(wm_q, base.params["blocks"]["attn"]["q"]["kernel"][...][:1])
  np.testing.assert_array_equal(wm_params["backbone"]["embed"]["embedding"][...],
                                base.params["embed"]["embedding"][...])


@pytest.mark.slow
def test_mean_weight_rescales_each_document_and_the_meta_gradient_flows_through_it():
  with jax.enable_x64(True):
    base, _, _ = fx.tiny("float64")
    wcfg = camels.weighting_config()
    wcfg.base_layers, wcfg.hidden, wcfg.mean_weight = 1, 8, 0.5
    wm_graphdef, wm_params = camels.build_weighting_model(wcfg, base)
    wm_params["fc2"]["kernel"].set_value(
        0.3 * jax.random.normal(jax.random.key(3), wm_params["fc2"]["kernel"].shape, jnp.float64))
    b = fx.batch(2)
    w = camels.token_weights(wm_graphdef, wm_params, b["doc_tokens_BxL"], b["doc_mask_BxL"])
    from camels_jax.adapt import uptake
    np.testing.assert_allclose(uptake.mean_weight_B(w, b["doc_mask_BxL"]), 0.5, rtol=1e-12)
    assert float(jnp.ptp(w[b["doc_mask_BxL"]])) > 0.01  # the shape of the weights is the model's
    # The meta-gradient flows through the rescaling to the head.
    mcfg = camels.MetaConfig(inner_lr=0.5)
    meta = camels.init_meta_params(wm_params, mcfg)
    g = jax.grad(_loss_fn(base, wm_graphdef, mcfg, b))(meta)
    assert float(jnp.abs(g["wm"]["fc2"]["kernel"][...]).max()) > 0


def _dot_general_count(jaxpr) -> int:
  """dot_general equations of a jaxpr and its sub-jaxprs (a scan body once, whatever its length)."""
  from jax._src import core  # pylint: disable=g-import-not-at-top
  return sum((e.primitive.name == "dot_general") + sum(_dot_general_count(j) for j in core.jaxprs_in_params(e.params))
             for e in jaxpr.eqns)


@pytest.mark.parametrize("n_docs", [1, 3])
def test_first_document_is_linearised_without_a_base_params_tangent(n_docs):
  # The meta-gradient does not differentiate the base params, so the first inner step's reverse pass is
  # one transposed backward pass (2 matmuls per forward matmul) instead of the reverse of a forward and a
  # backward (6). Differentiating the base params too must add exactly those 4 per forward matmul.
  base, wm_graphdef, wm_params = fx.tiny("float32")
  mcfg = camels.MetaConfig(inner=inner.InnerConfig(), inner_lr=0.5)
  meta, batch = camels.init_meta_params(wm_params, mcfg), fx.batch(n_docs)
  f = lambda m, p: camels.meta_loss(m, p, batch, graphdef=base.graphdef, wm_graphdef=wm_graphdef, mcfg=mcfg)[0]
  count = lambda fn, *args: _dot_general_count(jax.make_jaxpr(fn)(*args).jaxpr)
  forward = count(lambda p: transformer.apply(base.graphdef, p, batch["doc_tokens_BxL"][:1]), base.params)
  meta_only = count(jax.grad(f), meta, base.params)
  with_base = count(jax.grad(f, argnums=(0, 1)), meta, base.params)
  assert with_base - meta_only == 4 * forward, (meta_only, with_base, forward)


def test_a_preconditioned_step_is_sgd_on_precond_times_the_gradient():
  base, _, _ = fx.tiny()
  b = fx.batch(1)
  icfg = inner.InnerConfig()
  w = b["doc_mask_BxL"].astype(jnp.float32)
  args = (base.graphdef, base.params, b["doc_tokens_BxL"], b["doc_mask_BxL"], w, 0.1, icfg)
  # Jitted, as the library runs them.
  g = jax.jit(jax.grad(inner.doc_loss, argnums=1), static_argnums=(0, 5))(
      base.graphdef, base.params, b["doc_tokens_BxL"], b["doc_mask_BxL"], w, icfg)
  sgd_step = jax.jit(inner.sgd_step, static_argnums=(0, 6))
  p = _precond(base.params)
  by_hand = jax.tree.map(lambda x, gi, d: x - 0.1 * d * gi, base.params, g, p)
  stepped = sgd_step(*args, precond=p)
  for a, e in zip(jax.tree.leaves(stepped), jax.tree.leaves(by_hand)):
    np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7)
  ones = jax.tree.map(jnp.ones_like, base.params)
  for a, e in zip(jax.tree.leaves(sgd_step(*args, precond=ones)), jax.tree.leaves(sgd_step(*args))):
    np.testing.assert_array_equal(a, e)
  # Through `adapt` (the scan over documents) too: two documents, one after the other.
  b2 = fx.batch(2)
  w2 = b2["doc_mask_BxL"].astype(jnp.float32)
  got, _ = jax.jit(inner.adapt, static_argnums=(0, 7))(base.graphdef, base.params, b2["doc_tokens_BxL"],
                                                        b2["doc_mask_BxL"], w2, b2["doc_valid_B"], 0.1, icfg,
                                                        precond=p)
  want = base.params
  for k in range(2):
    want = sgd_step(base.graphdef, want, b2["doc_tokens_BxL"][k:k + 1], b2["doc_mask_BxL"][k:k + 1],
                    w2[k:k + 1], 0.1, icfg, precond=p)
  for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_second_moment_precond_is_one_over_root_mean_square_plus_eps():
  g1 = {"a": jnp.array([3.0, 0.0, -1.0])}
  g2 = {"a": jnp.array([4.0, 0.0, 1.0])}
  sum_sq = inner.add_square(inner.add_square(None, g1), g2)
  np.testing.assert_array_equal(sum_sq["a"], [25.0, 0.0, 2.0])
  p = inner.second_moment_precond(sum_sq, 2, 1e-3)
  np.testing.assert_allclose(p["a"], [1 / (12.5 ** 0.5 + 1e-3), 1 / 1e-3, 1 / (1.0 + 1e-3)], rtol=1e-6)
