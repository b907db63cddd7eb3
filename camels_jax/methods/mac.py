"""MAC: a memory of amortized contexts (Tack et al. 2024), conditioning a frozen base model with no
gradient step at test time.

- **Amortization** `amortize`: an encoder (the first blocks of the base model, or any model sharing its
  tokenizer) reads a document; T learned query tokens cross-attend to its hidden states; an MLP on each
  output token gives T modulation tokens of the base model's width.
- **Memory bank** `Bank`: the stream's modulation tokens, T more per document, in arrival order.
- **Aggregation** `aggregate`: the question is amortized the same way; its T tokens cross-attend over the
  whole bank in a few blocks, with no positions, so the result does not depend on the order of the
  documents. Banks of more than `window` documents are aggregated hierarchically: each window of
  `window` documents is reduced to T tokens for this question, those summaries form the next level's
  bank, until one window is left.
- **Prefix** `prefix`: each aggregated token is projected to a key and a value for every layer and kv head
  of the frozen (QA-tuned) base model (`transformer.Prefix`, P-tuning v2's per-layer prefix).
- **Training** `fit`: the base model's answer NLL given the prefix, on banks of `bank_docs` meta-train
  documents and questions sampled from them; the gradient is taken with respect to MAC's parameters only
  (the base model's is never formed). Only a random `backprop_fraction` of a bank's documents is
  amortized under the gradient; the others under `stop_gradient`, which stores nothing for the backward
  pass (the paper's memory saving).

Deviations from the paper, and why:
- The prefix is attended in a softmax of its own whose output is added to the layer's attention (the
  zero-init attention of LLaMA-Adapter), where P-tuning v2 joins it to the model's softmax. With the value
  projection initialised at zero, training starts exactly at the QA-tuned base model, and a zero prefix
  leaves the model unchanged (tested); a joint softmax would dilute the model's own attention from the
  first step.
- The encoder is a causal decoder (the base model's first blocks) where the paper uses a T5 encoder: one
  tokenizer, one model family, no download. Any model source with the base model's tokenizer works.
- The question is amortized by the same network as the documents (the paper uses the amortization network
  as the question encoder too) and its T tokens are the aggregation's queries.

Memory: the bank holds T x d_model float32 numbers per document (`Bank.nbytes`; 18 KiB for SmolLM2 at T = 8),
growing linearly with the stream. It is one memory for every question of a batch: its norm and key/value
projections are computed once, and per question only the T x (M x T) attention scores grow with the number
of documents M. The hierarchical levels above the bank hold per-question summaries (B x M/window x T x d),
so they cost more than one pass at these sizes. `python -m bench.mac_bank` (SmolLM2, 16 questions, 2 CPU
cores) measured, by XLA's compiled memory: one pass 218 / 220 / 226 / 271 MiB and 0.07 / 0.07 / 0.12 /
0.19 s for banks of 8 / 32 / 128 / 512 documents (about 210 MiB of it MAC's own parameters); windows of 4:
218 / 220 / 264 / 447 MiB and 0.09 / 0.16 / 0.49 / 1.94 s. The windows are the paper's; `window` >= the
bank's size gives the one pass.
"""

import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from camels_jax import checkpoint, checks, loop, sharding, stats
from camels_jax.adapt import loss
from camels_jax.data import dataset, pipeline
from camels_jax.models import loading, transformer

_MASKED = -1e30


def mac_config() -> ml_collections.ConfigDict:
  """The `mac` section of a job config (paper values in comments)."""
  return ml_collections.ConfigDict(dict(
      tokens=8,  # T: modulation tokens per document, >= 1 (the bank grows by T per document)
      # "base": the first `base_layers` blocks of the base model, from its weights (trained); "random": a
      # `random`-shaped encoder from scratch; else a model source (as model.source) with the base tokenizer.
      encoder="base",
      base_layers=2,  # encoder blocks taken from the base model when encoder == "base"
      random=dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256),  # sizes when encoder == "random"
      heads=8,  # heads of the cross-attention blocks; must divide the base model's d_model
      amortizer_blocks=1,  # cross-attention blocks of the T query tokens over a document, >= 1
      aggregator_blocks=2,  # cross-attention blocks of the question's tokens over the bank, >= 1
      mlp_mult=2,  # width of the blocks' and the output MLPs in units of d_model, >= 1
      window=4,  # documents aggregated in one pass; larger banks are aggregated hierarchically (>= 2)
      bank_docs=8,  # meta-train documents in a training bank (> window trains the hierarchy too)
      # Generated data only: train on the first this many generated meta-train documents (the job's meta-train
      # split is their first ones), so MAC reads many more documents than CaMeLS trains on; 0 = the split.
      train_docs=0,
      questions=16,  # questions per training step, sampled from the bank's documents' questions
      backprop_fraction=0.5,  # fraction of a bank's documents amortized under the gradient, in (0, 1]
      # Weight of a contrastive term (not in the paper; 0 = its loss alone): per question, a hinge on how much
      # lower its answer NLL (per token) is with its own document in the bank than with that document taken
      # out, at least `contrast_margin` nats. The paper's loss alone can be met by a prior over answers that
      # never reads the bank (configs/mac_default.py: own bank - other bank 0.000 on the test stream).
      contrast=0.0,
      contrast_margin=0.5,  # nats per answer token the own document should be worth, > 0
      # Weight of a retrieval term (not in the paper; 0 = none): each question picks its own document out of
      # the training bank by the first aggregation block's attention logits (`bank_retrieval`, InfoNCE). The
      # trained default's attention put 0.126 of its mass on the own document of 8 (uniform: 0.125).
      retrieve=0.0,
      # Steps of the retrieval term alone, before the rest (not in the paper; 0 = none; counted in `steps`),
      # with an Adam of their own at `retrieve_lr`. No answer loss pulls the attention toward an average, and
      # the prefix cannot move: its zero-initialised output gets no gradient from the attention logits, so the
      # base model stays exact however large the lr.
      retrieve_steps=0,
      retrieve_lr=1e-3,  # Adam lr of those steps, > 0
      # Weight of a reconstruction term (not in the paper; 0 = none): the frozen base model's NLL of each
      # back-propagated training document given the prefix aggregated from that document's T tokens alone by a
      # question-free (zero) query (`document_nll`). Only a prefix that carries its own document lowers it,
      # where the answer loss is met by a prior (banks of one document: own - other bank 0.0000 on meta-val).
      reconstruct=0.0,
      lr=1e-4,  # Adam lr, > 0
      grad_clip=1.0,  # global-norm clip, > 0
      steps=200,  # training steps, >= 0 (0 = only validate the initial networks)
      val_every=50,  # steps between validations, each also a checkpoint, >= 1
      # Validate on the first this many meta-val documents (0 = all): a validation scores every question three
      # times (own bank, other bank, none), 10.7 min for SQuAD's 131 meta-val paragraphs on 2 cores.
      val_docs=0,
      seed=0,  # init seed, and seed of the banks, the questions and the back-propagated documents
  ))


RULES = {
    "tokens": checks.count,
    "encoder": checks.nonempty_string,
    "base_layers": checks.count,
    "random": {name: checks.count for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")},
    "heads": checks.count,
    "amortizer_blocks": checks.count,
    "aggregator_blocks": checks.count,
    "mlp_mult": checks.count,
    "window": checks.at_least(2, integer=True),
    "bank_docs": checks.count,
    "train_docs": checks.count_or_zero,
    "questions": checks.count,
    "backprop_fraction": checks.Rule(lambda x: checks._is_number(x) and 0 < x <= 1, "a number in (0, 1]",
                                     bad_example=0),
    "contrast": checks.non_negative,
    "contrast_margin": checks.positive,
    "retrieve": checks.non_negative,
    "retrieve_steps": checks.count_or_zero,
    "retrieve_lr": checks.positive,
    "reconstruct": checks.non_negative,
    "lr": checks.positive,
    "grad_clip": checks.positive,
    "steps": checks.count_or_zero,
    "val_every": checks.count,
    "val_docs": checks.count_or_zero,
    "seed": checks.seed,
}


CROSS = []  # no constraints between fields (bank_docs below window simply aggregates in one pass)


# ------------------------------------------------------------------------------------------------
# Networks.


class CrossBlock(nnx.Module):
  """Pre-norm cross-attention of a few query tokens over a memory, then an MLP; residual, no positions."""

  def __init__(self, d: int, d_memory: int, heads: int, mlp_mult: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.ln_q, self.ln_m = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d_memory, rngs=rngs)
    self.q, self.o = nnx.Linear(d, d, rngs=rngs), nnx.Linear(d, d, rngs=rngs)
    self.k, self.v = nnx.Linear(d_memory, d, rngs=rngs), nnx.Linear(d_memory, d, rngs=rngs)
    self.ln_mlp = nnx.LayerNorm(d, rngs=rngs)
    self.fc, self.proj = nnx.Linear(d, mlp_mult * d, rngs=rngs), nnx.Linear(mlp_mult * d, d, rngs=rngs)

  def scores(self, x_BxTxD, m_BxSxC):
    """(the attention logits scores_BxHxTxS of the queries over the memory, the memory's values
    v_BxSxHxE); m_BxSxC may have a leading 1 instead of B (see `__call__`)."""
    b, t, d = x_BxTxD.shape
    s, h = m_BxSxC.shape[1], self.heads
    e = d // h
    m_BxSxC = self.ln_m(m_BxSxC)
    q_BxTxHxE = self.q(self.ln_q(x_BxTxD)).reshape(b, t, h, e)
    mb = m_BxSxC.shape[0]
    k_BxSxHxE, v_BxSxHxE = self.k(m_BxSxC).reshape(mb, s, h, e), self.v(m_BxSxC).reshape(mb, s, h, e)
    shared = mb == 1 and b > 1
    scores_BxHxTxS = (jnp.einsum("bthe,she->bhts", q_BxTxHxE, k_BxSxHxE[0]) if shared
                      else jnp.einsum("bthe,bshe->bhts", q_BxTxHxE, k_BxSxHxE)) / math.sqrt(e)
    return scores_BxHxTxS, v_BxSxHxE

  def __call__(self, x_BxTxD, m_BxSxC, mask_BxS):
    """m_BxSxC and mask_BxS may have a leading 1 instead of B: one memory that every row attends to, whose
    norm and projections are then computed once, not once per row."""
    b, t, d = x_BxTxD.shape
    scores_BxHxTxS, v_BxSxHxE = self.scores(x_BxTxD, m_BxSxC)
    shared = m_BxSxC.shape[0] == 1 and b > 1
    scores_BxHxTxS = scores_BxHxTxS + jnp.where(mask_BxS > 0, 0.0, _MASKED)[:, None, None, :]
    probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1)
    attended_BxTxHxE = (jnp.einsum("bhts,she->bthe", probs_BxHxTxS, v_BxSxHxE[0]) if shared
                        else jnp.einsum("bhts,bshe->bthe", probs_BxHxTxS, v_BxSxHxE))
    attended_BxTxD = attended_BxTxHxE.reshape(b, t, d)
    # A memory with nothing valid in it (an empty window) contributes nothing, not an average of padding.
    attended_BxTxD = attended_BxTxD * (mask_BxS > 0).any(-1)[:, None, None]
    x_BxTxD = x_BxTxD + self.o(attended_BxTxD)
    return x_BxTxD + self.proj(jax.nn.gelu(self.fc(self.ln_mlp(x_BxTxD))))


class MAC(nnx.Module):
  """Encoder, amortization (T query tokens + blocks + output MLP), aggregation blocks, prefix projection."""

  def __init__(self, encoder: transformer.ModelConfig, base: transformer.ModelConfig, c: ml_collections.ConfigDict,
               *, rngs: nnx.Rngs):
    d = base.d_model
    self.base_shape = (base.n_layers, base.n_kv_heads, base.head_dim)
    self.encoder = transformer.Decoder(encoder, rngs=rngs)
    self.queries = nnx.Param(0.02 * jax.random.normal(rngs.params(), (c.tokens, d)))
    self.amortizer = nnx.List([CrossBlock(d, encoder.d_model, c.heads, c.mlp_mult, rngs=rngs)
                               for _ in range(c.amortizer_blocks)])
    self.out_ln = nnx.LayerNorm(d, rngs=rngs)
    self.out_fc, self.out_proj = nnx.Linear(d, c.mlp_mult * d, rngs=rngs), nnx.Linear(c.mlp_mult * d, d, rngs=rngs)
    self.aggregator = nnx.List([CrossBlock(d, d, c.heads, c.mlp_mult, rngs=rngs) for _ in range(c.aggregator_blocks)])
    self.prefix_ln = nnx.LayerNorm(d, rngs=rngs)
    n, k, e = self.base_shape
    self.to_k = nnx.Linear(d, n * k * e, rngs=rngs)
    # Zero values: the prefix starts as no prefix at all, i.e. exactly the frozen base model.
    self.to_v = nnx.Linear(d, n * k * e, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

  def amortize(self, tokens_BxL, mask_BxL):
    h_BxLxC, _ = self.encoder.features(tokens_BxL, transformer.positions(mask_BxL), mask_BxL)
    x_BxTxD = jnp.broadcast_to(self.queries.get_value(), (tokens_BxL.shape[0],) + self.queries.shape)
    for block in self.amortizer:
      x_BxTxD = block(x_BxTxD, transformer.upcast(h_BxLxC), mask_BxL)
    return self.out_proj(jax.nn.gelu(self.out_fc(self.out_ln(x_BxTxD))))

  def aggregate(self, q_BxTxD, m_BxSxD, mask_BxS):
    x_BxTxD = q_BxTxD
    for block in self.aggregator:
      x_BxTxD = block(x_BxTxD, m_BxSxD, mask_BxS)
    return x_BxTxD

  def prefix(self, a_BxTxD) -> transformer.Prefix:
    b, t, _ = a_BxTxD.shape
    a_BxTxD = self.prefix_ln(a_BxTxD)
    to_layers = lambda y: y.reshape(b, t, *self.base_shape).transpose(2, 0, 1, 3, 4)  # NxBxTxKxE
    return transformer.Prefix(to_layers(self.to_k(a_BxTxD)), to_layers(self.to_v(a_BxTxD)))


def check_fits(c: ml_collections.ConfigDict, base_cfg: transformer.ModelConfig) -> None:
  """The config's networks can be built on this base model (once it is loaded, before any training)."""
  if base_cfg.d_model % c.heads:
    raise checks.ConfigError(f"mac.heads={c.heads} must divide the base model's d_model={base_cfg.d_model}")
  if c.encoder == "base" and c.base_layers > base_cfg.n_layers:
    raise checks.ConfigError(f"mac.base_layers: {c.base_layers} blocks of the base model, which has "
                             f"{base_cfg.n_layers}")


def build(c: ml_collections.ConfigDict, base: loading.Loaded):
  """(graphdef, params) of MAC's networks for `base`; the encoder starts from `c.encoder`'s weights.

  Raises:
    checks.ConfigError: an encoder that cannot read the base model's tokens, too many base layers, or
      cross-attention heads that do not divide the base model's width.
  """
  check_fits(c, base.cfg)
  key = "mac.base_layers" if c.encoder == "base" else "mac.encoder"
  ecfg, source = loading.backbone(c.encoder, c.base_layers, c.random, base, key)
  ecfg = ecfg.replace(dtype="float32", param_dtype="float32")
  graphdef, params = nnx.split(MAC(ecfg, base.cfg, c, rngs=nnx.Rngs(c.seed)))
  return graphdef, loading.start_from(params, source, "encoder")


# ------------------------------------------------------------------------------------------------
# Pure functions of (graphdef, params, arrays).


def amortize(graphdef, params, tokens_BxL, mask_BxL):
  """m_BxTxD: the T modulation tokens of each of B documents (or questions)."""
  return nnx.merge(graphdef, params).amortize(tokens_BxL, mask_BxL)


def question_mask(qa_mask_BxS, qa_loss_mask_BxS):
  """1 on the question's tokens of QA sequences: the real tokens before the first answer token."""
  before_answer_BxS = jnp.cumsum(jnp.asarray(qa_loss_mask_BxS, jnp.int32), axis=-1) == 0
  return (jnp.asarray(qa_mask_BxS) > 0) & before_answer_BxS


def aggregate(graphdef, params, q_BxTxD, bank_MxTxD, valid_M, window: int):
  """a_BxTxD: each question's tokens after attending over the bank, hierarchically in windows.

  The result depends only on the bank's valid documents in their order: padding documents (anywhere) and
  the bank's capacity change nothing, so a stream's bank padded to a fixed shape (one compilation) gives
  what the unpadded one would.

  Args:
    graphdef, params: MAC.
    q_BxTxD: the questions' modulation tokens (`amortize` of the questions).
    bank_MxTxD, valid_M: the memory bank (one shared by every question) and which of its rows are documents.
    window: documents per aggregation pass (static).
  """
  order_M = jnp.argsort(~jnp.asarray(valid_M, bool), stable=True)  # valid documents first, in order
  # The bank is one memory for every question (leading axis 1): its projections are computed once. The
  # levels above it hold per-question summaries (leading axis B).
  return _levels(nnx.merge(graphdef, params), q_BxTxD, bank_MxTxD[order_M][None],
                 jnp.asarray(valid_M, bool)[order_M][None], window)


def aggregate_rows(graphdef, params, q_BxTxD, bank_BxKxTxD, valid_BxK, window: int):
  """`aggregate` with a bank of its own for each question row (e.g. the documents retrieved for it)."""
  order_BxK = jnp.argsort(~jnp.asarray(valid_BxK, bool), axis=1, stable=True)
  return _levels(nnx.merge(graphdef, params), q_BxTxD, jnp.take_along_axis(bank_BxKxTxD, order_BxK[..., None, None], 1),
                 jnp.take_along_axis(jnp.asarray(valid_BxK, bool), order_BxK, 1), window)


def _levels(model, q_BxTxD, mem_BxMxTxD, valid_BxM, window: int):
  """The aggregation of a bank whose leading axis is 1 (one for every question) or B (one per question), its
  valid documents first."""
  t, d = q_BxTxD.shape[1:]

  def one_pass(m_BxNxTxD, v_BxN):
    return model.aggregate(q_BxTxD, m_BxNxTxD.reshape(m_BxNxTxD.shape[0], -1, d), jnp.repeat(v_BxN, t, axis=1))

  def levels(mem_BxMxTxD, valid_BxM):
    mb, m = mem_BxMxTxD.shape[:2]
    if m <= window:
      return one_pass(mem_BxMxTxD, valid_BxM)
    w = -(-m // window)
    mem_BxMxTxD = jnp.pad(mem_BxMxTxD, ((0, 0), (0, w * window - m), (0, 0), (0, 0)))
    valid_BxWxN = jnp.pad(valid_BxM, ((0, 0), (0, w * window - m))).reshape(valid_BxM.shape[0], w, window)
    # Each window reduced to T tokens for this question; windows with a document stay first.
    summaries_BxWxTxD = jax.vmap(one_pass, in_axes=1, out_axes=1)(mem_BxMxTxD.reshape(mb, w, window, t, d),
                                                                 valid_BxWxN)
    deeper_BxTxD = levels(summaries_BxWxTxD, valid_BxWxN.any(-1))
    # Documents that fit one window take one pass whatever the capacity: the padding adds no level.
    fits_B = valid_BxM.sum(-1) <= window
    return jnp.where(fits_B[:, None, None], one_pass(mem_BxMxTxD[:, :window], valid_BxWxN[:, 0]), deeper_BxTxD)

  return levels(mem_BxMxTxD, valid_BxM)


def prefix(graphdef, params, qa_tokens_BxS, qa_mask_BxS, qa_loss_mask_BxS, bank_MxTxD, valid_M, window: int):
  """The `transformer.Prefix` that conditions the base model on the bank for each question row."""
  q_mask_BxS = question_mask(qa_mask_BxS, qa_loss_mask_BxS).astype(jnp.int32)
  q_BxTxD = amortize(graphdef, params, qa_tokens_BxS, q_mask_BxS)
  a_BxTxD = aggregate(graphdef, params, q_BxTxD, bank_MxTxD, valid_M, window)
  return nnx.merge(graphdef, params).prefix(a_BxTxD)


def prefix_rows(graphdef, params, qa_tokens_BxS, qa_mask_BxS, qa_loss_mask_BxS, bank_BxKxTxD, valid_BxK,
                window: int):
  """`prefix` with a bank of its own for each question row (`aggregate_rows`)."""
  q_mask_BxS = question_mask(qa_mask_BxS, qa_loss_mask_BxS).astype(jnp.int32)
  q_BxTxD = amortize(graphdef, params, qa_tokens_BxS, q_mask_BxS)
  a_BxTxD = aggregate_rows(graphdef, params, q_BxTxD, bank_BxKxTxD, valid_BxK, window)
  return nnx.merge(graphdef, params).prefix(a_BxTxD)


def _conditioned_logits(graphdef, params, base_graphdef, base_params, qa_tokens_BxS, qa_mask_BxS, qa_loss_mask_BxS,
                        bank_MxTxD, valid_M, window: int):
  pfx = prefix(graphdef, params, qa_tokens_BxS, qa_mask_BxS, qa_loss_mask_BxS, bank_MxTxD, valid_M, window)
  return transformer.apply(base_graphdef, base_params, qa_tokens_BxS, qa_mask_BxS, pfx)


def answer_nll(graphdef, params, base_graphdef, base_params, qa_tokens_BxS, qa_mask_BxS, qa_loss_mask_BxS,
               bank_MxTxD, valid_M, window: int):
  """(summed answer NLL, answer tokens) of the frozen base model conditioned on the bank."""
  logits_BxSxV = _conditioned_logits(graphdef, params, base_graphdef, base_params, qa_tokens_BxS, qa_mask_BxS,
                                     qa_loss_mask_BxS, bank_MxTxD, valid_M, window)
  return loss.answer_nll(logits_BxSxV, qa_tokens_BxS, qa_loss_mask_BxS)


def answer_nll_rows(graphdef, params, base_graphdef, base_params, qa_tokens_BxS, qa_mask_BxS, qa_loss_mask_BxS,
                    bank_MxTxD, valid_M, window: int):
  """`answer_nll` per row: (summed answer NLL of each row, its answer tokens)."""
  logits_BxSxV = _conditioned_logits(graphdef, params, base_graphdef, base_params, qa_tokens_BxS, qa_mask_BxS,
                                     qa_loss_mask_BxS, bank_MxTxD, valid_M, window)
  return loss.answer_nll_rows(logits_BxSxV, qa_tokens_BxS, qa_loss_mask_BxS)


class StepConfig(NamedTuple):
  """Static settings of a training step (hashable)."""

  window: int
  questions: int  # question rows sampled per step
  backprop_docs: int  # bank documents amortized under the gradient
  contrast: float = 0.0  # weight of `bank_hinge` (0: the paper's loss alone)
  contrast_margin: float = 0.5
  retrieve: float = 0.0  # weight of `bank_retrieval`
  reconstruct: float = 0.0  # weight of `document_nll`


def step_config(c: ml_collections.ConfigDict) -> StepConfig:
  return StepConfig(c.window, c.questions, max(1, math.ceil(c.backprop_fraction * c.bank_docs)),
                    float(c.contrast), float(c.contrast_margin), float(c.retrieve), float(c.reconstruct))


def _bank_of(graphdef, params, batch, rng, backprop_docs: int):
  """The batch's documents amortized into a bank; only `backprop_docs` random ones carry a gradient: (bank_KxTxD,
  valid_K, each batch document's row in the bank, (tokens_NxL, mask_NxL) of the ones with a gradient, which
  are the bank's first N rows)."""
  order_K = jax.random.permutation(rng, batch["doc_tokens_BxL"].shape[0])
  tokens_KxL, mask_KxL = batch["doc_tokens_BxL"][order_K], batch["doc_mask_BxL"][order_K]
  n = backprop_docs
  with_grad_NxTxD = amortize(graphdef, params, tokens_KxL[:n], mask_KxL[:n])
  # Constant params, not a stop_gradient on the output: no tangent enters, so no residual is stored.
  frozen_RxTxD = amortize(graphdef, jax.lax.stop_gradient(params), tokens_KxL[n:], mask_KxL[n:])
  bank_KxTxD = jnp.concatenate([with_grad_NxTxD, frozen_RxTxD], axis=0)  # the aggregation is order-free
  # Where each of the batch's documents sits in the bank.
  position_B = jnp.argsort(order_K)
  # A padding document has no tokens (mask 0), so nothing of it is reconstructed.
  return bank_KxTxD, batch["doc_valid_B"][order_K], position_B, (tokens_KxL[:n], mask_KxL[:n])


def _sampled_questions(batch, rng, n: int):
  """n question rows drawn without replacement from the batch's valid (document, slot) rows: their tokens,
  mask, answer mask, and the batch index of each one's document."""
  tokens_BQxS = batch["qa_tokens_BxQxS"].reshape(-1, batch["qa_tokens_BxQxS"].shape[-1])
  flat = lambda k: batch[k].reshape(tokens_BQxS.shape[0], -1)
  valid_BQ = batch["qa_valid_BxQ"].reshape(-1)
  # Valid rows first, in random order; padding rows only where there are fewer than n valid ones.
  idx_N = jnp.argsort(jax.random.uniform(rng, valid_BQ.shape) - 2.0 * valid_BQ)[:n]
  return (tokens_BQxS[idx_N], flat("qa_mask_BxQxS")[idx_N],
          flat("qa_loss_mask_BxQxS")[idx_N] & valid_BQ[idx_N, None], idx_N // batch["qa_tokens_BxQxS"].shape[1])


def bank_hinge(graphdef, params, base_graphdef, base_params, tokens_NxS, mask_NxS, loss_mask_NxS, bank_KxTxD,
               valid_K, own_N, window: int, margin: float, own_rows=None):
  """(mean over the question rows with an answer of relu(margin - gap), mean gap), where a row's gap is its
  answer NLL per token with the bank minus its own document (bank row own_N) less that with the whole bank:
  what its own document is worth to it. `own_rows`: `answer_nll_rows` with the whole bank, when the caller
  has it (else computed)."""
  k, n = bank_KxTxD.shape[0], tokens_NxS.shape[0]
  valid_K = jnp.asarray(valid_K, bool)
  if own_rows is None:
    own_rows = answer_nll_rows(graphdef, params, base_graphdef, base_params, tokens_NxS, mask_NxS, loss_mask_NxS,
                               bank_KxTxD, valid_K, window)
  with_R, count_R = own_rows
  without_own_NxK = valid_K[None, :] & (jnp.arange(k)[None, :] != own_N[:, None])
  pfx = prefix_rows(graphdef, params, tokens_NxS, mask_NxS, loss_mask_NxS,
                    jnp.broadcast_to(bank_KxTxD[None], (n,) + bank_KxTxD.shape), without_own_NxK, window)
  without_R, _ = loss.answer_nll_rows(transformer.apply(base_graphdef, base_params, tokens_NxS, mask_NxS, pfx),
                                      tokens_NxS, loss_mask_NxS)
  answered_R = count_R > 0
  gap_R = (without_R - with_R) / jnp.maximum(count_R, 1.0)
  mean = lambda x_R: jnp.where(answered_R, x_R, 0.0).sum() / jnp.maximum(answered_R.sum(), 1)
  return mean(jax.nn.relu(margin - gap_R)), mean(gap_R)


def retrieval_rows(graphdef, params, tokens_NxS, mask_NxS, loss_mask_NxS, bank_KxTxD, valid_K, own_N):
  """Per question row: (InfoNCE loss, hit) of picking its own document (bank row own_N) among the bank's
  valid ones, by its score: the first aggregation block's attention logits of the question's tokens over the
  document's T tokens, logsumexp over those tokens, mean over heads and question tokens."""
  model = nnx.merge(graphdef, params)
  q_mask_NxS = question_mask(mask_NxS, loss_mask_NxS).astype(jnp.int32)
  q_NxTxD = model.amortize(tokens_NxS, q_mask_NxS)
  k, t, d = bank_KxTxD.shape
  scores_NxHxTxS, _ = model.aggregator[0].scores(q_NxTxD, bank_KxTxD.reshape(1, k * t, d))
  n, h = scores_NxHxTxS.shape[:2]
  by_doc_NxK = jax.nn.logsumexp(scores_NxHxTxS.reshape(n, h, t, k, t), axis=-1).mean(axis=(1, 2))
  by_doc_NxK = jnp.where(jnp.asarray(valid_K, bool)[None], by_doc_NxK, _MASKED)
  nll_N = -jnp.take_along_axis(jax.nn.log_softmax(by_doc_NxK, -1), own_N[:, None], 1)[:, 0]
  return nll_N, (jnp.argmax(by_doc_NxK, -1) == own_N).astype(jnp.float32)


def bank_retrieval(graphdef, params, tokens_NxS, mask_NxS, loss_mask_NxS, bank_KxTxD, valid_K, own_N):
  """(InfoNCE loss, accuracy) of `retrieval_rows`, over the question rows with an answer (padding rows count
  for nothing)."""
  nll_N, hit_N = retrieval_rows(graphdef, params, tokens_NxS, mask_NxS, loss_mask_NxS, bank_KxTxD, valid_K, own_N)
  answered_N = loss_mask_NxS.any(-1)
  mean = lambda x_N: jnp.where(answered_N, x_N, 0.0).sum() / jnp.maximum(answered_N.sum(), 1)
  return mean(nll_N), mean(hit_N)


def document_nll(graphdef, params, base_graphdef, base_params, tokens_NxL, mask_NxL, m_NxTxD, window: int):
  """(summed NLL of each document's tokens by the frozen base model, its predicted tokens), given the prefix
  aggregated from that document's modulation tokens m_NxTxD alone (a bank of one) by a zero query: what the
  amortization carries of its document, with no question to lean on.

  The query is zero, not a question's tokens, because the aggregation adds its result to its query: the
  document's content has to pass through the attention over the bank, the path a question reads it by.
  """
  model = nnx.merge(graphdef, params)
  n = m_NxTxD.shape[0]
  a_NxTxD = _levels(model, jnp.zeros_like(m_NxTxD), m_NxTxD[:, None], jnp.ones((n, 1), bool), window)
  logits_NxLxV = transformer.apply(base_graphdef, base_params, tokens_NxL, mask_NxL, model.prefix(a_NxTxD))
  target_NxL = loss.target_mask(mask_NxL)
  return (loss.token_nll(logits_NxLxV, tokens_NxL) * target_NxL).sum(-1), target_NxL.sum(-1)


def _bank_and_questions(graphdef, params, batch, rng, scfg: StepConfig):
  """A training step's bank (`_bank_of`) and sampled questions (`_sampled_questions`), each question's document
  given as its row in the bank: (bank_KxTxD, valid_K, (tokens, mask, loss mask), own_N, the back-propagated
  documents (tokens_NxL, mask_NxL): the bank's first N rows)."""
  bank_rng, q_rng = jax.random.split(rng)
  bank_KxTxD, valid_K, position_B, grad_docs = _bank_of(graphdef, params, batch, bank_rng, scfg.backprop_docs)
  tokens, mask, loss_mask, doc_N = _sampled_questions(batch, q_rng, scfg.questions)
  return bank_KxTxD, valid_K, (tokens, mask, loss_mask), position_B[doc_N], grad_docs


def train_loss(params, base_params, batch, rng, *, graphdef, base_graphdef, scfg: StepConfig):
  """(loss, metrics): the mean answer NLL of sampled questions given the prefix aggregated over the batch's
  bank, plus `scfg.contrast` times `bank_hinge`, `scfg.retrieve` times `bank_retrieval` and `scfg.reconstruct`
  times `document_nll` per token of the back-propagated documents."""
  bank_KxTxD, valid_K, (tokens, mask, loss_mask), own_N, grad_docs = _bank_and_questions(graphdef, params, batch,
                                                                                         rng, scfg)
  args = (graphdef, params, base_graphdef, base_params, tokens, mask, loss_mask, bank_KxTxD, valid_K, scfg.window)
  if not scfg.contrast:
    total, count = answer_nll(*args)
    nll = total / jnp.maximum(count, 1.0)
    value, metrics = nll, {"nll": nll}
  else:
    own_rows = answer_nll_rows(*args)  # the whole bank's pass serves the NLL and the hinge
    nll = own_rows[0].sum() / jnp.maximum(own_rows[1].sum(), 1.0)
    hinge, gap = bank_hinge(*args[:-1], own_N, scfg.window, scfg.contrast_margin, own_rows=own_rows)
    value, metrics = nll + scfg.contrast * hinge, {"nll": nll, "hinge": hinge, "bank_gap": gap}
  if scfg.retrieve:
    retrieval_nll, hits = bank_retrieval(graphdef, params, tokens, mask, loss_mask, bank_KxTxD, valid_K, own_N)
    value, metrics = value + scfg.retrieve * retrieval_nll, metrics | {"retrieval_nll": retrieval_nll,
                                                                       "retrieval_acc": hits}
  if scfg.reconstruct:
    doc_tokens_NxL, doc_mask_NxL = grad_docs
    total_N, count_N = document_nll(graphdef, params, base_graphdef, base_params, doc_tokens_NxL, doc_mask_NxL,
                                    bank_KxTxD[:doc_tokens_NxL.shape[0]], scfg.window)
    doc_nll = total_N.sum() / jnp.maximum(count_N.sum(), 1.0)
    value, metrics = value + scfg.reconstruct * doc_nll, metrics | {"doc_nll": doc_nll}
  return value, metrics


def train_step(params, opt_state, base_params, batch, rng, *, graphdef, base_graphdef, scfg: StepConfig,
               optimizer: optax.GradientTransformation):
  """One Adam step on MAC's parameters; the base model is an input only, never differentiated."""
  loss_fn = functools.partial(train_loss, base_params=base_params, batch=batch, rng=rng, graphdef=graphdef,
                              base_graphdef=base_graphdef, scfg=scfg)
  return _optimizer_step(loss_fn, params, opt_state, optimizer)


def _optimizer_step(loss_fn, params, opt_state, optimizer: optax.GradientTransformation):
  """params -> (loss, metrics) `loss_fn` stepped once: (params, opt_state, metrics with "loss", "grad_norm")."""
  (value, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, {"loss": value, "grad_norm": optax.tree.norm(grads)} | metrics


def retrieval_loss(params, batch, rng, *, graphdef, scfg: StepConfig):
  """(`bank_retrieval`'s InfoNCE, metrics) of sampled questions against the batch's bank: the loss of the
  `retrieve_steps` (no base-model pass, so a step costs about the amortization of the bank)."""
  bank_KxTxD, valid_K, questions, own_N, _ = _bank_and_questions(graphdef, params, batch, rng, scfg)
  nll, hits = bank_retrieval(graphdef, params, *questions, bank_KxTxD, valid_K, own_N)
  return nll, {"retrieval_nll": nll, "retrieval_acc": hits}


def retrieval_step(params, opt_state, batch, rng, *, graphdef, scfg: StepConfig,
                   optimizer: optax.GradientTransformation):
  """One Adam step on `retrieval_loss` alone."""
  loss_fn = functools.partial(retrieval_loss, batch=batch, rng=rng, graphdef=graphdef, scfg=scfg)
  return _optimizer_step(loss_fn, params, opt_state, optimizer)


def eval_rows(params, base_params, batch, bank_KxTxD, other_bank_KxTxD, other_valid_K, *, graphdef, base_graphdef,
              window: int):
  """For each question row of a batch (B x Q rows; a padding row has no tokens): its summed answer NLL given
  its own documents' bank, given another bank (whose documents do not hold its answers), and with no prefix
  (the base model), its answer tokens, and whether `retrieval_rows` picks its own document out of its bank."""
  shape = batch["qa_tokens_BxQxS"].shape
  rows = lambda k: batch[k].reshape(shape[0] * shape[1], shape[2])
  tokens, mask = rows("qa_tokens_BxQxS"), rows("qa_mask_BxQxS")
  loss_mask = rows("qa_loss_mask_BxQxS") & batch["qa_valid_BxQ"].reshape(-1)[:, None]
  base = base_graphdef, base_params

  def nll(bank, valid):
    pfx = prefix(graphdef, params, tokens, mask, loss_mask, bank, valid, window)
    return loss.answer_nll_rows(transformer.apply(*base, tokens, mask, pfx), tokens, loss_mask)[0]
  base_R, count_R = loss.answer_nll_rows(transformer.apply(*base, tokens, mask), tokens, loss_mask)
  _, hit_R = retrieval_rows(graphdef, params, tokens, mask, loss_mask, bank_KxTxD, batch["doc_valid_B"],
                            jnp.arange(tokens.shape[0]) // shape[1])
  return {"nll": nll(bank_KxTxD, batch["doc_valid_B"]), "nll_other_bank": nll(other_bank_KxTxD, other_valid_K),
          "nll_base": base_R, "tokens": count_R, "retrieval_hit": hit_R}


def doc_rows(params, base_params, batch, bank_KxTxD, other_bank_KxTxD, other_valid_K, *, graphdef, base_graphdef,
             window: int):
  """For each document slot of a batch: `document_nll` given its own modulation tokens and given those of the
  other bank's document in the same slot, and its predicted tokens (0 where either slot is padding)."""
  tokens, mask = batch["doc_tokens_BxL"], batch["doc_mask_BxL"]
  both_K = jnp.asarray(batch["doc_valid_B"], bool) & jnp.asarray(other_valid_K, bool)
  nll = lambda m: document_nll(graphdef, params, base_graphdef, base_params, tokens, mask, m, window)
  own_K, count_K = nll(bank_KxTxD)
  return {"doc_nll": own_K, "doc_nll_other": nll(other_bank_KxTxD)[0], "doc_tokens": jnp.where(both_K, count_K, 0.0)}


# ------------------------------------------------------------------------------------------------
# The memory bank of a stream.


class Bank:
  """The modulation tokens of the documents read so far, T per document, in arrival order.

  Appending writes the document's T x D tokens into a buffer that doubles when full, so a stream of M
  documents copies O(M) bytes (a concatenation per document copied O(M^2)). A bank is a value: appending
  to one that is not the newest bank of its buffer (a branch) copies it into a buffer of its own first, and
  the documents a later append wrote past its end are never read as its own.
  """

  def __init__(self, tokens_MxTxD: np.ndarray):
    """A bank holding `tokens_MxTxD` (copied into a buffer of its own)."""
    m, t, d = np.shape(tokens_MxTxD)
    self._buf_CxTxD = np.zeros((max(m, 1), t, d), np.float32)
    self._buf_CxTxD[:m] = tokens_MxTxD
    self._m = m
    self._fill = [m]  # documents written into the buffer, shared by every bank on it

  @classmethod
  def empty(cls, tokens: int, d_model: int, capacity: int = 8) -> "Bank":
    """A bank of no documents whose buffer holds `capacity` before it first grows."""
    bank = cls(np.zeros((0, tokens, d_model), np.float32))
    bank._buf_CxTxD = np.zeros((max(capacity, 1), tokens, d_model), np.float32)
    return bank

  def append(self, m_TxD) -> "Bank":
    m_TxD = np.asarray(m_TxD, np.float32)
    if m_TxD.shape != self._buf_CxTxD.shape[1:]:
      raise ValueError(f"Bank.append: a document of shape {m_TxD.shape}, the bank's are "
                       f"{self._buf_CxTxD.shape[1:]}")
    buf, fill = self._buf_CxTxD, self._fill
    if self._m != fill[0] or self._m == len(buf):  # a branch, or full: a buffer of its own, twice as large
      buf = np.zeros((2 * max(self._m, 1),) + buf.shape[1:], np.float32)
      buf[:self._m] = self._buf_CxTxD[:self._m]
      fill = [self._m]
    buf[self._m] = m_TxD
    fill[0] += 1
    bank = object.__new__(Bank)
    bank._buf_CxTxD, bank._m, bank._fill = buf, self._m + 1, fill
    return bank

  @property
  def tokens_MxTxD(self) -> np.ndarray:
    """The bank's documents (a read-only view of its buffer)."""
    view = self._buf_CxTxD[:self._m]
    view.flags.writeable = False
    return view

  @property
  def capacity(self) -> int:
    """Documents the buffer holds before it next grows."""
    return len(self._buf_CxTxD)

  @property
  def docs(self) -> int:
    return self._m

  @property
  def size_tokens(self) -> int:
    return self._m * self._buf_CxTxD.shape[1]

  @property
  def nbytes(self) -> int:
    """Bytes of the bank's documents (its buffer holds at most twice as many)."""
    return self._m * self._buf_CxTxD[0].nbytes

  def padded(self, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(bank_MxTxD, valid_M) zero-padded to `capacity` documents: one compiled shape for a whole stream."""
    m, (_, t, d) = self._m, self._buf_CxTxD.shape
    capacity = max(capacity, m)
    bank = np.zeros((capacity, t, d), np.float32)
    bank[:m] = self._buf_CxTxD[:m]
    return bank, np.arange(capacity) < m

  def save(self, directory: str) -> None:
    """An orbax checkpoint of the bank (step = its document count), as any other state."""
    with checkpoint.Checkpointer(directory, max_to_keep=1) as ckpt:
      ckpt.save(self.docs, {"bank": self.tokens_MxTxD}, meta={"shape": list(self.tokens_MxTxD.shape)})

  @classmethod
  def restore(cls, directory: str) -> "Bank":
    if not os.path.isdir(directory):
      raise checks.UserError(f"{directory}: no saved memory bank")
    with checkpoint.Checkpointer(directory, max_to_keep=1) as ckpt:
      if ckpt.latest_step() is None:
        raise checks.UserError(f"{directory}: no saved memory bank")
      meta = ckpt.restore(None, None).meta
      abstract = {"bank": np.zeros(meta["shape"], np.float32)}
      return cls(np.asarray(ckpt.restore(None, abstract).state["bank"]))


def stream_bank(graphdef, params, docs, spec: pipeline.Spec, pad_id: int, tokens: int, d_model: int,
                on_doc=None, progress: bool = False, desc: str = "mac bank"):
  """The bank of `docs` read in order (`on_doc(i, bank)` after each); each document costs one `amortize`."""
  bank = Bank.empty(tokens, d_model, capacity=len(docs))
  for i, d in enumerate(tqdm.tqdm(docs, desc=desc, disable=not progress, leave=False)):
    b = pipeline.doc_batch([d], spec, pad_id)
    m_1xTxD = amortize_jit(graphdef, params, b["doc_tokens_BxL"], b["doc_mask_BxL"])
    bank = bank.append(sharding.to_host(m_1xTxD)[0])  # split over processes when the FSDP axis spans them
    if on_doc is not None:
      on_doc(i, bank)
  return bank


amortize_jit = jax.jit(amortize, static_argnums=0)


@functools.partial(jax.jit, static_argnames=("graphdef", "window"))
def _prefix_jit(graphdef, params, batch, bank_MxTxD, valid_M, *, window):
  return prefix(graphdef, params, batch["qa_tokens_BxS"], batch["qa_mask_BxS"],
                batch["qa_loss_mask_BxS"], bank_MxTxD, valid_M, window)


QUESTION_KEYS = ("qa_tokens_BxS", "qa_mask_BxS", "qa_loss_mask_BxS")  # what a prefix reads of a QA batch


@functools.partial(jax.jit, static_argnames=("graphdef", "window"))
def prefix_rows_jit(graphdef, params, batch, bank_BxKxTxD, valid_BxK, *, window):
  return prefix_rows(graphdef, params, batch["qa_tokens_BxS"], batch["qa_mask_BxS"], batch["qa_loss_mask_BxS"],
                     bank_BxKxTxD, valid_BxK, window)


def prefix_fn(graphdef, params, bank: Bank, capacity: int, window: int):
  """batch -> the prefix of its question rows given `bank` (what `qa.evaluate_qa(prefix_fn=)` takes)."""
  bank_MxTxD, valid_M = bank.padded(capacity)
  return lambda batch: _prefix_jit(graphdef, params, {k: batch[k] for k in QUESTION_KEYS},
                                   bank_MxTxD, valid_M, window=window)


def prefix_lowered(graphdef, params, batch, bank: Bank, capacity: int, window: int) -> jax.stages.Lowered:
  """`prefix_fn`'s computation for one QA batch, lowered and not run (for XLA's memory analysis)."""
  bank_MxTxD, valid_M = bank.padded(capacity)
  return _prefix_jit.lower(graphdef, params, {k: batch[k] for k in QUESTION_KEYS}, bank_MxTxD, valid_M,
                           window=window)


# ------------------------------------------------------------------------------------------------
# Training.


def make_optimizer(c: ml_collections.ConfigDict, lr: float | None = None) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(c.grad_clip), optax.adam(c.lr if lr is None else lr))


def bank_loader(docs, spec: pipeline.Spec, pad_id: int, bank_docs: int, seed: int) -> pipeline.Loader:
  """Endless shuffled banks of `bank_docs` documents with all their questions (checkpointable position)."""
  items = pipeline.meta_items(docs, spec.qa_slots)
  return pipeline.Loader(lambda docs: _bank_batch([items[i] for i in docs], spec, pad_id),
                         docs=pipeline.Batcher(len(items), bank_docs, seed))


def _bank_batch(items, spec, pad_id):
  batch = pipeline.meta_batch(items, [], spec, pad_id)
  batch.pop("loc_tokens_KxT"), batch.pop("loc_mask_KxT")
  batch.pop("doc_answer_mask_BxL")
  return batch


def val_batches(docs, spec: pipeline.Spec, pad_id: int, bank_docs: int):
  """`docs` in order as banks of `bank_docs` documents (the last padded with empty ones)."""
  items = pipeline.meta_items(docs, spec.qa_slots)
  chunks = [items[i:i + bank_docs] for i in range(0, len(items), bank_docs)]
  return [_bank_batch(chunk + [None] * (bank_docs - len(chunk)), spec, pad_id) for chunk in chunks]


JOB = "mac"  # the loop's checkpoints: <workdir>/mac
BEST_METRIC = "val_nll"  # meta-val answer NLL with the questions' own bank


class Trainable(NamedTuple):
  """What `init` builds: MAC's graph, the state the loop trains and checkpoints, its optimizer."""

  graphdef: nnx.GraphDef
  # {"params": MAC's networks, "opt": the optimizer's state, and "opt_retrieve" with mac.retrieve_steps}
  state: dict
  optimizer: optax.GradientTransformation
  retrieval_optimizer: optax.GradientTransformation | None = None  # of the `retrieve_steps`


def init(config: ml_collections.ConfigDict, base: loading.Loaded, mesh) -> Trainable:
  """MAC's networks and optimizer state on `mesh`, split over its FSDP axis like the base model: what `fit`
  trains and `load_trained` restores onto."""
  graphdef, params = build(config.mac, base)
  optimizer = make_optimizer(config.mac)
  params = sharding.place_params(params, mesh)
  state = {"params": params, "opt": sharding.place_params(optimizer.init(params), mesh)}
  if not config.mac.retrieve_steps:
    return Trainable(graphdef, state, optimizer)
  retrieval_optimizer = make_optimizer(config.mac, config.mac.retrieve_lr)
  state["opt_retrieve"] = sharding.place_params(retrieval_optimizer.init(params), mesh)
  return Trainable(graphdef, state, optimizer, retrieval_optimizer)


def other_bank_of(counts: list[int], i: int) -> int | None:
  """The meta-val batch whose documents are batch i's other bank: the first one after i (cyclically) with at
  least as many documents as i, cut to i's number (its documents come first), so that the control differs from
  the own bank in which documents it holds, not in how many: the prefix depends on a bank's size (one
  aggregation pass up to `window` documents, hierarchical levels above). None (an empty bank) when no other
  batch has enough."""
  n = len(counts)
  return next((j % n for j in range(i + 1, i + n) if counts[j % n] >= counts[i]), None)


def _validation(graphdef, eval_fn, base_params, vals, doc_fn=None):
  """(params -> meta-val answer NLL with each batch's own bank, another batch's bank, and no bank;
  params -> the same per question, with paired intervals: `by_question`). With `doc_fn` (`doc_rows`), each
  also gives the meta-val documents' own NLL given their own modulation tokens and another document's."""

  counts = [int(np.sum(b["doc_valid_B"])) for b in vals]
  fns = {"tokens": eval_fn} | ({"doc_tokens": doc_fn} if doc_fn is not None else {})

  def rows_of(params):
    """{count key: its function's rows over every meta-val batch, concatenated, rows with no such tokens
    dropped}: `eval_fn`'s under "tokens", `doc_fn`'s under "doc_tokens". Each bank is amortized once."""
    banks = [amortize_jit(graphdef, params, b["doc_tokens_BxL"], b["doc_mask_BxL"]) for b in vals]
    out = {count: [] for count in fns}
    for i, batch in enumerate(vals):
      j = other_bank_of(counts, i)
      other = ((banks[j], np.arange(len(batch["doc_valid_B"])) < counts[i]) if j is not None
               else (banks[i], np.zeros_like(batch["doc_valid_B"])))
      for count, fn in fns.items():
        # Per-row outputs may be split over the devices of several processes (the FSDP axis): gathered whole.
        out[count].append({k: sharding.to_host(v).astype(np.float64)
                           for k, v in fn(params, base_params, batch, banks[i], *other).items()})
    joined = {count: {k: np.concatenate([o[k] for o in outs]) for k in outs[0]} for count, outs in out.items()}
    return {count: {k: v[rows[count] > 0] for k, v in rows.items()} for count, rows in joined.items()}

  def validate(params):
    all_rows = rows_of(params)
    rows = all_rows["tokens"]
    sums = {k: float(v.sum()) for k, v in rows.items()}
    n = max(sums["tokens"], 1.0)
    out = {"val_nll": sums["nll"] / n, "val_nll_other_bank": sums["nll_other_bank"] / n,
           "val_nll_base": sums["nll_base"] / n, "val_tokens": int(sums["tokens"]),
           # Questions whose own document the first aggregation block ranks first in their bank.
           "val_retrieval_acc": float(rows["retrieval_hit"].mean())}
    docs = {k: float(v.sum()) for k, v in all_rows.get("doc_tokens", {}).items()}
    if docs.get("doc_tokens"):  # none when meta-val fills one batch: no other bank
      out |= {"val_doc_nll": docs["doc_nll"] / docs["doc_tokens"],
              "val_doc_nll_other": docs["doc_nll_other"] / docs["doc_tokens"]}
    return out

  def by_question(params):
    all_rows = rows_of(params)
    r = all_rows["tokens"]
    mean = {k: r[k] / r["tokens"] for k in ("nll", "nll_other_bank", "nll_base")}  # each question's mean
    out = {"questions": len(r["tokens"]), "nll": float(mean["nll"].mean()),
           "retrieval_acc": float(r["retrieval_hit"].mean()),
           "nll_other_bank": float(mean["nll_other_bank"].mean()), "nll_base": float(mean["nll_base"].mean()),
           "own_minus_other_bank": stats.paired_bootstrap_ci(mean["nll"], mean["nll_other_bank"]),
           "own_minus_base": stats.paired_bootstrap_ci(mean["nll"], mean["nll_base"])}
    d = all_rows.get("doc_tokens")
    if d is not None and len(d["doc_tokens"]):
      own, other = d["doc_nll"] / d["doc_tokens"], d["doc_nll_other"] / d["doc_tokens"]  # per token, each document
      out["documents"] = {"docs": len(own), "doc_nll": float(own.mean()), "doc_nll_other": float(other.mean()),
                          "own_minus_other": stats.paired_bootstrap_ci(own, other)}
    return out
  return validate, by_question


def train_docs(config: ml_collections.ConfigDict, base: loading.Loaded, data, workdir: str) -> list:
  """MAC's training documents: the meta-train split, or the first `mac.train_docs` generated meta-train
  documents (which start with the split's own)."""
  n = config.mac.train_docs
  if not n:
    return data.splits["meta_train"]
  return dataset.generated_docs(config.data, base.tokenizer, workdir, "meta_train", n)


def fit(config: ml_collections.ConfigDict, base: loading.Loaded, base_params, data, workdir: str, writer,
        progress: bool = True):
  """Trains MAC on `train_docs` with the (QA-tuned) base model frozen; validates on meta-val.

  Resumes from <workdir>/mac's latest checkpoint (data position and RNG included), through `loop.run`.

  Returns:
    (graphdef, best params by validation answer NLL, results {"history", "best", "best_step", ...}).
  """
  c = config.mac
  # On the base model's mesh, split over its FSDP axis like the base model (the batches stay whole).
  t = init(config, base, sharding.mesh_of(base_params))
  spec, pad = data.spec, data.pad_id
  docs = train_docs(config, base, data, workdir)
  loader = bank_loader(docs, spec, pad, c.bank_docs, c.seed)
  kw = dict(graphdef=t.graphdef, base_graphdef=base.graphdef)
  train_fn = jax.jit(functools.partial(train_step, scfg=step_config(c), optimizer=t.optimizer, **kw),
                     donate_argnums=(0, 1))
  val_docs = data.splits["meta_val"][:c.val_docs or None]
  # With the reconstruction term, validation also says whether a document's tokens carry that document.
  doc_fn = jax.jit(functools.partial(doc_rows, window=c.window, **kw)) if c.reconstruct else None
  validate, by_question = _validation(t.graphdef, jax.jit(functools.partial(eval_rows, window=c.window, **kw)),
                                      base_params, val_batches(val_docs, spec, pad, c.bank_docs), doc_fn)

  if c.retrieve_steps:
    retrieve_fn = jax.jit(functools.partial(retrieval_step, graphdef=t.graphdef, scfg=step_config(c),
                                            optimizer=t.retrieval_optimizer), donate_argnums=(0, 1))

  def step_fn(state, carry, step, rng):
    if step < c.retrieve_steps:
      params, opt_state, m = retrieve_fn(state["params"], state["opt_retrieve"], next(loader), rng)
      return state | {"params": params, "opt_retrieve": opt_state}, carry, m
    params, opt_state, m = train_fn(state["params"], state["opt"], base_params, next(loader), rng)
    return state | {"params": params, "opt": opt_state}, carry, m

  r = loop.run(loop.LoopConfig(JOB, c.steps, c.val_every, BEST_METRIC), t.state, step_fn,
               lambda state: validate(state["params"]), workdir=workdir, writer=writer, rng=jax.random.key(c.seed),
               loader=loader, progress=progress, desc="mac train")
  results = {"best_step": r.best_step, "best": r.best, "history": r.history, "train_docs": len(docs),
             "val_docs": len(val_docs),
             # The best networks' meta-val answer NLL per question: own bank against another bank and none.
             "val_by_question": by_question(r.state["params"]),
             "params": int(sum(x.size for x in jax.tree.leaves(r.state["params"]))),
             "bank_bytes_per_doc": c.tokens * base.cfg.d_model * 4}
  return t.graphdef, r.state["params"], results


def require_trained(workdir: str) -> None:
  """Raises `no_trained_mac` unless <workdir>/mac holds trained networks (before anything loads)."""
  loop.require_trained(os.path.join(workdir, JOB), no_trained_mac)


def load_trained(config: ml_collections.ConfigDict, base: loading.Loaded, workdir: str):
  """(graphdef, params) of the best checkpoint of the mac job in `workdir`, on `base`'s mesh as `fit` put them."""
  t = init(config, base, sharding.mesh_of(base.params))  # the restore follows the target's shardings
  return t.graphdef, loop.restore_best(os.path.join(workdir, JOB), t.state, no_trained_mac)["params"]


def no_trained_mac(directory: str) -> checks.UserError:
  return checks.UserError(f"{directory}: no trained MAC networks, which eval.methods=mac needs; run "
                          f"`python -m camels_jax.train` with this config and workdir first (jobs ...,mac), or "
                          f"drop mac from eval.methods")
