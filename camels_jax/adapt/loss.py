"""Token-level losses shared by every method: weighted LM loss, QA answer NLL, locality KL.

Convention: position t of a `*_BxL` loss holds the loss of predicting token t+1 from tokens[:t+1]; the
last position is 0. A per-token weight `w_BxL` weighs the loss of *predicting* token t (as in the
reference, where weights[:, 1:] multiply the shifted cross-entropy), so w_BxL[:, 0] is never used.
"""

import jax
import jax.numpy as jnp

from camels_jax.models.transformer import upcast

NORMALIZATIONS = ("padded", "tokens")


def token_nll(logits_BxLxV: jax.Array, tokens_BxL: jax.Array) -> jax.Array:
  """nll_BxL[:, t] = -log p(tokens[:, t+1] | tokens[:, :t+1]); the last column is 0."""
  logp_BxLxV = jax.nn.log_softmax(upcast(logits_BxLxV[:, :-1]), axis=-1)
  nll_BxL1 = -jnp.take_along_axis(logp_BxLxV, tokens_BxL[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(nll_BxL1, ((0, 0), (0, 1)))


def target_mask(mask_BxL: jax.Array) -> jax.Array:
  """1 where a real token predicts a real next token (aligned with `token_nll`)."""
  m = mask_BxL.astype(jnp.float32)
  return jnp.pad(m[:, 1:] * m[:, :-1], ((0, 0), (0, 1)))


def shift_targets(x_BxL: jax.Array) -> jax.Array:
  """Moves a per-token quantity (weight, loss mask) onto the position that predicts that token."""
  return jnp.pad(x_BxL[:, 1:], ((0, 0), (0, 1)))


def weighted_lm_loss(logits_BxLxV: jax.Array, tokens_BxL: jax.Array, mask_BxL: jax.Array,
                     w_BxL: jax.Array, normalization: str = "padded",
                     padded_len: int | None = None) -> jax.Array:
  """Per-sequence weighted next-token NLL, loss_B.

  Args:
    logits_BxLxV, tokens_BxL, mask_BxL: the model's logits on right-padded sequences.
    w_BxL: weight of each token (the weight of token t scales the loss of predicting it).
    normalization: "padded" divides by padded_len - 1 whatever the document's length (the reference
      pads every document to 1024 and divides by 1023: its lr scales are tied to this); "tokens"
      divides by the number of real predicted tokens.
    padded_len: the length "padded" normalises by; None = L. With length buckets, pass one fixed
      value so a document's loss scale does not depend on the bucket it fell in.
  """
  lw_BxL = shift_targets(w_BxL) * target_mask(mask_BxL)
  total_B = (token_nll(logits_BxLxV, tokens_BxL) * lw_BxL).sum(-1)
  if normalization == "padded":
    return total_B / ((padded_len or tokens_BxL.shape[1]) - 1)
  if normalization == "tokens":
    return total_B / jnp.maximum(target_mask(mask_BxL).sum(-1), 1.0)
  raise ValueError(f"normalization={normalization!r} is not one of {NORMALIZATIONS}")


def answer_nll(logits_BxLxV: jax.Array, tokens_BxL: jax.Array, loss_mask_BxL: jax.Array):
  """Summed NLL of the answer tokens (loss_mask marks the answer and its EOS) and their count."""
  lw_BxL = shift_targets(loss_mask_BxL.astype(jnp.float32))
  return (token_nll(logits_BxLxV, tokens_BxL) * lw_BxL).sum(), lw_BxL.sum()


def answer_nll_rows(logits_BxLxV: jax.Array, tokens_BxL: jax.Array, loss_mask_BxL: jax.Array):
  """`answer_nll` of each row: (summed answer NLL_B, answer tokens_B)."""
  lw_BxL = shift_targets(loss_mask_BxL.astype(jnp.float32))
  return (token_nll(logits_BxLxV, tokens_BxL) * lw_BxL).sum(-1), lw_BxL.sum(-1)


def answer_nll_mean(logits_BxLxV, tokens_BxL, loss_mask_BxL) -> jax.Array:
  """Token-level mean answer NLL pooled over the batch (the reference's QA loss)."""
  total, count = answer_nll(logits_BxLxV, tokens_BxL, loss_mask_BxL)
  return total / jnp.maximum(count, 1.0)


def kl_pre_post(logits_pre_BxLxV: jax.Array, logits_post_BxLxV: jax.Array, mask_BxL: jax.Array):
  """Mean over real positions of KL(p_pre || p_post), the locality term (MEND/CaMeLS direction)."""
  logp_pre = jax.nn.log_softmax(upcast(logits_pre_BxLxV), axis=-1)
  logp_post = jax.nn.log_softmax(upcast(logits_post_BxLxV), axis=-1)
  kl_BxL = (jnp.exp(logp_pre) * (logp_pre - logp_post)).sum(-1)
  m = mask_BxL.astype(jnp.float32)
  return (kl_BxL * m).sum() / jnp.maximum(m.sum(), 1.0)
