"""Token-level language-modelling losses shared by every method."""

import jax
import jax.numpy as jnp


def token_nll(logits_BxLxV: jax.Array, tokens_BxL: jax.Array) -> jax.Array:
  """nll_BxL[:, t] = -log p(tokens[:, t+1] | tokens[:, :t+1]); the last column is 0 (nothing to predict)."""
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
  nll_BxL1 = -jnp.take_along_axis(logp_BxLxV, tokens_BxL[:, 1:, None], axis=-1)[..., 0]
  return jnp.pad(nll_BxL1, ((0, 0), (0, 1)))


def target_mask(mask_BxL: jax.Array) -> jax.Array:
  """Which positions of `token_nll` count: a real token predicting a real next token."""
  return jnp.pad(mask_BxL[:, 1:] * mask_BxL[:, :-1], ((0, 0), (0, 1))).astype(jnp.float32)
