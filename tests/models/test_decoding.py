"""Greedy and diverse beam search against plain, step-by-step loops over the uncached model."""

import jax
import numpy as np
import pytest

from camels_jax.models import decoding, transformer
from camels_jax.models.config import ModelConfig

V, EOS = 24, 5
CFG = ModelConfig(arch="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                  max_len=64, tie_embeddings=False)


@pytest.fixture(scope="module")
def model():
  graphdef, params = transformer.init(CFG, seed=1)
  # Near-flat next-token distributions make EOS (one token of 24) a frequent candidate, so the
  # finished-hypothesis bookkeeping is exercised on every row.
  return graphdef, params


_apply = jax.jit(transformer.apply, static_argnums=0)


def _last_logprobs(model, seqs, width=16):
  # Right-padded to one width so the jitted model compiles once per batch size.
  tokens = np.array([q + [0] * (width - len(q)) for q in seqs])
  mask = np.array([[1] * len(q) + [0] * (width - len(q)) for q in seqs])
  last = np.array([len(q) - 1 for q in seqs])
  logits = np.asarray(_apply(*model, tokens, mask), np.float64)[np.arange(len(seqs)), last]
  return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
      logits.max(-1, keepdims=True)


def reference_group_beam_search(model, prompt, t_max, num_beams, num_groups, penalty):
  """transformers 4.27 `group_beam_search` + `BeamSearchScorer` (early_stopping=True), one prompt."""
  s, p = num_beams // num_groups, len(prompt)
  beams = [list(prompt) for _ in range(num_beams)]
  scores = [0.0 if i % s == 0 else -1e9 for i in range(num_beams)]
  hyps = [[] for _ in range(num_groups)]
  done = [False] * num_groups

  def add(group, tokens, score):
    if len(group) < s or score > min(h[0] for h in group):
      group.append((score, tokens))
      if len(group) > s:
        group.remove(min(group, key=lambda h: h[0]))

  for t in range(t_max):
    logp = _last_logprobs(model, beams)
    new_beams, new_scores, current = [None] * num_beams, [None] * num_beams, []
    for g in range(num_groups):
      lo = g * s
      if done[g]:
        for j in range(s):
          new_beams[lo + j], new_scores[lo + j] = beams[lo] + [EOS], 0.0
          current.append(EOS)
        continue
      cands = sorted(((logp[lo + j, tok] - penalty * current.count(tok) + scores[lo + j], j, tok)
                      for j in range(s) for tok in range(V)), key=lambda c: -c[0])[:2 * s]
      k = 0
      for rank, (score, j, tok) in enumerate(cands):
        if tok == EOS:
          if rank < s:
            add(hyps[g], beams[lo + j][p:] + [EOS], score / (p + t))
        else:
          new_beams[lo + k], new_scores[lo + k] = beams[lo + j] + [tok], score
          current.append(tok)
          k += 1
        if k == s:
          break
      done[g] = len(hyps[g]) >= s
    beams, scores = new_beams, new_scores
    if all(done):
      break
  for g in range(num_groups):
    if not done[g]:
      for j in range(s):
        add(hyps[g], beams[g * s + j][p:], scores[g * s + j] / (p + t_max))
  return max((h for group in hyps for h in group), key=lambda h: h[0])[1]


def _left_pad(prompts):
  width = max(map(len, prompts))
  tokens = np.array([[EOS] * (width - len(q)) + q for q in prompts])
  mask = np.array([[0] * (width - len(q)) + [1] * len(q) for q in prompts])
  return tokens, mask


PROMPTS = [[1, 7, 3, 9], [2, 11], [4, 4, 8, 15, 6, 20, 1]]


def test_greedy_matches_uncached_argmax_loop(model):
  graphdef, params = model
  tokens, mask = _left_pad(PROMPTS)
  out = decoding.greedy(graphdef, params, tokens, mask, cfg=CFG, max_new_tokens=10, eos_id=EOS)
  for row, prompt in enumerate(PROMPTS):
    seq, want = list(prompt), []
    while len(want) < 10 and EOS not in want:
      want.append(int(np.argmax(_last_logprobs(model, [seq])[0])))
      seq.append(want[-1])
    got = np.asarray(out.tokens_BxT[row])
    assert list(got[:len(want)]) == want
    assert int(out.length_B[row]) == len(want)
    assert (got[len(want):] == EOS).all()


@pytest.mark.parametrize("num_beams,num_groups,penalty", [(12, 4, 10.0), (6, 2, 0.5), (4, 1, 0.0)])
def test_diverse_beam_search_matches_reference_loop(model, num_beams, num_groups, penalty):
  graphdef, params = model
  tokens, mask = _left_pad(PROMPTS)
  out = decoding.diverse_beam_search(graphdef, params, tokens, mask, cfg=CFG, max_new_tokens=8,
                                     eos_id=EOS, num_beams=num_beams, num_groups=num_groups,
                                     diversity_penalty=penalty)
  ended_on_eos = 0
  for row, prompt in enumerate(PROMPTS):
    want = reference_group_beam_search(model, prompt, 8, num_beams, num_groups, penalty)
    length = int(out.length_B[row])
    assert list(np.asarray(out.tokens_BxT[row])[:length]) == want, row
    ended_on_eos += want[-1] == EOS
  assert ended_on_eos > 0, "the case should exercise hypotheses that finish on EOS"
