"""What adaptation taught: answer NLL before and after ("uptake"), and where the token weights went.

Shared by every weighting method, so that learned weights, uniform weights and the heuristics are
measured the same way:
- `mean_matched`: another weighting rescaled, document by document, to the same mean weight as a
  reference weighting. A method that only learns "raise every weight" (a larger step) then gains nothing
  over mean-matched uniform weights; what it gains comes from *which* tokens it weighs.
- `facts_filler_sums` / `facts_filler_ratio`: mean weight on answer-span tokens over mean weight on the
  other tokens (1.0 for uniform weights).

Weights are read on the tokens whose loss they scale: position t's weight scales the loss of predicting
token t (see `adapt.loss`), so the first token of a document, never predicted, is left out.
"""

import jax.numpy as jnp


def predicted_mask(mask_BxL, valid_B=None):
  """float mask of the real tokens that are predicted (all but each document's first)."""
  m_BxL = jnp.asarray(mask_BxL, jnp.float32)
  if valid_B is not None:
    m_BxL = m_BxL * jnp.asarray(valid_B, jnp.float32)[:, None]
  first_BxL = jnp.cumsum(m_BxL, axis=1) == 1
  return jnp.where(first_BxL, 0.0, m_BxL)


def mean_weight_B(w_BxL, mask_BxL, valid_B=None):
  """Each document's mean weight over its predicted tokens."""
  m_BxL = predicted_mask(mask_BxL, valid_B)
  return (w_BxL * m_BxL).sum(-1) / jnp.maximum(m_BxL.sum(-1), 1.0)


def mean_matched(w_BxL, ref_BxL, mask_BxL, valid_B=None):
  """`w_BxL` rescaled per document to `ref_BxL`'s mean weight (uniform weights when w is all ones).

  A document whose `w` is 0 everywhere (e.g. SSM on a text with no entity) falls back to uniform
  weights at the reference mean, so every weighting takes the same total step.
  """
  m_BxL = predicted_mask(mask_BxL, valid_B)
  w_BxL = jnp.asarray(w_BxL, jnp.float32) * m_BxL
  mean_B = mean_weight_B(w_BxL, mask_BxL, valid_B)
  w_BxL = jnp.where(mean_B[:, None] > 0, w_BxL, m_BxL)
  scale_B = mean_weight_B(ref_BxL, mask_BxL, valid_B) / jnp.maximum(mean_weight_B(w_BxL, mask_BxL, valid_B),
                                                                     1e-30)
  return w_BxL * scale_B[:, None]


def facts_filler_sums(w_BxL, answer_mask_BxL, mask_BxL, valid_B=None):
  """(weight sum, count) on answer tokens and on the other predicted tokens: sums that pool over batches."""
  m_BxL = predicted_mask(mask_BxL, valid_B)
  a_BxL = jnp.asarray(answer_mask_BxL, jnp.float32) * m_BxL
  o_BxL = m_BxL - a_BxL
  return {"facts_w": (w_BxL * a_BxL).sum(), "facts_n": a_BxL.sum(),
          "filler_w": (w_BxL * o_BxL).sum(), "filler_n": o_BxL.sum()}


def facts_filler_ratio(sums) -> float:
  """Mean weight on answer tokens / mean weight on the other tokens, from (pooled) `facts_filler_sums`.

  NaN when either set is empty or the filler's mean weight is 0.
  """
  facts = float(sums["facts_w"]) / float(sums["facts_n"]) if float(sums["facts_n"]) else float("nan")
  filler = float(sums["filler_w"]) / float(sums["filler_n"]) if float(sums["filler_n"]) else float("nan")
  return facts / filler if filler > 0 else float("nan")
