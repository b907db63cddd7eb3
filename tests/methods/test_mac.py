"""MAC: an untrained MAC is exactly the base model, the bank grows by T tokens per document and restores
bit-exactly, the prefix depends on the question and the bank but not on the order inside a window, the base
model is never differentiated, the networks can learn, bad configs get one clear error."""

import dataclasses
import functools

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from camels_jax import checks
from camels_jax.methods import mac
from camels_jax.adapt import loss
from camels_jax.models import loading, transformer
from camels_jax.models.config import ModelConfig

V, D, F, L, S = 61, 32, 64, 12, 10


@dataclasses.dataclass
class _Tok:
  vocab_size: int = V


def _base(seed=0):
  cfg = ModelConfig(arch="llama", vocab_size=V, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=F, max_len=64)
  graphdef, params = transformer.init(cfg, seed)
  return loading.Loaded(cfg, graphdef, params, _Tok())


def _config(**kw):
  c = mac.mac_config()
  c.update(tokens=3, heads=4, base_layers=1, window=2, bank_docs=4, questions=6, mlp_mult=3, lr=3e-3)
  c.update(**kw)
  return c


def _randomized(params, seed=1):
  """Every parameter random (the value projection too), so the prefix is not the zero-init one."""
  keys = iter(jax.random.split(jax.random.key(seed), 200))
  return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), params)


def _docs(k, seed=0):
  rng = np.random.default_rng(seed)
  tokens = jnp.asarray(rng.integers(1, V, (k, L)), jnp.int32)
  mask = jnp.asarray(np.arange(L)[None, :] < rng.integers(L // 2, L + 1, (k, 1)), jnp.int32)
  return tokens, mask


def _qa(b, seed=0):
  """Question tokens, then an answer of 3 tokens (loss mask), then right padding."""
  rng = np.random.default_rng(seed + 100)
  tokens = jnp.asarray(rng.integers(1, V, (b, S)), jnp.int32)
  q_len = rng.integers(3, 6, b)
  pos = np.arange(S)[None, :]
  mask = jnp.asarray(pos < (q_len + 3)[:, None], jnp.int32)
  loss_mask = jnp.asarray((pos >= q_len[:, None]) & (pos < (q_len + 3)[:, None]))
  return tokens, mask, loss_mask


def _prefix(graphdef, params, qa, bank, valid, window=2):
  return jax.jit(mac.prefix, static_argnums=(0, 7))(graphdef, params, *qa, bank, valid, window)


def test_untrained_mac_is_exactly_the_base_model():
  base = _base()
  graphdef, params = mac.build(_config(), base)
  qa = _qa(3)
  bank = mac.amortize(graphdef, params, *_docs(4))
  pfx = _prefix(graphdef, params, qa, bank, jnp.ones(4, bool))
  assert float(jnp.abs(pfx.k_NxBxPxKxE).max()) > 0  # keys are live; values start at zero
  with_prefix = transformer.apply(base.graphdef, base.params, qa[0], qa[1], pfx)
  np.testing.assert_array_equal(with_prefix, transformer.apply(base.graphdef, base.params, qa[0], qa[1]))
  # A trained (random) MAC does change them.
  moved = _prefix(graphdef, _randomized(params), qa, bank, jnp.ones(4, bool))
  assert float(jnp.abs(transformer.apply(base.graphdef, base.params, qa[0], qa[1], moved) - with_prefix).max()) > 1e-3


def test_encoder_starts_from_the_base_models_first_blocks_without_sharing_buffers():
  base = _base()
  _, params = mac.build(_config(base_layers=1), base)
  enc = nnx.to_flat_state(params["encoder"])
  src = dict(nnx.to_flat_state(transformer.first_layers(base.params, 1)))
  for path, var in enc:
    np.testing.assert_array_equal(var.get_value(), src[path].get_value())
    assert var.get_value().unsafe_buffer_pointer() != src[path].get_value().unsafe_buffer_pointer()


def test_bank_grows_by_t_tokens_per_document_and_restores_bit_exactly(tmp_path):
  base = _base()
  c = _config()
  graphdef, params = mac.build(c, base)
  tokens, mask = _docs(5)
  bank = mac.Bank.empty(c.tokens, D)
  for i in range(5):
    before = bank.size_tokens
    bank = bank.append(mac.amortize(graphdef, params, tokens[i:i + 1], mask[i:i + 1])[0])
    assert bank.size_tokens == before + c.tokens and bank.docs == i + 1
  assert bank.nbytes == 5 * c.tokens * D * 4
  bank.save(str(tmp_path / "bank"))
  restored = mac.Bank.restore(str(tmp_path / "bank"))
  assert restored.tokens_MxTxD.dtype == bank.tokens_MxTxD.dtype
  np.testing.assert_array_equal(restored.tokens_MxTxD, bank.tokens_MxTxD)
  with pytest.raises(checks.UserError, match="no saved memory bank"):
    mac.Bank.restore(str(tmp_path / "none"))


def test_appending_m_documents_copies_o_of_m_and_banks_stay_values():
  rng = np.random.default_rng(0)
  docs = rng.normal(size=(100, 3, 4)).astype(np.float32)
  bank, banks, grew = mac.Bank.empty(3, 4, capacity=1), [], 0
  for i in range(100):
    before = bank
    bank = bank.append(docs[i])
    banks.append(bank)
    # In place but for the doublings: a concatenation would give every append a buffer of its own.
    grew += not np.shares_memory(bank.tokens_MxTxD, before.tokens_MxTxD) and before.docs > 0
  assert grew == 7  # capacities 1 -> 2 -> 4 -> ... -> 128: ceil(log2(100)) growths, each copying what was written
  assert bank.capacity == 128 and bank.nbytes == docs.nbytes
  np.testing.assert_array_equal(bank.tokens_MxTxD, docs)
  # Every earlier bank still holds exactly its own documents; a branch off one of them copies and leaves
  # the newest alone.
  np.testing.assert_array_equal(banks[9].tokens_MxTxD, docs[:10])
  branch = banks[9].append(-docs[0])
  np.testing.assert_array_equal(branch.tokens_MxTxD, np.concatenate([docs[:10], -docs[:1]]))
  np.testing.assert_array_equal(bank.tokens_MxTxD, docs)
  padded, valid = banks[9].padded(12)
  np.testing.assert_array_equal(padded, np.concatenate([docs[:10], np.zeros((2, 3, 4), np.float32)]))
  np.testing.assert_array_equal(valid, np.arange(12) < 10)
  with pytest.raises(ValueError, match="a document of shape"):
    bank.append(docs[0, :2])


def test_prefix_depends_on_question_and_bank_not_on_order_within_a_window():
  base = _base()
  graphdef, params = mac.build(_config(), base)
  params = _randomized(params)
  qa = _qa(3)
  bank = mac.amortize(graphdef, params, *_docs(4))
  valid = jnp.ones(4, bool)
  pfx = _prefix(graphdef, params, qa, bank, valid)
  # window 2: documents {0, 1} and {2, 3} are windows; swapping inside each changes nothing.
  swapped = _prefix(graphdef, params, qa, bank[jnp.array([1, 0, 3, 2])], valid)
  np.testing.assert_allclose(swapped.v_NxBxPxKxE, pfx.v_NxBxPxKxE, rtol=1e-5, atol=1e-6)
  # One window over the whole bank: any permutation.
  one = _prefix(graphdef, params, qa, bank, valid, window=4)
  perm = _prefix(graphdef, params, qa, bank[jnp.array([2, 0, 3, 1])], valid, window=4)
  np.testing.assert_allclose(perm.v_NxBxPxKxE, one.v_NxBxPxKxE, rtol=1e-5, atol=1e-6)
  # Another bank, another question: another prefix.
  other = mac.amortize(graphdef, params, *_docs(4, seed=7))
  assert float(jnp.abs(_prefix(graphdef, params, qa, other, valid).v_NxBxPxKxE - pfx.v_NxBxPxKxE).max()) > 1e-4
  other_q = _prefix(graphdef, params, _qa(3, seed=5), bank, valid)
  assert float(jnp.abs(other_q.v_NxBxPxKxE - pfx.v_NxBxPxKxE).max()) > 1e-4
  # Invalid (padding) documents change nothing, whatever they hold and wherever they are, and neither does the
  # capacity they pad the bank to (here 7 slots, which would otherwise add a level of windows).
  junk = 100.0 * jnp.ones_like(bank[:1])
  padded = jnp.concatenate([bank[:1], junk, bank[1:3], junk, junk, bank[3:]])
  with_padding = _prefix(graphdef, params, qa, padded, jnp.array([True, False, True, True, False, False, True]))
  np.testing.assert_allclose(with_padding.v_NxBxPxKxE, pfx.v_NxBxPxKxE, rtol=1e-5, atol=1e-6)
  # Fewer documents than a window, padded to a bank of 6: one pass over them, as without the padding.
  three = _prefix(graphdef, params, qa, bank[:2], jnp.ones(2, bool))
  three_padded = _prefix(graphdef, params, qa, jnp.concatenate([bank[:2], junk, junk, junk, junk]),
                         jnp.array([True, True, False, False, False, False]))
  np.testing.assert_allclose(three_padded.v_NxBxPxKxE, three.v_NxBxPxKxE, rtol=1e-5, atol=1e-6)


def test_hierarchical_aggregation_of_a_bank_within_one_window_is_one_pass():
  base = _base()
  graphdef, params = mac.build(_config(), base)
  params = _randomized(params)
  q = mac.amortize(graphdef, params, *_docs(2, seed=3))
  bank, valid = mac.amortize(graphdef, params, *_docs(3)), jnp.ones(3, bool)
  one_pass = nnx.merge(graphdef, params).aggregate(q, jnp.broadcast_to(bank.reshape(1, -1, D), (2, 9, D)),
                                                   jnp.ones((2, 9), bool))
  # float32 through two differently fused programs: equal to rounding (rtol 1e-6 failed once by 3e-5 on ~1e-6).
  np.testing.assert_allclose(mac.aggregate(graphdef, params, q, bank, valid, window=3), one_pass, rtol=1e-5,
                             atol=1e-6)
  # With window 2 the same bank goes through two levels (windows {0, 1}, {2}, then their two summaries).
  two = mac.aggregate(graphdef, params, q, bank, valid, window=2)
  model = nnx.merge(graphdef, params)
  level = lambda m: model.aggregate(q, jnp.broadcast_to(m.reshape(1, -1, D), (2, m.shape[0] * 3, D)),
                                    jnp.ones((2, m.shape[0] * 3), bool))
  by_hand = model.aggregate(q, jnp.concatenate([level(bank[:2]), level(bank[2:])], axis=1), jnp.ones((2, 6), bool))
  np.testing.assert_allclose(two, by_hand, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(two - one_pass).max()) > 1e-5


def _batch(k=4, q=3, seed=0):
  tokens, mask = _docs(k, seed)
  qa_tokens, qa_mask, qa_loss = _qa(k * q, seed)
  return {"doc_tokens_BxL": tokens, "doc_mask_BxL": mask, "doc_valid_B": jnp.ones(k, bool),
          "qa_tokens_BxQxS": qa_tokens.reshape(k, q, S), "qa_mask_BxQxS": qa_mask.reshape(k, q, S),
          "qa_loss_mask_BxQxS": qa_loss.reshape(k, q, S), "qa_valid_BxQ": jnp.ones((k, q), bool)}


def _all_shapes(jaxpr):
  out = set()
  for eqn in jaxpr.eqns:
    out |= {v.aval.shape for v in eqn.outvars if hasattr(v.aval, "shape")}
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= _all_shapes(sub)
  return out


@pytest.mark.slow
def test_the_base_model_is_never_differentiated_nor_updated():
  base = _base()
  c = _config(encoder="random", random=dict(d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=24))
  graphdef, params = mac.build(c, base)
  scfg = mac.step_config(c)
  grad_fn = jax.grad(functools.partial(mac.train_loss, graphdef=graphdef, base_graphdef=base.graphdef, scfg=scfg),
                     has_aux=True)
  jaxpr = jax.make_jaxpr(grad_fn)(params, base.params, _batch(), jax.random.key(0))
  # The base model's MLP weight matrices (D x F, F x D per layer, stacked 2 x ...) never appear as a result:
  # no weight gradient is formed, only the activations' cotangents that reach the prefix. (MAC has no
  # array of those shapes: its encoder is 16 wide and its MLPs 3 x D.)
  base_only = {(D, F), (F, D), (2, D, F), (2, F, D)}
  assert {(2, D, F), (2, F, D)} <= {x.shape for x in jax.tree.leaves(base.params)}
  assert not base_only & {x.shape for x in jax.tree.leaves(params)}
  assert not base_only & _all_shapes(jaxpr.jaxpr)
  # ... while the same check on the gradient with respect to the base params does see them.
  base_grad = jax.make_jaxpr(jax.grad(functools.partial(mac.train_loss, graphdef=graphdef,
                                                        base_graphdef=base.graphdef, scfg=scfg), argnums=1,
                                      has_aux=True))
  assert base_only & _all_shapes(base_grad(params, base.params, _batch(), jax.random.key(0)).jaxpr)
  # The gradient does reach every MAC parameter (once the zero-initialised value projection has moved).
  grads, _ = grad_fn(_randomized(params), base.params, _batch(), jax.random.key(0))
  zero = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads) if not jnp.any(g != 0)]
  assert zero == [], zero
  # Steps leave the base params bit-identical.
  before = jax.tree.map(np.array, base.params)
  optimizer = mac.make_optimizer(c)
  step = jax.jit(functools.partial(mac.train_step, graphdef=graphdef, base_graphdef=base.graphdef, scfg=scfg,
                                   optimizer=optimizer))
  opt_state = optimizer.init(params)
  for i in range(2):
    params, opt_state, _ = step(params, opt_state, base.params, _batch(), jax.random.key(i))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, base.params), before)


def test_backprop_fraction_only_differentiates_some_documents():
  base = _base()
  c = _config(backprop_fraction=0.25)  # 1 of 4 documents
  graphdef, params = mac.build(c, base)
  params = _randomized(params)
  batch = _batch()
  grad = lambda p, n: jax.grad(lambda p: mac._bank_of(graphdef, p, batch, jax.random.key(0), n)[0].sum())(p)
  norm = lambda g: float(optax_global_norm(g["queries"]))
  # The bank's value is the same whichever documents carry the gradient; the gradient is a part of the full one.
  full = mac._bank_of(graphdef, params, batch, jax.random.key(0), 4)[0]
  np.testing.assert_allclose(mac._bank_of(graphdef, params, batch, jax.random.key(0), 1)[0], full, rtol=1e-5,
                             atol=1e-6)
  assert 0 < norm(grad(params, 1)) < norm(grad(params, 4))
  assert mac.step_config(c).backprop_docs == 1 and mac.step_config(_config(backprop_fraction=1.0)).backprop_docs == 4


def optax_global_norm(x):
  return jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(x)))


def test_training_on_one_document_lowers_its_questions_nll():
  base = _base()
  c = _config(bank_docs=1, questions=3, lr=3e-3)
  graphdef, params = mac.build(c, base)
  batch = _batch(k=1, q=3)
  scfg = mac.step_config(c)
  optimizer = mac.make_optimizer(c)
  step = jax.jit(functools.partial(mac.train_step, graphdef=graphdef, base_graphdef=base.graphdef, scfg=scfg,
                                   optimizer=optimizer))
  opt_state = optimizer.init(params)
  losses = []
  for i in range(40):
    params, opt_state, m = step(params, opt_state, base.params, batch, jax.random.key(i))
    losses.append(float(m["loss"]))
  assert losses[0] == pytest.approx(float(np.log(V)), abs=1.0)  # starts at the random base model's NLL
  assert losses[-1] < losses[0] - 1.0, losses


def test_bad_configs_get_one_clear_error():
  base = _base()
  assert checks.violations(ml_collections.ConfigDict({"mac": _config(tokens=0)}), {"mac": mac.RULES}) == [
      "mac.tokens=0: expected an integer >= 1"]
  assert any("backprop_fraction" in v for v in checks.violations(
      ml_collections.ConfigDict({"mac": _config(backprop_fraction=0.0)}), {"mac": mac.RULES}))
  with pytest.raises(checks.ConfigError, match="mac.heads=5 must divide the base model's d_model=32"):
    mac.build(_config(heads=5), base)
  with pytest.raises(checks.ConfigError, match="mac.base_layers: 3 blocks of the base model, which has 2"):
    mac.build(_config(base_layers=3), base)


def test_an_encoder_with_another_tokenizer_is_refused(monkeypatch):
  base = _base()
  other = dataclasses.replace(_base(seed=1), tokenizer=_Tok(vocab_size=V + 1))
  monkeypatch.setattr(loading, "load", lambda mc: other)
  with pytest.raises(checks.ConfigError, match=r"mac.encoder=other.gguf: its tokenizer \(62 ids\) is not the base"):
    mac.build(_config(encoder="other.gguf"), base)


def test_a_bank_per_question_row_equals_mac_over_a_bank_of_only_those_documents():
  # MAC + retrieval: each question's bank restricted to its top-k documents (here k = 3 of a bank of 5, with
  # window 2, so the restricted banks take two levels) is MAC over a bank holding only those k.
  base = _base()
  graphdef, params = mac.build(_config(), base)
  params = _randomized(params)
  qa = _qa(3)
  bank_MxTxD = mac.amortize(graphdef, params, *_docs(5))
  top_QxK = np.array([[4, 0, 2], [1, 3, 0], [2, 2, 4]])
  valid_QxK = np.array([[True, True, True], [True, True, False], [True, True, True]])
  rows = jax.jit(mac.prefix_rows, static_argnums=(0, 7))(graphdef, params, *qa, bank_MxTxD[top_QxK], valid_QxK, 2)
  for q in range(3):
    own = top_QxK[q][valid_QxK[q]]
    alone = _prefix(graphdef, params, tuple(x[q:q + 1] for x in qa), bank_MxTxD[own], jnp.ones(len(own), bool))
    np.testing.assert_allclose(rows.k_NxBxPxKxE[:, q:q + 1], alone.k_NxBxPxKxE, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows.v_NxBxPxKxE[:, q:q + 1], alone.v_NxBxPxKxE, rtol=1e-5, atol=1e-6)
  # Not the prefix of the whole bank: the restriction is what it changes.
  whole = _prefix(graphdef, params, qa, bank_MxTxD, jnp.ones(5, bool))
  assert float(jnp.abs(whole.v_NxBxPxKxE - rows.v_NxBxPxKxE).max()) > 1e-4


def test_the_contrastive_term_is_a_hinge_on_what_each_questions_own_document_is_worth():
  base = _base()
  c = _config(window=4, backprop_fraction=0.5)  # a bank of 4 documents in one window: order-free
  graphdef, params = mac.build(c, base)
  params, batch, rng = _randomized(params), _batch(), jax.random.key(3)
  loss_of = lambda contrast: mac.train_loss(params, base.params, batch, rng, graphdef=graphdef,
                                            base_graphdef=base.graphdef,
                                            scfg=mac.step_config(_config(window=4, contrast=contrast)))
  plain, plain_m = loss_of(0.0)
  value, m = loss_of(2.0)
  # By hand, with the sampled rows' own documents found by their batch index (not the bank's shuffled order):
  # each row's answer NLL per token with the batch's 4 documents, and with its own document taken out.
  _, q_rng = jax.random.split(rng)
  tokens, mask, loss_mask, doc_N = mac._sampled_questions(batch, q_rng, c.questions)
  docs = (batch["doc_tokens_BxL"], batch["doc_mask_BxL"])
  per_token = lambda bank, r: (lambda s, n: float(s[0] / n[0]))(*mac.loss.answer_nll_rows(transformer.apply(
      base.graphdef, base.params, tokens[r:r + 1], mask[r:r + 1],
      _prefix(graphdef, params, (tokens[r:r + 1], mask[r:r + 1], loss_mask[r:r + 1]), bank,
              jnp.ones(bank.shape[0], bool), window=4)), tokens[r:r + 1], loss_mask[r:r + 1]))
  full = mac.amortize(graphdef, params, *docs)
  gaps = []
  for r, d in enumerate(np.asarray(doc_N)):
    others = np.array([k for k in range(4) if k != d])
    gaps.append(per_token(mac.amortize(graphdef, params, docs[0][others], docs[1][others]), r) - per_token(full, r))
  gaps = np.array(gaps)
  hinge = np.maximum(c.contrast_margin - gaps, 0.0).mean()
  assert float(m["bank_gap"]) == pytest.approx(gaps.mean(), rel=1e-4, abs=1e-5)
  assert float(m["hinge"]) == pytest.approx(hinge, rel=1e-4, abs=1e-5) and hinge > 0
  assert float(m["nll"]) == pytest.approx(float(plain)) and set(plain_m) == {"nll"}
  assert float(value) == pytest.approx(float(plain) + 2.0 * hinge, rel=1e-5)
  # Its gradient makes the own document worth more: a step on the hinge alone widens the gap.
  hinge_of = lambda p: mac.bank_hinge(graphdef, p, base.graphdef, base.params, tokens, mask, loss_mask,
                                      full, jnp.ones(4, bool), doc_N, 4, 10.0)
  g = jax.grad(lambda p: hinge_of(p)[0])(params)
  stepped = jax.tree.map(lambda p, x: p - 1e-3 * x, params, g)
  assert float(hinge_of(stepped)[1]) > float(hinge_of(params)[1])


def test_the_retrieval_term_picks_each_questions_own_document_by_the_first_blocks_logits():
  base = _base()
  c = _config(window=4)
  graphdef, params = mac.build(c, base)
  params = _randomized(params)
  tokens, mask, loss_mask = _qa(6, seed=2)
  loss_mask = loss_mask.at[5].set(False)  # a padding row: counts for nothing
  bank = mac.amortize(graphdef, params, *_docs(4, seed=4))
  valid, own = jnp.array([True, True, False, True]), jnp.array([0, 1, 3, 3, 0, 2])
  got_nll, got_acc = mac.bank_retrieval(graphdef, params, tokens, mask, loss_mask, bank, valid, own)
  # By hand: each document's logits on its own, logsumexp over its tokens, mean over heads and question tokens.
  model = nnx.merge(graphdef, params)
  q = model.amortize(tokens, mac.question_mask(mask, loss_mask).astype(jnp.int32))
  score_NxK = np.stack([np.asarray(jax.nn.logsumexp(model.aggregator[0].scores(q, bank[k][None])[0], -1).mean((1, 2)))
                        for k in range(4)], 1)
  score_NxK[:, 2] = -np.inf  # not a document of the bank
  log_p = score_NxK - np.log(np.exp(score_NxK - score_NxK.max(1, keepdims=True)).sum(1, keepdims=True)) \
      - score_NxK.max(1, keepdims=True)
  rows = np.arange(5)
  assert float(got_nll) == pytest.approx(-log_p[rows, own[:5]].mean(), rel=1e-4)
  assert float(got_acc) == pytest.approx((score_NxK.argmax(1) == np.asarray(own))[:5].mean())
  # Learnable: Adam steps on it alone make the questions find their documents.
  loss = jax.jit(lambda p: mac.bank_retrieval(graphdef, p, tokens, mask, loss_mask, bank, valid,
                                              jnp.array([0, 1, 3, 3, 0, 1]))[0])
  opt = mac.make_optimizer(c)
  state, p = opt.init(params), params
  for _ in range(30):
    g = jax.grad(loss)(p)
    updates, state = opt.update(g, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
  assert float(loss(p)) < 0.5 * float(loss(params))


def test_retrieval_steps_teach_retrieval_and_leave_the_base_model_exact():
  # mac.retrieve_steps: Adam on the retrieval term alone, at an lr (3e-2) that would wreck the answer path.
  base = _base()
  c = _config(window=4, questions=12, backprop_fraction=1.0)
  graphdef, params = mac.build(c, base)
  batch, scfg = _batch(k=4, q=3), mac.step_config(c)
  optimizer = mac.make_optimizer(c, 3e-2)
  step = jax.jit(functools.partial(mac.retrieval_step, graphdef=graphdef, scfg=scfg, optimizer=optimizer))
  p, state, first = params, optimizer.init(params), None
  for i in range(40):
    p, state, m = step(p, state, batch, jax.random.key(i))
    first = float(m["retrieval_nll"]) if first is None else first
  last, _ = mac.retrieval_loss(p, batch, jax.random.key(99), graphdef=graphdef, scfg=scfg)
  assert first == pytest.approx(np.log(4), abs=0.3) and float(last) < 0.5 * first, (first, float(last))
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, p)
  assert sum(jax.tree.leaves(moved)) > 0
  # The attention logits do not reach the prefix's zero-initialised values: the base model is still exact.
  qa = _qa(3)
  bank = mac.amortize(graphdef, p, *_docs(4))
  pfx = _prefix(graphdef, p, qa, bank, jnp.ones(4, bool), window=4)
  np.testing.assert_array_equal(transformer.apply(base.graphdef, base.params, qa[0], qa[1], pfx),
                                transformer.apply(base.graphdef, base.params, qa[0], qa[1]))


def test_the_reconstruction_term_is_each_documents_nll_given_a_prefix_of_its_own_tokens_alone():
  base = _base()
  c = _config(window=4, backprop_fraction=1.0, reconstruct=1.0)
  graphdef, params = mac.build(c, base)
  tokens, mask = _docs(4)
  doc_nll = jax.jit(mac.document_nll, static_argnums=(0, 2, 7))
  nll_of = lambda p, m: doc_nll(graphdef, p, base.graphdef, base.params, tokens, mask, m, 4)
  # Untrained (zero values), the prefix is no prefix: the base model's NLL of each document.
  total, count = nll_of(params, mac.amortize(graphdef, params, tokens, mask))
  base_nll = loss.token_nll(transformer.apply(base.graphdef, base.params, tokens, mask), tokens)
  np.testing.assert_allclose(total, (base_nll * loss.target_mask(mask)).sum(-1), rtol=1e-5)
  np.testing.assert_array_equal(count, mask.sum(-1) - 1)
  # In the training loss it is weighted per token of the back-propagated documents, beside the answer loss.
  p, batch, rng = _randomized(params), _batch(), jax.random.key(3)
  loss_of = lambda w: mac.train_loss(p, base.params, batch, rng, graphdef=graphdef, base_graphdef=base.graphdef,
                                     scfg=mac.step_config(_config(window=4, backprop_fraction=1.0, reconstruct=w)))
  (with_term, m), (without, m0) = loss_of(2.0), loss_of(0.0)
  assert "doc_nll" in m and "doc_nll" not in m0
  np.testing.assert_allclose(with_term, without + 2.0 * m["doc_nll"], rtol=1e-6)
  # Trained on it, each document's prefix carries that document: its own tokens' NLL is lower with it than
  # with another document's prefix (what the answer loss alone never taught on the generated documents).
  optimizer = mac.make_optimizer(c, 1e-2)
  step = jax.jit(functools.partial(mac.train_step, graphdef=graphdef, base_graphdef=base.graphdef,
                                   scfg=mac.step_config(c), optimizer=optimizer))
  p, state = params, optimizer.init(params)
  for i in range(60):
    p, state, m = step(p, state, base.params, batch, jax.random.key(i))
  m_KxTxD = mac.amortize(graphdef, p, tokens, mask)
  own = nll_of(p, m_KxTxD)[0] / count
  other = nll_of(p, jnp.roll(m_KxTxD, 1, axis=0))[0] / count
  assert float((own - other).max()) < -0.5, (own, other)


def test_the_validation_control_is_another_bank_of_the_same_size():
  # Meta-val of 7 documents in banks of 3: [3, 3, 1]. Each batch's other bank holds as many documents as its
  # own (a bank's size changes the prefix: one pass up to `window` documents, hierarchical levels above), none
  # of its own; the 3-document batches never get the 1-document one.
  assert [mac.other_bank_of([3, 3, 1], i) for i in range(3)] == [1, 0, 0]
  assert [mac.other_bank_of([8, 8, 8, 8, 2], i) for i in range(5)] == [1, 2, 3, 0, 0]
  assert mac.other_bank_of([5], 0) is None and mac.other_bank_of([2, 8], 1) is None
  base = _base()
  graphdef, params = mac.build(_config(), base)
  tokens, mask = _docs(9)
  vals = [{"doc_tokens_BxL": tokens[3 * b:3 * b + 3], "doc_mask_BxL": mask[3 * b:3 * b + 3],
           "doc_valid_B": np.arange(3) < n} for b, n in enumerate((3, 3, 1))]
  seen = []

  def eval_fn(params, base_params, batch, bank, other_bank, other_valid):
    own = next(b for b, v in enumerate(vals) if v is batch)
    banks = [mac.amortize(graphdef, params, v["doc_tokens_BxL"], v["doc_mask_BxL"]) for v in vals]
    other = next(b for b in range(3) if np.allclose(other_bank, banks[b], atol=1e-5))
    seen.append((own, other, int(np.sum(batch["doc_valid_B"])), int(np.sum(other_valid))))
    return {k: np.ones(1) for k in ("nll", "nll_other_bank", "nll_base", "tokens", "retrieval_hit")}
  validate, _ = mac._validation(graphdef, eval_fn, None, vals)
  validate(params)
  assert seen == [(0, 1, 3, 3), (1, 0, 3, 3), (2, 0, 1, 1)]
