"""Greedy and diverse (group) beam search with a KV cache, jitted with fixed shapes.

Diverse beam search follows the algorithm of Vijayakumar et al. as implemented by transformers
4.27's `group_beam_search`, which the CaMeLS reference decodes with (12 beams, 4 groups, diversity
penalty 10, 16 new tokens, early_stopping=True, pad = EOS): groups are expanded one after another at
every step; a group's log-probabilities are lowered by `diversity_penalty` times the number of times
each token was just chosen by the earlier groups (including the padding a finished group emits); a
hypothesis ending in EOS is scored by its summed log-probability over (prompt + generated length)
** length_penalty; each group keeps its `num_beams // num_groups` best finished hypotheses, and the
answer is the best over all groups.

Prompts are left-padded (`mask` 0 on the padding) so that every row's last prompt token sits in
the same column.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from camels_jax.models import transformer
from camels_jax.models.config import ModelConfig


class Decoded(NamedTuple):
  tokens_BxT: jax.Array  # generated ids; after EOS (which is kept) the row is filled with EOS
  length_B: jax.Array  # generated tokens up to and including EOS


def _prefill(graphdef, params, cfg: ModelConfig, prompt_BxP, mask_BxP, max_new_tokens, prefix=None):
  cache = transformer.empty_cache(cfg, prompt_BxP.shape[0], prompt_BxP.shape[1] + max_new_tokens)
  pos_BxP = transformer.positions(mask_BxP)
  logits_BxPxV, cache = transformer.decode_step(graphdef, params, prompt_BxP, pos_BxP, mask_BxP, cache, prefix)
  return logits_BxPxV[:, -1], pos_BxP[:, -1], cache


def _step(graphdef, params, tok_B, pos_B, cache, prefix=None):
  logits_Bx1xV, cache = transformer.decode_step(graphdef, params, tok_B[:, None], pos_B[:, None],
                                                jnp.ones_like(tok_B)[:, None], cache, prefix)
  return logits_Bx1xV[:, 0], cache


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_id"))
def greedy(graphdef: nnx.GraphDef, params, prompt_BxP, mask_BxP, prefix=None, *, cfg: ModelConfig,
           max_new_tokens: int, eos_id: int) -> Decoded:
  """Greedy decoding of `max_new_tokens` tokens at most, stopping each row at EOS (conditioned on a
  `transformer.Prefix` of B rows when one is given)."""
  b = prompt_BxP.shape[0]
  logits_BxV, pos_B, cache = _prefill(graphdef, params, cfg, prompt_BxP, mask_BxP, max_new_tokens, prefix)

  # A while loop rather than a scan: it stops as soon as every row has emitted EOS (short answers are the
  # rule), and the tokens it did not generate are EOS, as a finished row's would be.
  def cond(carry):
    t, _, _, _, finished_B, _ = carry
    return (t < max_new_tokens) & ~finished_B.all()

  def body(carry):
    t, logits_BxV, pos_B, cache, finished_B, tokens_BxT = carry
    tok_B = jnp.where(finished_B, eos_id, jnp.argmax(logits_BxV, axis=-1))
    tokens_BxT = jax.lax.dynamic_update_slice(tokens_BxT, tok_B[:, None].astype(tokens_BxT.dtype), (0, t))
    pos_B = pos_B + 1
    logits_BxV, cache = _step(graphdef, params, tok_B, pos_B, cache, prefix)
    return t + 1, logits_BxV, pos_B, cache, finished_B | (tok_B == eos_id), tokens_BxT

  tokens_BxT = jnp.full((b, max_new_tokens), eos_id, jnp.asarray(prompt_BxP).dtype)
  init = (jnp.int32(0), logits_BxV, pos_B, cache, jnp.zeros((b,), bool), tokens_BxT)
  *_, tokens_BxT = jax.lax.while_loop(cond, body, init)
  return Decoded(tokens_BxT, _length(tokens_BxT, eos_id))


def _length(tokens_BxT, eos_id):
  is_eos_BxT = tokens_BxT == eos_id
  first_eos_B = jnp.argmax(is_eos_BxT, axis=-1)
  return jnp.where(is_eos_BxT.any(-1), first_eos_B + 1, tokens_BxT.shape[1])


class _Hyps(NamedTuple):
  """Each group's finished hypotheses (at most S of them); empty slots score -inf."""

  score_BxGxS: jax.Array
  tokens_BxGxSxT: jax.Array
  length_BxGxS: jax.Array  # generated tokens, EOS included


def _keep_best(hyps: _Hyps, g: int, score_BxC, tokens_BxCxT, length_BxC) -> _Hyps:
  """Adds candidates (-inf = not a candidate) to group g, keeping its S best.

  transformers adds finished beams one by one, evicting the worst whenever it holds more than S;
  the set that survives is the S best of old and new, which is what top_k computes at once.
  """
  s = hyps.score_BxGxS.shape[-1]
  all_score = jnp.concatenate([hyps.score_BxGxS[:, g], score_BxC], axis=1)
  all_tokens = jnp.concatenate([hyps.tokens_BxGxSxT[:, g], tokens_BxCxT], axis=1)
  all_length = jnp.concatenate([hyps.length_BxGxS[:, g], length_BxC], axis=1)
  best_score_BxS, idx_BxS = jax.lax.top_k(all_score, s)
  take = lambda x: jnp.take_along_axis(x, idx_BxS.reshape(idx_BxS.shape + (1,) * (x.ndim - 2)), axis=1)
  return _Hyps(hyps.score_BxGxS.at[:, g].set(best_score_BxS),
               hyps.tokens_BxGxSxT.at[:, g].set(take(all_tokens)),
               hyps.length_BxGxS.at[:, g].set(take(all_length)))


@functools.partial(jax.jit, static_argnames=(
    "cfg", "max_new_tokens", "eos_id", "num_beams", "num_groups", "diversity_penalty",
    "length_penalty", "early_stopping"))
def diverse_beam_search(graphdef: nnx.GraphDef, params, prompt_BxP, mask_BxP, prefix=None, *, cfg: ModelConfig,
                        max_new_tokens: int, eos_id: int, num_beams: int = 12, num_groups: int = 4,
                        diversity_penalty: float = 10.0, length_penalty: float = 1.0,
                        early_stopping: bool = True) -> Decoded:
  """Group beam search returning the best hypothesis of each row (see the module docstring).

  Args:
    graphdef, params: the model.
    prompt_BxP, mask_BxP: left-padded prompts and their masks.
    prefix: a `transformer.Prefix` of B rows conditioning every beam of its row, or None.
    cfg: the model's config (static).
    max_new_tokens: generation budget T.
    eos_id: end-of-sequence id, also used as the padding a finished group emits.
    num_beams, num_groups: N beams in G groups of S = N // G.
    diversity_penalty: subtracted per earlier-group use of a token at the same step.
    length_penalty: exponent of the length normalisation of finished hypotheses.
    early_stopping: a group stops as soon as it holds S finished hypotheses (else when no open beam
      can beat its worst).

  Returns:
    Decoded tokens (EOS-terminated, EOS-filled) and lengths.
  """
  b, t_max = prompt_BxP.shape[0], max_new_tokens
  n, g_count = num_beams, num_groups
  s = n // g_count
  if s * g_count != n:
    raise ValueError(f"num_beams={n} is not a multiple of num_groups={g_count}")
  logits_BxV, pos_B, cache = _prefill(graphdef, params, cfg, prompt_BxP, mask_BxP, max_new_tokens, prefix)
  v = logits_BxV.shape[-1]
  prompt_len_B = mask_BxP.sum(-1).astype(jnp.float32)
  # Every beam starts from its row's prompt; only the first beam of each group is live at step 0.
  rep = lambda x, axis: jnp.repeat(x, n, axis=axis)
  cache = transformer.KVCache(rep(cache.k_NxBxSxKxE, 1), rep(cache.v_NxBxSxKxE, 1),
                              rep(cache.mask_BxS, 0), cache.index)
  if prefix is not None:  # beams never leave their row, so the row's prefix serves all of them
    prefix = transformer.Prefix(rep(prefix.k_NxBxPxKxE, 1), rep(prefix.v_NxBxPxKxE, 1))
  logits_BNxV, pos_BN = rep(logits_BxV, 0), rep(pos_B, 0)
  first_of_group_N = (jnp.arange(n) % s) == 0
  beam_score_BxN = jnp.where(first_of_group_N, 0.0, -1e9)[None].repeat(b, 0)
  seqs_BxNxT = jnp.full((b, n, t_max), eos_id, jnp.int32)
  hyps = _Hyps(jnp.full((b, g_count, s), -jnp.inf), jnp.full((b, g_count, s, t_max), eos_id, jnp.int32),
               jnp.zeros((b, g_count, s), jnp.int32))
  done_BxG = jnp.zeros((b, g_count), bool)
  rank_C = jnp.arange(2 * s)

  def step(carry):
    t, logits_BNxV, pos_BN, cache, beam_score_BxN, seqs_BxNxT, hyps, done_BxG = carry
    logp_BxNxV = jax.nn.log_softmax(logits_BNxV.astype(jnp.float32), axis=-1).reshape(b, n, v)
    # Total length of a hypothesis that ends now (EOS not counted), as transformers 4.27 normalises.
    norm_B = (prompt_len_B + t) ** length_penalty
    token_BxN, src_BxN = [], []
    for g in range(g_count):
      lo = g * s
      logp_BxSxV = logp_BxNxV[:, lo:lo + s]
      if g > 0:
        used_BxV = jax.nn.one_hot(jnp.concatenate(token_BxN, axis=1), v).sum(1)
        logp_BxSxV = logp_BxSxV - diversity_penalty * used_BxV[:, None, :]
      cand_BxSV = (logp_BxSxV + beam_score_BxN[:, lo:lo + s, None]).reshape(b, s * v)
      score_BxC, flat_BxC = jax.lax.top_k(cand_BxSV, 2 * s)
      beam_BxC, tok_BxC = flat_BxC // v, flat_BxC % v
      is_eos_BxC = tok_BxC == eos_id
      done_B = done_BxG[:, g]

      # Finished hypotheses: EOS among the S best candidates of a live group.
      add_BxC = is_eos_BxC & (rank_C < s) & ~done_B[:, None]
      hyp_tokens_BxCxT = jnp.take_along_axis(seqs_BxNxT[:, lo:lo + s], beam_BxC[..., None], axis=1)
      hyps = _keep_best(hyps, g, jnp.where(add_BxC, score_BxC / norm_B[:, None], -jnp.inf),
                        hyp_tokens_BxCxT, jnp.broadcast_to(t + 1, beam_BxC.shape))
      # Open beams: the S best candidates that are not EOS, in rank order.
      order_BxC = jnp.argsort(is_eos_BxC, axis=1, stable=True)[:, :s]
      pick = lambda x: jnp.take_along_axis(x, order_BxC, axis=1)
      new_score_BxS = jnp.where(done_B[:, None], 0.0, pick(score_BxC))
      new_tok_BxS = jnp.where(done_B[:, None], eos_id, pick(tok_BxC))
      new_src_BxS = jnp.where(done_B[:, None], 0, pick(beam_BxC)) + lo

      full_B = (hyps.score_BxGxS[:, g] > -jnp.inf).all(-1)
      if early_stopping:
        now_done_B = full_B
      else:
        worst_B = hyps.score_BxGxS[:, g].min(-1)
        now_done_B = full_B & (worst_B >= score_BxC[:, 0] / norm_B)
      done_BxG = done_BxG.at[:, g].set(done_B | now_done_B)
      beam_score_BxN = beam_score_BxN.at[:, lo:lo + s].set(new_score_BxS)
      token_BxN.append(new_tok_BxS)
      src_BxN.append(new_src_BxS)

    token_BxN = jnp.concatenate(token_BxN, axis=1)
    src_BxN = jnp.concatenate(src_BxN, axis=1)
    seqs_BxNxT = jnp.take_along_axis(seqs_BxNxT, src_BxN[..., None], axis=1)
    seqs_BxNxT = jax.lax.dynamic_update_slice(seqs_BxNxT, token_BxN[..., None], (0, 0, t))
    flat_src_BN = (src_BxN + jnp.arange(b)[:, None] * n).reshape(-1)
    cache = transformer.KVCache(cache.k_NxBxSxKxE[:, flat_src_BN], cache.v_NxBxSxKxE[:, flat_src_BN],
                                cache.mask_BxS[flat_src_BN], cache.index)
    pos_BN = pos_BN[flat_src_BN] + 1
    logits_BNxV, cache = _step(graphdef, params, token_BxN.reshape(-1), pos_BN, cache, prefix)
    return t + 1, logits_BNxV, pos_BN, cache, beam_score_BxN, seqs_BxNxT, hyps, done_BxG

  def not_finished(carry):
    t, *_, done_BxG = carry
    return (t < t_max) & ~done_BxG.all()

  carry = (jnp.int32(0), logits_BNxV, pos_BN, cache, beam_score_BxN, seqs_BxNxT, hyps, done_BxG)
  _, _, _, _, beam_score_BxN, seqs_BxNxT, hyps, done_BxG = jax.lax.while_loop(not_finished, step, carry)

  # Groups still open after T steps finish with their open beams (full length, no EOS).
  norm_B = (prompt_len_B + t_max) ** length_penalty
  for g in range(g_count):
    lo = g * s
    score_BxS = jnp.where(done_BxG[:, g, None], -jnp.inf, beam_score_BxN[:, lo:lo + s] / norm_B[:, None])
    hyps = _keep_best(hyps, g, score_BxS, seqs_BxNxT[:, lo:lo + s], jnp.full((b, s), t_max))
  best_B = jnp.argmax(hyps.score_BxGxS.reshape(b, -1), axis=-1)
  tokens_BxT = jnp.take_along_axis(hyps.tokens_BxGxSxT.reshape(b, g_count * s, t_max),
                                   best_B[:, None, None], axis=1)[:, 0]
  length_B = jnp.take_along_axis(hyps.length_BxGxS.reshape(b, -1), best_B[:, None], axis=1)[:, 0]
  # Hypotheses that ended on EOS stored the EOS-filled tail of their beam, so rows are EOS-terminated.
  return Decoded(tokens_BxT, length_B)
