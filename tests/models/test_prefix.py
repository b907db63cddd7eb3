"""The attention prefix (transformer.Prefix): a separate softmax over P slots per layer, added to attention.

Zero prefix values are exactly the unconditioned model; a nonzero prefix conditions each row on its own
slots only; the cached decoders and the QA evaluation see the same prefix the full forward does.
"""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from camels_jax import qa
from camels_jax.data import pipeline
from camels_jax.models import decoding, transformer
from camels_jax.models.config import ModelConfig
from tests import test_qa
from tests.models import test_decoding

V, EOS = test_decoding.V, test_decoding.EOS
LLAMA = test_decoding.CFG  # grouped-query attention (4 heads, 2 kv heads), untied head
GPT2 = ModelConfig(arch="gpt2", vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=48,
                   max_len=64)
P = 3  # prefix slots
PROMPTS = test_decoding.PROMPTS  # three prompts of lengths 4, 2 and 7

_apply = jax.jit(transformer.apply, static_argnums=0)
_MODELS = {}


def _model(cfg: ModelConfig):
  """One random model per architecture for the whole file (an eager init compiles op by op)."""
  if cfg not in _MODELS:
    _MODELS[cfg] = transformer.init(cfg, seed=1)
  return _MODELS[cfg]


def _random_prefix(cfg: ModelConfig, batch: int, seed: int, values: bool = True, size: int = P):
  """Keys N(0, 4); values N(0, 1/4) or exactly zero (numpy's generator: no eager jax.random compiles).

  Values of that size move the tiny models' predictions without swamping them (much larger ones make every
  row answer the same token, and beam search end at once), so the decoding tests exercise real searches.
  """
  rng = np.random.default_rng(seed)
  shape = (cfg.n_layers, batch, size, cfg.n_kv_heads, cfg.head_dim)
  k_NxBxPxKxE = 2.0 * rng.standard_normal(shape)
  v_NxBxPxKxE = 0.5 * rng.standard_normal(shape) if values else np.zeros(shape)
  dtype = jnp.float64 if cfg.compute_dtype == jnp.float64 else jnp.float32
  return transformer.Prefix(jnp.asarray(k_NxBxPxKxE, dtype), jnp.asarray(v_NxBxPxKxE, dtype))


def _rows(prefix: transformer.Prefix, rows) -> transformer.Prefix:
  """The prefix of some batch rows (the batch axis is 1)."""
  rows = np.asarray(rows)
  return transformer.Prefix(prefix.k_NxBxPxKxE[:, rows], prefix.v_NxBxPxKxE[:, rows])


def _padded_batch():
  """Two rows of width 9: the first full, the second left-padded by 3."""
  tokens_BxL = np.array([[3, 14, 1, 7, 9, 22, 2, 11, 6],
                         [0, 0, 0, 8, 15, 4, 19, 12, 10]])
  mask_BxL = np.array([[1] * 9, [0] * 3 + [1] * 6])
  return tokens_BxL, mask_BxL


# ------------------------------------------------------------------------------------------------
# 1. Zero values: the unconditioned model, exactly.


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_zero_prefix_values_leave_logits_exactly_unchanged_whatever_the_keys(cfg):
  graphdef, params = _model(cfg)
  tokens_BxL, mask_BxL = _padded_batch()
  prefix = _random_prefix(cfg, 2, seed=5, values=False)
  assert float(jnp.abs(prefix.k_NxBxPxKxE).min()) > 0  # the keys are really nonzero
  # Row 0 is unpadded, row 1 left-padded.
  want_BxLxV = np.asarray(_apply(graphdef, params, tokens_BxL, mask_BxL))
  np.testing.assert_array_equal(np.asarray(_apply(graphdef, params, tokens_BxL, mask_BxL, prefix)), want_BxLxV)
  zero = transformer.zero_prefix(cfg, 2, P)
  assert zero.k_NxBxPxKxE.shape == zero.v_NxBxPxKxE.shape == (cfg.n_layers, 2, P, cfg.n_kv_heads, cfg.head_dim)
  np.testing.assert_array_equal(np.asarray(_apply(graphdef, params, tokens_BxL, mask_BxL, zero)), want_BxLxV)


# ------------------------------------------------------------------------------------------------
# 2. A nonzero prefix conditions its own row, and only it.


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_nonzero_prefix_changes_logits_and_rows_are_independent(cfg):
  graphdef, params = _model(cfg)
  tokens_BxL, mask_BxL = _padded_batch()
  prefix = _random_prefix(cfg, 2, seed=7)
  plain_BxLxV = np.asarray(_apply(graphdef, params, tokens_BxL, mask_BxL))
  got_BxLxV = np.asarray(_apply(graphdef, params, tokens_BxL, mask_BxL, prefix))
  real_BxL = mask_BxL.astype(bool)
  assert np.abs(got_BxLxV - plain_BxLxV)[real_BxL].min(-1).max() > 0  # some position moves
  assert np.abs(got_BxLxV - plain_BxLxV)[real_BxL].max() > 0.05  # and not by rounding
  for i in range(2):
    alone_1xLxV = np.asarray(_apply(graphdef, params, tokens_BxL[i:i + 1], mask_BxL[i:i + 1],
                                    _rows(prefix, [i])))
    np.testing.assert_allclose(got_BxLxV[i][real_BxL[i]], alone_1xLxV[0][real_BxL[i]], atol=1e-5, rtol=1e-5)
  # Row 1 with row 0's prefix is another model: the prefix really is per row.
  swapped_BxLxV = np.asarray(_apply(graphdef, params, tokens_BxL, mask_BxL, _rows(prefix, [1, 0])))
  assert np.abs(swapped_BxLxV - got_BxLxV)[1][real_BxL[1]].max() > 0.05
  # Prefix slots have no position: a left-padded row equals the same tokens unpadded.
  unpadded_1xLxV = np.asarray(_apply(graphdef, params, tokens_BxL[1:, 3:], None, _rows(prefix, [1])))
  np.testing.assert_allclose(got_BxLxV[1, 3:], unpadded_1xLxV[0], atol=1e-5, rtol=1e-5)


def test_prefix_slots_are_an_unordered_set():
  """Permuting the P slots changes nothing: they have no position."""
  graphdef, params = _model(LLAMA)
  tokens_BxL, mask_BxL = _padded_batch()
  prefix = _random_prefix(LLAMA, 2, seed=9)
  want_BxLxV = np.asarray(_apply(graphdef, params, tokens_BxL, mask_BxL, prefix))
  perm = np.array([2, 0, 1])
  permuted = transformer.Prefix(prefix.k_NxBxPxKxE[:, :, perm], prefix.v_NxBxPxKxE[:, :, perm])
  np.testing.assert_allclose(np.asarray(_apply(graphdef, params, tokens_BxL, mask_BxL, permuted)), want_BxLxV,
                             atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# 3. An explicit reference, and gradients.


def _reference_one_layer_llama(model, tokens_L, pk_PxKxE, pv_PxKxE):
  """float64 numpy forward of a 1-layer llama whose attention adds a separate softmax over the prefix."""
  cfg = model.cfg
  w = lambda var: np.asarray(var[...], np.float64)
  h_heads, k_heads, e = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  g = h_heads // k_heads
  l = len(tokens_L)

  def rms(x, scale):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * scale

  def rope(x_LxHxE):
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, e, 2) / e)
    ang_LxE = np.concatenate([np.arange(l)[:, None] * inv_freq] * 2, axis=-1)[:, None, :]
    x1, x2 = x_LxHxE[..., :e // 2], x_LxHxE[..., e // 2:]
    return x_LxHxE * np.cos(ang_LxE) + np.concatenate([-x2, x1], -1) * np.sin(ang_LxE)

  blk = model.blocks
  x_LxD = w(model.embed.embedding)[tokens_L]
  a_LxD = rms(x_LxD, w(blk.ln1.scale)[0])
  q_LxHxE = rope((a_LxD @ w(blk.attn.q.kernel)[0]).reshape(l, h_heads, e))
  k_LxKxE = rope((a_LxD @ w(blk.attn.k.kernel)[0]).reshape(l, k_heads, e))
  v_LxKxE = (a_LxD @ w(blk.attn.v.kernel)[0]).reshape(l, k_heads, e)
  pk_PxKxE, pv_PxKxE = np.asarray(pk_PxKxE, np.float64), np.asarray(pv_PxKxE, np.float64)
  out_LxHxE = np.zeros((l, h_heads, e))
  for hd in range(h_heads):
    kv = hd // g  # query head hd reads kv head hd // G
    for t in range(l):
      s = k_LxKxE[:t + 1, kv] @ q_LxHxE[t, hd] / math.sqrt(e)
      p = np.exp(s - s.max())
      out_LxHxE[t, hd] = (p / p.sum()) @ v_LxKxE[:t + 1, kv]
      ps = pk_PxKxE[:, kv] @ q_LxHxE[t, hd] / math.sqrt(e)  # the prefix keys carry no rotary embedding
      pp = np.exp(ps - ps.max())
      out_LxHxE[t, hd] += (pp / pp.sum()) @ pv_PxKxE[:, kv]
  x_LxD = x_LxD + out_LxHxE.reshape(l, h_heads * e) @ w(blk.attn.o.kernel)[0]
  m_LxD = rms(x_LxD, w(blk.ln2.scale)[0])
  gate = m_LxD @ w(blk.mlp.gate.kernel)[0]
  x_LxD = x_LxD + (gate / (1 + np.exp(-gate)) * (m_LxD @ w(blk.mlp.up.kernel)[0])) @ w(blk.mlp.down.kernel)[0]
  return rms(x_LxD, w(model.ln_f.scale)) @ w(model.lm_head.kernel)


def test_prefix_matches_an_explicit_one_layer_reference():
  cfg = LLAMA.replace(n_layers=1)
  graphdef, _ = transformer.abstract(cfg)
  params = transformer.first_layers(_model(LLAMA)[1], 1)
  model = nnx.merge(graphdef, params)
  tokens_L = np.array([3, 14, 1, 7, 9, 22, 2])
  prefix = _random_prefix(cfg, 1, seed=11)
  want_LxV = _reference_one_layer_llama(model, tokens_L, prefix.k_NxBxPxKxE[0, 0], prefix.v_NxBxPxKxE[0, 0])
  got_LxV = np.asarray(_apply(graphdef, params, tokens_L[None], None, prefix))[0]
  np.testing.assert_allclose(got_LxV, want_LxV, atol=2e-4, rtol=1e-4)
  # The reference is sensitive to the prefix (so the check above is not vacuous).
  plain_LxV = _reference_one_layer_llama(model, tokens_L, prefix.k_NxBxPxKxE[0, 0], 0 * prefix.v_NxBxPxKxE[0, 0])
  assert np.abs(plain_LxV - want_LxV).max() > 0.05
  np.testing.assert_allclose(np.asarray(_apply(graphdef, params, tokens_L[None]))[0], plain_LxV,
                             atol=2e-4, rtol=1e-4)


def test_prefix_gradient_matches_central_finite_differences():
  _, params32 = _model(LLAMA)  # cast inside: an eager float64 init would compile op by op
  with jax.enable_x64(True):
    _check_prefix_gradient(LLAMA.replace(dtype="float64", param_dtype="float64"), params32)


def _check_prefix_gradient(cfg, params32):
  graphdef, _ = transformer.abstract(cfg)
  params = jax.jit(lambda p: transformer.cast(p, jnp.float64))(params32)
  tokens_BxL, mask_BxL = _padded_batch()
  prefix = _random_prefix(cfg, 2, seed=13)
  assert prefix.k_NxBxPxKxE.dtype == jnp.float64
  weights_BxLxV = jnp.asarray(np.random.default_rng(0).standard_normal(tokens_BxL.shape + (V,)), jnp.float64)

  @jax.jit
  def f(prefix):
    logits = transformer.apply(graphdef, params, tokens_BxL, mask_BxL, prefix)
    assert logits.dtype == jnp.float64
    return (jnp.tanh(logits) * weights_BxLxV * mask_BxL[..., None]).sum()

  grad = jax.jit(jax.grad(f))(prefix)
  coords = [(0, 0, 0, 0, 0), (1, 1, 2, 1, 5), (0, 1, 1, 0, 7), (1, 0, 2, 1, 3)]
  eps = 1e-5
  for field in ("k_NxBxPxKxE", "v_NxBxPxKxE"):
    for c in coords:
      x = getattr(prefix, field)
      up = prefix._replace(**{field: x.at[c].add(eps)})
      down = prefix._replace(**{field: x.at[c].add(-eps)})
      fd = (float(f(up)) - float(f(down))) / (2 * eps)
      got = float(getattr(grad, field)[c])
      assert abs(fd) > 1e-6, (field, c)  # every checked coordinate matters
      assert got == pytest.approx(fd, rel=1e-6, abs=1e-9), (field, c)


# ------------------------------------------------------------------------------------------------
# 4. The KV-cache decoders see the prefix the full forward sees.


@pytest.fixture(scope="module")
def model():
  return _model(LLAMA)


def test_decode_step_prefill_and_steps_with_a_prefix_equal_the_full_forward(model):
  graphdef, params = model
  tokens_BxL, mask_BxL = _padded_batch()
  prefix = _random_prefix(LLAMA, 2, seed=17)
  want_BxLxV = np.asarray(_apply(graphdef, params, tokens_BxL, mask_BxL, prefix))
  pos_BxL = np.asarray(transformer.positions(mask_BxL))
  decode_step = jax.jit(transformer.decode_step, static_argnums=0)
  cache = transformer.empty_cache(LLAMA, 2, 12)  # longer than the 9 tokens fed
  logits, cache = decode_step(graphdef, params, tokens_BxL[:, :6], pos_BxL[:, :6], mask_BxL[:, :6], cache, prefix)
  got = [np.asarray(logits)]
  for t in range(6, 9):
    logits, cache = decode_step(graphdef, params, tokens_BxL[:, t:t + 1], pos_BxL[:, t:t + 1],
                                mask_BxL[:, t:t + 1], cache, prefix)
    got.append(np.asarray(logits))
  got_BxLxV = np.concatenate(got, axis=1)
  real_BxL = mask_BxL.astype(bool)  # a padding query sees no key, so its output is arbitrary
  np.testing.assert_allclose(got_BxLxV[real_BxL], want_BxLxV[real_BxL], atol=1e-5, rtol=1e-5)
  plain_BxLxV = np.asarray(_apply(graphdef, params, tokens_BxL, mask_BxL))
  assert np.abs(got_BxLxV - plain_BxLxV)[real_BxL][-1].max() > 0.05  # the last step really used it


def test_greedy_with_a_prefix_equals_teacher_forced_argmax(model):
  graphdef, params = model
  tokens_BxP, mask_BxP = test_decoding._left_pad(PROMPTS)
  prefix = _random_prefix(LLAMA, len(PROMPTS), seed=37)
  out = decoding.greedy(graphdef, params, tokens_BxP, mask_BxP, prefix, cfg=LLAMA, max_new_tokens=8, eos_id=EOS)
  # Teacher forcing: prompt + generated tokens, right-padded to one width, through the full forward.
  seqs, gens = [], []
  for row, prompt in enumerate(PROMPTS):
    length = int(out.length_B[row])
    gen = [int(t) for t in np.asarray(out.tokens_BxT[row])]
    assert length == (gen.index(EOS) + 1 if EOS in gen else len(gen))
    assert all(t == EOS for t in gen[length:])
    seqs.append(prompt + gen[:length])
    gens.append(gen[:length])
  width = 16
  seq_BxW = np.array([q + [0] * (width - len(q)) for q in seqs])
  mask_BxW = np.array([[1] * len(q) + [0] * (width - len(q)) for q in seqs])
  argmax_BxW = np.argmax(np.asarray(_apply(graphdef, params, seq_BxW, mask_BxW, prefix)), -1)
  plain_BxW = np.argmax(np.asarray(_apply(graphdef, params, seq_BxW, mask_BxW)), -1)
  differs = 0
  for row, (prompt, gen) in enumerate(zip(PROMPTS, gens)):
    cols = slice(len(prompt) - 1, len(prompt) - 1 + len(gen))
    assert list(argmax_BxW[row, cols]) == gen, row
    differs += int((plain_BxW[row, cols] != gen).sum())
  assert differs > 0, "the prefix should change some greedy choice"
  assert sorted(map(len, gens)) == [5, 8, 8]  # one row stops at EOS, two run out of budget


# ------------------------------------------------------------------------------------------------
# 5. Beam search with a prefix.


def _prefixed_last_logprobs(prefix_1):
  """test_decoding._last_logprobs, with every sequence conditioned on one row's prefix."""
  repeated = {}

  def last_logprobs(model, seqs, width=16):
    tokens = np.array([q + [0] * (width - len(q)) for q in seqs])
    mask = np.array([[1] * len(q) + [0] * (width - len(q)) for q in seqs])
    last = np.array([len(q) - 1 for q in seqs])
    if len(seqs) not in repeated:
      repeated[len(seqs)] = transformer.Prefix(jnp.repeat(prefix_1.k_NxBxPxKxE, len(seqs), 1),
                                               jnp.repeat(prefix_1.v_NxBxPxKxE, len(seqs), 1))
    logits = np.asarray(_apply(*model, tokens, mask, repeated[len(seqs)]), np.float64)[np.arange(len(seqs)), last]
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))

  return last_logprobs


def test_diverse_beam_search_with_a_prefix_matches_the_reference_loop(model, monkeypatch):
  num_beams, num_groups, penalty = 12, 4, 10.0  # the reference's settings
  graphdef, params = model
  tokens_BxP, mask_BxP = test_decoding._left_pad(PROMPTS)
  prefix = _random_prefix(LLAMA, len(PROMPTS), seed=29)
  kw = dict(cfg=LLAMA, max_new_tokens=8, eos_id=EOS, num_beams=num_beams, num_groups=num_groups,
            diversity_penalty=penalty)
  out = decoding.diverse_beam_search(graphdef, params, tokens_BxP, mask_BxP, prefix, **kw)
  differs = 0
  for row, prompt in enumerate(PROMPTS):
    plain = test_decoding.reference_group_beam_search(model, prompt, 8, num_beams, num_groups, penalty)
    with monkeypatch.context() as m:
      m.setattr(test_decoding, "_last_logprobs", _prefixed_last_logprobs(_rows(prefix, [row])))
      want = test_decoding.reference_group_beam_search(model, prompt, 8, num_beams, num_groups, penalty)
    length = int(out.length_B[row])
    assert list(np.asarray(out.tokens_BxT[row])[:length]) == want, row
    differs += want != plain
  assert differs > 0, "the prefix should change some row's answer"
  assert int(np.min(out.length_B)) > 1, "every row should be a real search, not an immediate EOS"


def test_beam_search_rows_with_different_prefixes_equal_each_row_alone(model):
  graphdef, params = model
  tokens_BxP, mask_BxP = test_decoding._left_pad(PROMPTS)
  prefix = _random_prefix(LLAMA, len(PROMPTS), seed=31)
  kw = dict(cfg=LLAMA, max_new_tokens=8, eos_id=EOS, num_beams=12, num_groups=4, diversity_penalty=10.0)
  out = decoding.diverse_beam_search(graphdef, params, tokens_BxP, mask_BxP, prefix, **kw)
  for row in range(len(PROMPTS)):
    alone = decoding.diverse_beam_search(graphdef, params, tokens_BxP[row:row + 1], mask_BxP[row:row + 1],
                                         _rows(prefix, [row]), **kw)
    np.testing.assert_array_equal(np.asarray(alone.tokens_BxT[0]), np.asarray(out.tokens_BxT[row]))
    assert int(alone.length_B[0]) == int(out.length_B[row])


def test_one_beam_one_group_with_a_prefix_is_greedy(model):
  graphdef, params = model
  tokens_BxP, mask_BxP = test_decoding._left_pad(PROMPTS)
  prefix = _random_prefix(LLAMA, len(PROMPTS), seed=43)
  greedy = decoding.greedy(graphdef, params, tokens_BxP, mask_BxP, prefix, cfg=LLAMA, max_new_tokens=8,
                           eos_id=EOS)
  beam = decoding.diverse_beam_search(graphdef, params, tokens_BxP, mask_BxP, prefix, cfg=LLAMA,
                                      max_new_tokens=8, eos_id=EOS, num_beams=1, num_groups=1,
                                      diversity_penalty=0.0)
  np.testing.assert_array_equal(np.asarray(beam.tokens_BxT), np.asarray(greedy.tokens_BxT))
  np.testing.assert_array_equal(np.asarray(beam.length_B), np.asarray(greedy.length_B))
  assert sorted(np.asarray(greedy.length_B).tolist()) == [5, 8, 8]  # both ways of finishing are exercised


# ------------------------------------------------------------------------------------------------
# 6. QA evaluation with a prefix_fn.

QA_CFG = LLAMA


class _IdTokenizer:
  """What qa's generation reads of a tokenizer; an id decodes to its decimal string."""

  pad_id, eos_id = 0, EOS
  backend = types.SimpleNamespace(decode=lambda ids, skip_special_tokens: " ".join(map(str, ids)))


@pytest.fixture(scope="module")
def qa_setup():
  graphdef, params = _model(QA_CFG)
  # Question tokens, then the answer and its EOS; row 2 is padding.
  qas = [test_qa._qa([1, 7, 3, 9], [8, 12, EOS]), test_qa._qa([2, 11], [4, EOS]), None,
         test_qa._qa([4, 4, 8, 15, 6], [20, 1, 6, EOS])]
  batch = pipeline.qa_batch(qas, [0, 1, -1, 2], test_qa.SPEC, _IdTokenizer.pad_id)
  return _IdTokenizer(), graphdef, params, batch, ["8 12", "4", "20 1 6"]


def test_evaluate_qa_zero_value_prefix_fn_is_the_model_alone(qa_setup):
  tok, graphdef, params, batch, golds = qa_setup
  kw = dict(return_predictions=True, max_new_tokens=4, num_beams=2, num_groups=1)
  calls = []

  def zero_values(b):
    calls.append(b)
    return _random_prefix(QA_CFG, len(b["qa_valid_B"]), seed=37, values=False)

  plain = qa.evaluate_qa(graphdef, params, QA_CFG, tok, [batch], golds, "beam", **kw)
  got = qa.evaluate_qa(graphdef, params, QA_CFG, tok, [batch], golds, "beam", prefix_fn=zero_values, **kw)
  assert len(calls) == 1 and calls[0] is batch
  assert got["nll"] == plain["nll"] and got["per_question"]["nll"] == plain["per_question"]["nll"]
  assert [p["answer"] for p in got["predictions"]] == [p["answer"] for p in plain["predictions"]]
  for k in qa.GENERATED_METRICS:
    assert got[k] == plain[k]


def test_evaluate_qa_nonzero_prefix_changes_the_nll_row_by_row(qa_setup):
  tok, graphdef, params, batch, golds = qa_setup
  b = len(batch["qa_valid_B"])
  prefix = _random_prefix(QA_CFG, b, seed=41)
  plain = qa.evaluate_qa(graphdef, params, QA_CFG, tok, [batch], golds, None, return_predictions=True)
  kw = dict(max_new_tokens=4, num_beams=2, num_groups=1)
  got = qa.evaluate_qa(graphdef, params, QA_CFG, tok, [batch], golds, "beam", return_predictions=True,
                       prefix_fn=lambda _: prefix, **kw)
  assert abs(got["nll"] - plain["nll"]) > 1e-3
  assert all(abs(a - c) > 1e-4 for a, c in zip(got["per_question"]["nll"], plain["per_question"]["nll"]))
  # Each question's NLL is its own row's, conditioned on that row's prefix (a hand computation).
  logits_BxSxV = np.asarray(_apply(graphdef, params, batch["qa_tokens_BxS"], batch["qa_mask_BxS"], prefix),
                            np.float64)
  logits_BxSxV -= logits_BxSxV.max(-1, keepdims=True)
  logp_BxSxV = logits_BxSxV - np.log(np.exp(logits_BxSxV).sum(-1, keepdims=True))
  tokens_BxS, loss_BxS = batch["qa_tokens_BxS"], batch["qa_loss_mask_BxS"]
  assert got["n"] == 3
  for i, index in enumerate(batch["qa_index_B"]):
    if index < 0:
      continue
    cols = np.flatnonzero(loss_BxS[i])
    want = -np.mean([logp_BxSxV[i, t - 1, tokens_BxS[i, t]] for t in cols])
    assert got["per_question"]["nll"][index] == pytest.approx(want, rel=1e-5)
  # The generated answers are those of the prefixed model, not the model alone's.
  answers = [p["answer"] for p in got["predictions"]]  # in question order: rows 0, 1 and 3
  by_row = qa.answer(graphdef, params, QA_CFG, tok, batch, "beam", prefix=prefix, **kw)
  assert by_row[2] == "" and answers == [by_row[i] for i in (0, 1, 3)]
  plain_by_row = qa.answer(graphdef, params, QA_CFG, tok, batch, "beam", **kw)
  assert answers != [plain_by_row[i] for i in (0, 1, 3)]
