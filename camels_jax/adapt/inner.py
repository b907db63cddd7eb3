"""The inner update every method shares: SGD on a weighted LM loss over a sequence of documents.

Pure functions of params pytrees: `jax.grad` for the inner gradient and `lax.scan` over documents, so
differentiating an outer loss through `adapt` gives the exact (second-order) meta-gradient.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from camels_jax.adapt import loss
from camels_jax.models import transformer


@dataclasses.dataclass(frozen=True)
class InnerConfig:
  """Static settings of the inner update (hashable, so it can be a jit static argument)."""

  steps: int = 1  # passes over the documents; each pass is one SGD step per document, in order
  normalization: str = "padded"  # "padded" (reference: / (padded_len - 1)) or "tokens" (/ real tokens)
  padded_len: int = 0  # length the "padded" normalisation divides by (0 = the batch's L)
  first_order: bool = False  # treat the params the inner gradient is taken at as constants
  remat: bool = False  # recompute each inner step in the backward pass instead of storing it


def doc_loss(graphdef: nnx.GraphDef, params, tokens_BxL, mask_BxL, w_BxL, icfg: InnerConfig):
  """Mean over the batch of the weighted LM loss (one document when B = 1)."""
  logits_BxLxV = transformer.apply(graphdef, params, tokens_BxL, mask_BxL)
  return loss.weighted_lm_loss(logits_BxLxV, tokens_BxL, mask_BxL, w_BxL, icfg.normalization,
                               icfg.padded_len or None).mean()


def sgd_step(graphdef: nnx.GraphDef, params, tokens_BxL, mask_BxL, w_BxL, lr, icfg: InnerConfig):
  """One SGD step on the weighted loss of one batch of documents."""
  at = jax.lax.stop_gradient(params) if icfg.first_order else params
  grads = jax.grad(doc_loss, argnums=1)(graphdef, at, tokens_BxL, mask_BxL, w_BxL, icfg)
  return jax.tree.map(lambda p, g: p - (lr * g).astype(p.dtype), params, grads)


def adapt(graphdef: nnx.GraphDef, params, tokens_KxL, mask_KxL, w_KxL, valid_K, lr, icfg: InnerConfig,
          outer_fn=None):
  """Updates `params` on K documents one after another, `icfg.steps` passes.

  Args:
    graphdef, params: the base model.
    tokens_KxL, mask_KxL: the documents (right-padded).
    w_KxL: per-token weights.
    valid_K: 0 for padding documents, which leave the params unchanged.
    lr: inner learning rate (a scalar; may be a traced, learned value).
    icfg: static settings.
    outer_fn: if given, `outer_fn(params_j)` is evaluated after every pass j and the values are
      returned stacked (the mixing estimator averages them).

  Returns:
    (params after all passes, outer values of shape [steps] or None).
  """
  step = functools.partial(sgd_step, graphdef, icfg=icfg)
  if icfg.remat:
    step = jax.checkpoint(step)

  def one_doc(p, doc):
    tokens_L, mask_L, w_L, valid = doc
    new = step(p, tokens_L[None], mask_L[None], w_L[None], lr)
    return jax.tree.map(lambda a, b: jnp.where(valid > 0, b, a), p, new), None

  def one_pass(p, _):
    p, _ = jax.lax.scan(one_doc, p, (tokens_KxL, mask_KxL, w_KxL, valid_K))
    return p, (outer_fn(p) if outer_fn is not None else None)

  return jax.lax.scan(one_pass, params, None, length=icfg.steps)
