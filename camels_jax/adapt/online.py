"""Online adaptation over a document stream: the evaluation protocol every weighting method shares.

The base model reads the stream's documents in order, one Adam step (batch 1, gradient clipping) per
document on the weighted LM loss (`inner.doc_loss`, the same loss the CaMeLS inner loop uses). Methods
differ only in the weights they give the tokens.
"""

import functools
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from camels_jax import checks, interrupts
from camels_jax.adapt import inner
from camels_jax.adapt.loss import NORMALIZATIONS


def online_config() -> ml_collections.ConfigDict:
  """The `online` section of an evaluation config (reference values in comments)."""
  return ml_collections.ConfigDict(dict(
      lr=1e-4,  # Adam lr, > 0 (reference default 1e-4; its README sweeps 1e-4, 2.5e-5, 6.25e-6, 1.5625e-6)
      # "adam" (reference) or "sgd": plain clipped SGD, the update CaMeLS's weights are meta-trained for (an
      # alternative protocol; Adam's first steps are close to lr * sign(g), which normalises the weights away).
      optimizer="adam",
      grad_clip=750.0,  # global-norm gradient clip, > 0 (reference: 750)
      normalization="padded",  # per-document loss / (padded_len - 1) ("padded", reference) or / real tokens ("tokens")
      padded_len=0,  # length "padded" divides by, >= the longest document bucket; 0 = that bucket (ref.: 1024)
      # More lengths the stream pads a document to, besides data.doc_buckets (the next one up is taken). Padding
      # is masked and "padded" divides by the data's longest bucket, so they change only the time (a document
      # of 190 tokens costs 192 positions, not 256), at a compilation each; those past the data's are unused.
      extra_buckets=(),
  ))


RULES = {
    "lr": checks.positive,
    "optimizer": checks.one_of("adam", "sgd"),
    "grad_clip": checks.positive,
    "normalization": checks.one_of(*NORMALIZATIONS),
    "padded_len": checks.count_or_zero,  # against the document buckets: the job's check (it has the data section)
    "extra_buckets": checks.either(checks.increasing(checks.count),
                                   checks.Rule(lambda x: isinstance(x, (tuple, list)) and not x, "() (none)")),
}


@functools.lru_cache
def adam_direction(grad_clip: float) -> optax.GradientTransformation:
  """Clipped Adam without its learning rate, which `adapt_step` takes as a traced argument so that a
  learning-rate sweep compiles once. torch.optim.Adam defaults (b1 0.9, b2 0.999, eps 1e-8, no weight
  decay), as in the reference."""
  return optax.chain(optax.clip_by_global_norm(grad_clip), optax.scale_by_adam())


@functools.lru_cache
def direction_of(optimizer: str, grad_clip: float) -> optax.GradientTransformation:
  """The update direction of an `online_config` optimizer without its lr: clipped Adam, or the clipped
  gradient itself (SGD)."""
  if optimizer == "adam":
    return adam_direction(grad_clip)
  if optimizer == "sgd":
    return optax.clip_by_global_norm(grad_clip)
  raise ValueError(f"online.optimizer={optimizer!r}: expected 'adam' or 'sgd'")


def inner_config(c: ml_collections.ConfigDict, doc_buckets: Sequence[int]) -> inner.InnerConfig:
  return inner.InnerConfig(normalization=c.normalization, padded_len=c.padded_len or max(doc_buckets))


def stream_buckets(c: ml_collections.ConfigDict, doc_buckets: Sequence[int]) -> tuple[int, ...]:
  """The lengths a stream pads its documents to: the data's `doc_buckets` and `c.extra_buckets` below their
  largest (documents are cut there)."""
  return tuple(sorted(set(doc_buckets) | {b for b in c.extra_buckets if b < max(doc_buckets)}))


@functools.partial(jax.jit, static_argnames=("graphdef", "direction", "icfg"), donate_argnums=(1, 2))
def adapt_step(graphdef: nnx.GraphDef, params, opt_state, tokens_BxL, mask_BxL, w_BxL, lr, *,
               direction: optax.GradientTransformation, icfg: inner.InnerConfig):
  """One step (lr * `direction`: Adam's or SGD's) on the weighted LM loss of a batch of documents; also the loss."""
  loss, grads = jax.value_and_grad(inner.doc_loss, argnums=1)(graphdef, params, tokens_BxL, mask_BxL,
                                                              w_BxL, icfg)
  updates, opt_state = direction.update(grads, opt_state, params)
  params = jax.tree.map(lambda p, u: p - (lr * u).astype(p.dtype), params, updates)
  return params, opt_state, loss


def adapt_stream(graphdef: nnx.GraphDef, params, doc_batches: Sequence[dict[str, np.ndarray]],
                 weights: Callable[[int, dict[str, np.ndarray]], np.ndarray], c: ml_collections.ConfigDict,
                 icfg: inner.InnerConfig,
                 on_doc: Callable[[int, object], None] | None = None, progress: bool = True,
                 desc: str = "adapt", opt_state=None, start: int = 0,
                 on_state: Callable[[int, object, object], None] | None = None):
  """Adapts `params` on the stream's documents in order.

  Args:
    graphdef, params: the model to adapt (params are not modified in place: a copy is donated).
    doc_batches: the stream's documents, each a batch of one (doc_tokens_BxL, doc_mask_BxL).
    weights: weights(i, batch) -> w_BxL, the method's token weights for document i.
    c: an `online_config()` section; `icfg` its inner loss settings (`inner_config`).
    on_doc: called as on_doc(i, params) after document i (e.g. evaluation points along the stream).
    progress: show a progress bar.
    desc: the progress bar's label.
    opt_state, start: resume a stream: the optimizer state after its first `start` documents (with `params`
      as they were then); None starts a fresh one.
    on_state: called as on_state(i, params, opt_state) after document i (e.g. a checkpoint).

  Returns:
    (adapted params, per-document losses from `start` on).
  """
  direction = direction_of(c.optimizer, float(c.grad_clip))
  params = jax.tree.map(lambda x: x.copy(), params)  # adapt_step donates its inputs
  opt_state = direction.init(params) if opt_state is None else jax.tree.map(lambda x: x.copy(), opt_state)
  losses = []
  for i in tqdm.trange(start, len(doc_batches), desc=desc, disable=not progress, initial=start,
                       total=len(doc_batches)):
    interrupts.raise_if_requested()
    batch = doc_batches[i]
    w_BxL = weights(i, batch)
    params, opt_state, loss = adapt_step(graphdef, params, opt_state, batch["doc_tokens_BxL"],
                                         batch["doc_mask_BxL"], w_BxL, c.lr, direction=direction,
                                         icfg=icfg)
    losses.append(float(loss))
    if on_doc is not None:
      on_doc(i, params)
    if on_state is not None:
      on_state(i, params, opt_state)
  return params, losses


def step_bytes(graphdef: nnx.GraphDef, params, length: int, c: ml_collections.ConfigDict,
               icfg: inner.InnerConfig) -> int:
  """Device memory of one adaptation step on a document of `length` tokens (XLA's compiled memory analysis:
  arguments + outputs + temporaries - donated buffers), without running it."""
  direction = direction_of(c.optimizer, float(c.grad_clip))
  spec = lambda dtype: jax.ShapeDtypeStruct((1, length), dtype)
  lowered = adapt_step.lower(graphdef, params, jax.eval_shape(direction.init, params), spec(np.int32),
                             spec(np.int32), spec(np.float32), float(c.lr), direction=direction, icfg=icfg)
  return compiled_bytes(lowered.compile())


def compiled_bytes(compiled) -> int:
  """Peak device bytes of a compiled computation by XLA's memory analysis (0 where a backend has none)."""
  m = compiled.memory_analysis()
  if m is None:
    return 0
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
