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


def sgd_step(graphdef: nnx.GraphDef, params, tokens_BxL, mask_BxL, w_BxL, lr, icfg: InnerConfig,
             precond=None):
  """One SGD step on the weighted loss of one batch of documents: params - lr * g, or - lr * precond * g
  with a fixed diagonal preconditioner (a params-shaped tree, a constant of the meta-gradient)."""
  at = jax.lax.stop_gradient(params) if icfg.first_order else params
  grads = jax.grad(doc_loss, argnums=1)(graphdef, at, tokens_BxL, mask_BxL, w_BxL, icfg)
  grads = preconditioned(grads, precond)
  return jax.tree.map(lambda p, g: p - (lr * g).astype(p.dtype), params, grads)


def preconditioned(grads, precond):
  """precond * grads leaf by leaf (grads as they are when precond is None)."""
  if precond is None:
    return grads
  return jax.tree.map(lambda g, d: g * d.astype(g.dtype), grads, precond)


def add_square(sum_sq, grads):
  """sum_sq + grads ** 2 leaf by leaf, in float32 (None: start a sum)."""
  sq = jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), grads)
  return sq if sum_sq is None else jax.tree.map(jnp.add, sum_sq, sq)


def second_moment_precond(sum_sq, n: int, eps: float):
  """The fixed diagonal preconditioner 1 / (sqrt(v) + eps), v = sum_sq / n the mean square of n gradients.

  Adam divides its step by the root of a running mean of squared gradients; this divides an SGD step by the
  root of a fixed one, measured once on the unadapted model. Adam's first steps are close to lr * sign(g),
  which the size of a token's gradient does not move; this step is linear in the gradient, so the token
  weights still shape it and the meta-gradient through it is exact.
  """
  return jax.tree.map(lambda x: 1.0 / (jnp.sqrt(x / n) + eps), sum_sq)


def adapt(graphdef: nnx.GraphDef, params, tokens_KxL, mask_KxL, w_KxL, valid_K, lr, icfg: InnerConfig,
          outer_fn=None, precond=None):
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
    precond: None (SGD), or a fixed diagonal preconditioner of every step (`second_moment_precond`).

  Returns:
    (params after all passes, outer values of shape [steps] or None).
  """
  step = functools.partial(sgd_step, graphdef, icfg=icfg, precond=precond)
  if icfg.remat:
    step = jax.checkpoint(step)
  docs = (tokens_KxL, mask_KxL, w_KxL, valid_K)

  def one_doc(p, doc):
    tokens_L, mask_L, w_L, valid = doc
    # A padding document steps with lr 0 rather than being selected away: p - 0 * g is p (its gradient is
    # finite, and zero besides, its weights being masked), and a select over every parameter would cost a
    # pass over them and a parameter-sized buffer per document.
    return step(p, tokens_L[None], mask_L[None], w_L[None], jnp.where(valid > 0, lr, 0.0)), None

  def one_pass(p, _):
    p, _ = jax.lax.scan(one_doc, p, docs)
    return p, (outer_fn(p) if outer_fn is not None else None)

  # The first document is stepped outside the scan. The params it starts from are usually constants of
  # the outer gradient (the meta-gradient does not differentiate the base model), so JAX linearises that
  # step with respect to the weights alone: its second-order backward pass is one transposed backward
  # pass instead of the reverse of a forward and a backward (about 2 instead of 6 forward-pass FLOPs).
  # Inside the scan, the carry makes every document pay for the params' tangent. Measured on SmolLM2 with
  # 2 documents: 23.5 -> 15.5 s per meta step (`python -m bench.meta_step`).
  # Empty scans are skipped: XLA would compile their bodies all the same.
  p, _ = one_doc(params, jax.tree.map(lambda a: a[0], docs))
  if tokens_KxL.shape[0] > 1:
    p, _ = jax.lax.scan(one_doc, p, jax.tree.map(lambda a: a[1:], docs))
  outs = [outer_fn(p)] if outer_fn is not None else []
  if icfg.steps > 1:
    p, later = jax.lax.scan(one_pass, p, None, length=icfg.steps - 1)
    outs += [later] if outer_fn is not None else []
  if outer_fn is None:
    return p, None
  if len(outs) == 1:
    return p, jax.tree.map(lambda a: a[None], outs[0])
  return p, jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), *outs)
