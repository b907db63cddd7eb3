"""Dynamic evaluation: static == dynamic at lr 0, the XL memory == one long forward, every token scored once,
a real adaptation effect, config checks. Tiny random models only."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from camels_jax import checks
from camels_jax.methods import dynamic_eval as de
from camels_jax.models import transformer
from camels_jax.models.config import ModelConfig

LLAMA = ModelConfig(arch="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                    max_len=64, tie_embeddings=False)
GPT2 = ModelConfig(arch="gpt2", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=48, max_len=64)
IDS = list(np.random.default_rng(0).integers(0, 64, size=45))


def _c(**kw):
  c = de.dynamic_config()
  c.update(kw)
  return c


def _model(cfg=LLAMA, seed=0):
  return transformer.init(cfg, seed)


def _reference_nll(graphdef, params, ids) -> np.ndarray:
  """NLL of ids[1:] from one forward over the whole sequence."""
  tokens = np.asarray(ids, np.int32)[None]
  logp = jax.nn.log_softmax(transformer.apply(graphdef, params, tokens[:, :-1]), -1)
  return -np.asarray(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))[0, :, 0]


@pytest.mark.parametrize("context,kw", [
    ("overlap", dict(window=16, stride=5, params="full", optimizer="adam")),
    ("overlap", dict(window=16, stride=16, params="lora", optimizer="sgd", lora_targets="q,v,down", update_every=2)),
    ("xl", dict(chunk=8, memory=16, params="full", optimizer="sgd", grad_clip=1.0)),
    ("xl", dict(chunk=8, memory=0, params="lora", optimizer="adam", lora_targets="q,k,v,o,gate,up,down")),
])
def test_dynamic_with_lr_0_equals_static(context, kw):
  graphdef, params = _model()
  before = jax.tree.map(np.array, params)
  c = _c(context=context, lr=0.0, **kw)
  static = de.score(graphdef, params, LLAMA, IDS, c, dynamic=False)
  dynamic = de.score(graphdef, params, LLAMA, IDS, c, dynamic=True)
  assert static.nll_T.shape == (len(IDS) - 1,) and static.updates == 0
  assert dynamic.updates == de.num_segments(len(IDS), c) // c.update_every > 0
  np.testing.assert_allclose(dynamic.nll_T, static.nll_T, rtol=1e-6, atol=1e-6)
  # The caller's params are neither changed nor donated away.
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  r = de.evaluate(graphdef, params, LLAMA, IDS, c, dynamic=False, progress=False)
  assert r["tokens"] == len(IDS) - 1 and r["updates"] == 0 and r["time_s"] > 0
  np.testing.assert_allclose(r["nll"], static.nll_T.mean(), rtol=1e-12)
  np.testing.assert_allclose(r["ppl"], np.exp(r["nll"]), rtol=1e-12)


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_xl_chunks_with_full_memory_equal_one_long_forward(cfg, chunk):
  graphdef, params = _model(cfg)
  want = _reference_nll(graphdef, params, IDS)
  memory = 48  # >= every earlier token; chunk + memory <= max_len
  for dynamic in (False, True):
    got = de.score(graphdef, params, cfg, IDS, _c(context="xl", chunk=chunk, memory=memory, lr=0.0),
                   dynamic=dynamic).nll_T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_xl_memory_truncates_and_rope_positions_stay_consistent_past_max_len():
  # One layer: a key/value depends on its own token and position only, so a chunk attending to the last
  # `memory` cached tokens sees exactly what a window of memory + chunk tokens sees (RoPE: only position
  # differences matter). The sequence is 3x the model's max_len, so absolute positions run past it.
  cfg = LLAMA.replace(n_layers=1, max_len=24)
  graphdef, params = _model(cfg)
  ids = list(np.random.default_rng(1).integers(0, 64, size=73))
  xl = de.score(graphdef, params, cfg, ids, _c(context="xl", chunk=4, memory=12, lr=0.0), dynamic=False).nll_T
  window = de.score(graphdef, params, cfg, ids, _c(context="overlap", window=16, stride=4, lr=0.0),
                    dynamic=False).nll_T
  np.testing.assert_allclose(xl, window, rtol=1e-5, atol=1e-5)
  # ... and a memory that is too short really forgets (the first chunk past it differs).
  short = de.score(graphdef, params, cfg, ids, _c(context="xl", chunk=4, memory=4, lr=0.0), dynamic=False).nll_T
  assert np.abs(short - xl).max() > 1e-3


def _sliding_reference_nll(graphdef, params, cfg, ids, *, chunk, memory, sinks, adjacent=False) -> np.ndarray:
  """NLL of ids[1:] from one long pass in which token t attends to tokens 0..sinks-1 and to the `memory`
  tokens before its chunk and its chunk up to itself, at its absolute position: fed one token at a time, each
  with its own row of that mask over a cache of the whole sequence. `adjacent`: for the query, the sinks' keys
  sit just before the oldest token its chunk remembers (rotated there from their own positions)."""
  n = len(ids)

  def one(params, token, t, row, cache, shift):
    k = cache.k_NxBxSxKxE
    stored = k[:, :, :sinks]
    moved = jax.vmap(lambda x: transformer.rope(x, jnp.full(x.shape[:2], shift), cfg.rope_theta))(stored)
    cache = cache._replace(k_NxBxSxKxE=k.at[:, :, :sinks].set(moved), mask_BxS=row, index=t)
    logits, cache = transformer.decode_step(graphdef, params, token, t[None, None], jnp.ones((1, 1), jnp.int32),
                                            cache)
    return logits, cache._replace(k_NxBxSxKxE=cache.k_NxBxSxKxE.at[:, :, :sinks].set(
        jnp.where(t < sinks, cache.k_NxBxSxKxE[:, :, :sinks], stored)))

  step = jax.jit(one)
  cache = transformer.empty_cache(cfg, 1, n)
  nll = []
  for t in range(n - 1):
    j = np.arange(n)
    start = (t // chunk) * chunk
    row = ((j < sinks) | (j >= start - memory)) & (j < t)
    shift = max(start - memory - sinks, 0) if adjacent else 0
    logits, cache = step(params, jnp.asarray([[ids[t]]], jnp.int32), jnp.asarray(t, jnp.int32),
                         jnp.asarray(row[None], jnp.int32), cache, jnp.asarray(shift, jnp.int32))
    nll.append(-jax.nn.log_softmax(logits[0, 0])[ids[t + 1]])
  return np.asarray(nll)


@pytest.mark.parametrize("positions", ["absolute", "adjacent"])
@pytest.mark.parametrize("chunk,memory,sinks", [(4, 8, 2), (4, 8, 4), (1, 5, 1), (6, 3, 5), (5, 0, 3)])
def test_xl_with_sinks_equals_one_long_forward_with_sinks_and_a_sliding_window(chunk, memory, sinks, positions):
  # Three layers and a sequence 3x max_len: keys and values of the memory were computed with their own
  # (shorter) context, which the one-token-at-a-time reference reproduces exactly.
  cfg = LLAMA.replace(n_layers=3, max_len=24)
  graphdef, params = _model(cfg)
  ids = list(np.random.default_rng(3).integers(0, 64, size=73))
  want = _sliding_reference_nll(graphdef, params, cfg, ids, chunk=chunk, memory=memory, sinks=sinks,
                                adjacent=positions == "adjacent")
  c = _c(context="xl", chunk=chunk, memory=memory, sinks=sinks, sink_positions=positions, lr=0.0)
  for dynamic in (False, True):
    got = de.score(graphdef, params, cfg, ids, c, dynamic=dynamic).nll_T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The sinks change what is scored once the first tokens have left the memory, and only then.
  plain = de.score(graphdef, params, cfg, ids, _c(context="xl", chunk=chunk, memory=memory, lr=0.0),
                   dynamic=False).nll_T
  first_without = max(1, ((memory + 1 + chunk - 1) // chunk) * chunk)  # the first chunk whose memory lost token 0
  np.testing.assert_allclose(got[:first_without - 1], plain[:first_without - 1], rtol=1e-5, atol=1e-5)
  assert np.abs(got - plain).max() > 1e-3


def test_adjacent_sinks_differ_from_absolute_ones_only_once_the_memory_slides():
  cfg = LLAMA.replace(n_layers=2, max_len=24)
  graphdef, params = _model(cfg)
  ids = list(np.random.default_rng(4).integers(0, 64, size=60))
  got = {p: de.score(graphdef, params, cfg, ids, _c(context="xl", chunk=4, memory=8, sinks=2, sink_positions=p,
                                                       lr=0.0), dynamic=False).nll_T
         for p in ("absolute", "adjacent")}
  # Chunks starting at <= memory + sinks = 10 (tokens 0..11) see the sinks where they are.
  np.testing.assert_allclose(got["adjacent"][:11], got["absolute"][:11], rtol=1e-6, atol=1e-6)
  assert np.abs(got["adjacent"][12:] - got["absolute"][12:]).max() > 1e-4


def test_sinks_within_a_full_memory_change_nothing():
  graphdef, params = _model()
  want = _reference_nll(graphdef, params, IDS)
  got = de.score(graphdef, params, LLAMA, IDS, _c(context="xl", chunk=8, memory=48, sinks=4, lr=0.0),
                 dynamic=False).nll_T
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_overlap_with_stride_equal_to_window_is_non_overlapping_windows():
  graphdef, params = _model()
  window = 10
  got = de.score(graphdef, params, LLAMA, IDS, _c(context="overlap", window=window, stride=window, lr=0.0),
                 dynamic=False).nll_T
  want = np.concatenate([_reference_nll(graphdef, params, IDS[i:i + window + 1])
                         for i in range(0, len(IDS) - 1, window)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,window,stride", [(2, 1, 1), (45, 16, 5), (45, 16, 1), (17, 16, 3), (100, 7, 7),
                                             (30, 64, 8), (64, 8, 7)])
def test_a_smaller_stride_scores_every_token_exactly_once_with_a_full_window(n, window, stride):
  c = _c(context="overlap", window=window, stride=stride)
  times = np.zeros(n, int)
  segs = list(de.segments(n, c))
  assert len(segs) == de.num_segments(n, c)
  for s in segs:
    assert 1 <= s.length <= window and 0 <= s.first < s.length
    labels = s.start + 1 + np.arange(s.first, s.length)
    times[labels] += 1
    if s.start > 0:  # a later window scores its tokens with its full window of context
      assert s.first == window - stride or s.start + s.length == n - 1
  assert times[0] == 0 and (times[1:] == 1).all()
  xl = _c(context="xl", chunk=stride, memory=0)
  assert sorted(t for s in de.segments(n, xl) for t in range(s.start + 1, s.start + s.length + 1)) == list(range(1, n))


def test_overlap_scores_a_token_with_the_window_that_ends_at_it():
  graphdef, params = _model()
  window, stride = 16, 5
  got = de.score(graphdef, params, LLAMA, IDS, _c(context="overlap", window=window, stride=stride, lr=0.0),
                 dynamic=False).nll_T
  for t in (1, 16, 17, 21, 22, 40, 44):  # target index t: predicted from the window it was scored in
    seg = next(s for s in de.segments(len(IDS), _c(window=window, stride=stride))
               if s.start + s.first < t <= s.start + s.length)
    ref = _reference_nll(graphdef, params, IDS[seg.start:t + 1])[-1]
    np.testing.assert_allclose(got[t - 1], ref, rtol=1e-5, atol=1e-5)


def _repetitive(period=12, repeats=16, seed=3):
  return list(np.tile(np.random.default_rng(seed).integers(0, 64, size=period), repeats))


@pytest.mark.parametrize("kw", [
    dict(context="overlap", window=8, stride=8, params="full", optimizer="adam", lr=3e-3),
    dict(context="xl", chunk=8, memory=0, params="lora", lora_rank=4, lora_targets="q,v,o,down",
         optimizer="adam", lr=3e-2, grad_clip=1.0),
    dict(context="xl", chunk=4, memory=4, params="full", optimizer="sgd", lr=0.5, update_every=2),
], ids=["overlap-full-adam", "xl-lora-adam", "xl-full-sgd-k2"])
def test_dynamic_evaluation_learns_a_repeated_pattern(kw):
  # The windows are shorter than the pattern's period, so no context ever holds the previous repetition:
  # only the weights can remember it.
  graphdef, params = _model()
  ids = _repetitive()
  c = _c(**kw)
  static = de.score(graphdef, params, LLAMA, ids, c, dynamic=False).nll_T
  dynamic = de.score(graphdef, params, LLAMA, ids, c, dynamic=True)
  assert dynamic.updates == de.num_segments(len(ids), c) // c.update_every
  assert dynamic.nll_T.mean() < static.mean() - 1.0, (static.mean(), dynamic.nll_T.mean())
  # The effect grows with the repetitions: the last repetition is predicted far better than the first.
  assert dynamic.nll_T[-12:].mean() < dynamic.nll_T[:11].mean() - 1.0


def test_update_every_k_accumulates_before_stepping():
  # With k = 3 the first three chunks are scored with the initial params, the fourth with updated ones.
  graphdef, params = _model()
  c = _c(context="xl", chunk=4, memory=8, optimizer="sgd", lr=1.0, update_every=3)
  static = de.score(graphdef, params, LLAMA, IDS, c, dynamic=False).nll_T
  dynamic = de.score(graphdef, params, LLAMA, IDS, c, dynamic=True)
  np.testing.assert_allclose(dynamic.nll_T[:12], static[:12], rtol=1e-6, atol=1e-6)
  assert np.abs(dynamic.nll_T[12:16] - static[12:16]).min() > 1e-4
  assert dynamic.updates == 11 // 3
  # k larger than the number of chunks: no step is ever taken.
  never = de.score(graphdef, params, LLAMA, IDS, _c(**{**c.to_dict(), "update_every": 100}), dynamic=True)
  assert never.updates == 0
  np.testing.assert_allclose(never.nll_T, static, rtol=1e-6, atol=1e-6)


def test_a_lora_run_trains_only_adapters():
  graphdef, params = _model()
  c = _c(context="xl", chunk=8, memory=8, params="lora", lora_rank=2, lora_targets="q,gate", lr=1e-2)
  s = de.score(graphdef, params, LLAMA, IDS, c, dynamic=True)
  assert set(s.trainable) == {"q", "gate"}
  assert float(jnp.abs(s.trainable["q"]["b"]).max()) > 0  # the adapters moved
  full = de.score(graphdef, params, LLAMA, IDS, _c(**{**c.to_dict(), "params": "full"}), dynamic=True)
  assert isinstance(full.trainable, nnx.State)


def _keys(found):
  return [m.split("=", 1)[0] for m in found]


@pytest.mark.parametrize("key,value", [("chunk", 0), ("chunk", -3), ("window", 0), ("context", "ring"),
                                       ("optimizer", "adagrad"), ("params", "bias"), ("lr", -1e-3),
                                       ("memory", -1), ("update_every", 0), ("lora_targets", "q,lm_head"),
                                       ("grad_clip", -1.0), ("lora_rank", 0)])
def test_a_bad_value_is_reported_under_its_key(key, value):
  c = _loose(de.dynamic_config())
  c[key] = value
  found = checks.violations(c, de.RULES, de.CROSS)
  assert _keys(found) == [key], found
  found = checks.violations(ml_collections.ConfigDict({"dynamic": c}), {"dynamic": de.RULES},
                            checks.within("dynamic", de.CROSS))
  assert _keys(found) == [f"dynamic.{key}"], found


def _loose(c):
  """A copy whose fields take values of any type."""
  return ml_collections.ConfigDict(c.to_dict(), type_safe=False)


def test_stride_above_window_and_every_numeric_field_has_a_rule():
  c = _c(window=8, stride=9)
  assert checks.violations(c, de.RULES, de.CROSS) == [
      "stride=9 must be <= window=8: windows moved by more than their length would leave tokens unscored"]
  assert checks.violations(_c(context="xl", window=8, stride=9), de.RULES, de.CROSS) == []  # unused in xl
  assert set(de.RULES) == set(c.keys())
  assert checks.violations(de.dynamic_config(), de.RULES, de.CROSS) == []
  for key, rule in de.RULES.items():
    assert not rule(rule.bad_example), key
  with pytest.raises(checks.ConfigError, match="dynamic.stride=9"):
    de.score(*_model(), LLAMA, IDS, c, dynamic=False)


def test_model_dependent_limits_are_one_clear_error():
  with pytest.raises(checks.ConfigError, match=r"dynamic.window=65 exceeds the model's max_len=64"):
    de.check_model(_c(window=65, stride=8), LLAMA)
  with pytest.raises(checks.ConfigError, match=r"dynamic.chunk=32 \+ dynamic.memory=40 \+ dynamic.sinks=0 = 72 "):
    de.check_model(_c(context="xl", chunk=32, memory=40), GPT2)
  with pytest.raises(checks.ConfigError, match=r"dynamic.chunk=32 \+ dynamic.memory=30 \+ dynamic.sinks=4 = 66 "):
    de.check_model(_c(context="xl", chunk=32, memory=30, sinks=4), GPT2)
  with pytest.raises(checks.ConfigError, match=r"dynamic.sinks=9 must be <= dynamic.chunk=8"):
    de.score(*_model(), LLAMA, IDS, _c(context="xl", chunk=8, memory=8, sinks=9), dynamic=False)
  de.check_model(_c(context="xl", chunk=32, memory=32, window=1000, stride=1), GPT2)  # window unused in xl
  with pytest.raises(checks.ConfigError) as e:
    de.check_model(_c(window=32, params="lora", lora_rank=17, lora_targets="q,k"), LLAMA)  # k is 32 x 16
  assert "1 invalid field(s)" in str(e.value) and "dynamic.lora_rank=17 exceeds the width of projection(s) k (32x16)" \
      in str(e.value)
  with pytest.raises(checks.ConfigError, match="dynamic.lora_targets='q,gate'.*gpt2 model has no projection"):
    de.check_model(_c(window=32, params="lora", lora_targets="q,gate"), GPT2)
  de.check_model(_c(window=32, params="full", lora_rank=1000, lora_targets="gate"), GPT2)  # lora fields unused
  with pytest.raises(ValueError, match="at least 2"):
    de.score(*_model(), LLAMA, [5], _c(window=16, stride=16), dynamic=False)


def test_gpt2_xl_runs_past_max_len_and_is_exact_while_the_memory_fills():
  # Learned positions: a chunk's positions start at the number of tokens in memory, so they never pass
  # memory + chunk <= max_len; while the memory is filling they are the absolute positions.
  cfg = GPT2.replace(max_len=16)
  graphdef, params = _model(cfg)
  ids = list(np.random.default_rng(2).integers(0, 64, size=70))
  for memory, sinks in ((12, 0), (10, 2)):
    got = de.score(graphdef, params, cfg, ids, _c(context="xl", chunk=4, memory=memory, sinks=sinks, lr=0.0),
                   dynamic=False).nll_T
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[:16], _reference_nll(graphdef, params, ids[:17]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_each_step_function_compiles_once(dynamic, caplog):
  graphdef, params = _model()
  c = _c(context="xl", chunk=8, memory=8, params="lora", lr=1e-3)  # 44 targets: 6 chunks, the last one padded
  with jax.log_compiles(True), caplog.at_level("WARNING", logger="jax"):
    de.score(graphdef, params, LLAMA, IDS, c, dynamic=dynamic)
  name = "_update_step" if dynamic else "_score_step"
  assert sum(r.getMessage().startswith(f"Compiling jit({name})") for r in caplog.records) == 1


def test_rms_with_lr_0_and_decay_0_equals_static():
  graphdef, params = _model()
  c = _c(context="overlap", window=16, stride=8, optimizer="rms", lr=0.0, decay=0.0, stat_segments=3)
  rms = de.gradient_rms(graphdef, params, LLAMA, IDS[::-1], c)
  static = de.score(graphdef, params, LLAMA, IDS, c, dynamic=False)
  dynamic = de.score(graphdef, params, LLAMA, IDS, c, dynamic=True, rms=rms)
  assert dynamic.updates > 0
  np.testing.assert_allclose(dynamic.nll_T, static.nll_T, rtol=1e-6, atol=1e-6)
  # A real step changes the scores, and decay pulls them back towards static.
  moved = de.score(graphdef, params, LLAMA, IDS, _c(**{**c, "lr": 3e-3}), dynamic=True, rms=rms).nll_T
  pulled = de.score(graphdef, params, LLAMA, IDS, _c(**{**c, "lr": 3e-3, "decay": 2.0}), dynamic=True,
                    rms=rms).nll_T
  assert np.abs(moved - static.nll_T).max() > 1e-2
  assert np.abs(pulled - static.nll_T).mean() < np.abs(moved - static.nll_T).mean()
  # A step that diverges is a result (NaN or inf NLLs), not an error.
  diverged = de.score(graphdef, params, LLAMA, IDS, _c(**{**c, "lr": 1e30}), dynamic=True, rms=rms).nll_T
  assert not np.isfinite(diverged).all()
  with pytest.raises(ValueError, match="needs the gradient RMS"):
    de.score(graphdef, params, LLAMA, IDS, c, dynamic=True)


def test_rms_update_is_krauses_formula_with_the_pull_capped_at_1():
  rms = {"a": jnp.array([1.0, 3.0]), "b": jnp.array([0.0, 4.0])}  # mean rms 2
  opt = de.rms_decay(lr=0.1, decay=0.8, rms=rms, eps=0.5)  # eps * mean(rms) = 1
  theta0 = {"a": jnp.array([1.0, 1.0]), "b": jnp.array([2.0, 2.0])}
  state = opt.init(theta0)
  theta = {"a": jnp.array([0.0, 3.0]), "b": jnp.array([2.5, 0.0])}
  g = {"a": jnp.array([2.0, 3.0]), "b": jnp.array([1.0, -8.0])}
  updates, _ = opt.update(g, state, theta)
  pull = {"a": [0.4, 1.0], "b": [0.0, 1.0]}  # 0.8 * rms / 2, capped at 1
  for k in ("a", "b"):
    want = [-0.1 * gi / (ri + 1.0) + p * (t0 - t)
            for gi, ri, p, t0, t in zip(g[k], rms[k], pull[k], theta0[k], theta[k])]
    np.testing.assert_allclose(updates[k], want, rtol=1e-6)


def test_gradient_rms_is_the_rms_of_each_segments_gradient():
  graphdef, params = _model()
  c = _c(context="overlap", window=10, stride=10, optimizer="rms", stat_segments=3)
  got = de.gradient_rms(graphdef, params, LLAMA, IDS, c)

  def window_loss(p, start):
    tokens = jnp.asarray(IDS[start:start + 11], jnp.int32)[None]
    logp = jax.nn.log_softmax(transformer.apply(graphdef, p, tokens[:, :-1]), -1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

  grads = [jax.grad(window_loss)(params, s) for s in (0, 10, 20)]
  want = jax.tree.map(lambda *g: jnp.sqrt(sum(x ** 2 for x in g) / 3), *grads)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_rms_needs_full_params():
  with pytest.raises(checks.ConfigError, match="optimizer='rms' needs dynamic.params='full'"):
    de.score(*_model(), LLAMA, IDS, _c(window=16, stride=16, optimizer="rms", params="lora"), dynamic=False)
