"""CaMeLS: a weighting model meta-trained so that SGD on its weighted LM loss teaches the base model.

For a meta-batch of documents d_1..d_B (one stream; see `meta_loss_streams` for several), the weighting
model gives every token a weight; the base model takes one SGD step per document, in order, on the
weighted loss (`adapt.inner`); the outer loss is the adapted model's answer NLL on the documents'
questions plus c_kl * KL(base || adapted) on an unrelated locality text. The meta-gradient is
`jax.grad` of that through the inner steps: exact and second order unless `first_order` is set.
"""

import dataclasses
import functools
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from camels_jax import checks, loop, sharding, stats
from camels_jax.data import pipeline
from camels_jax.adapt import inner as inner_lib
from camels_jax.adapt import loss
from camels_jax.adapt import uptake as uptake_lib
from camels_jax.methods import baselines
from camels_jax.models import loading, transformer
from camels_jax.models.config import ModelConfig

INIT_WEIGHT = math.log(2.0) / 3.0  # softplus_beta(0) with beta = 3: every token's weight at init


class WeightingModel(nnx.Module):
  """Causal transformer backbone + MLP head (d -> hidden -> 1, GELU) + softplus(beta), masked."""

  def __init__(self, backbone: ModelConfig, hidden: int, beta: float, mean_weight: float = 0.0, *,
               rngs: nnx.Rngs):
    self.beta, self.mean_weight = beta, mean_weight
    self.backbone = transformer.Decoder(backbone, rngs=rngs)
    dtype, param_dtype = backbone.compute_dtype, backbone.storage_dtype
    self.fc1 = nnx.Linear(backbone.d_model, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # Zero last layer: every token starts at the same weight, softplus_beta(0) = ln2 / beta.
    self.fc2 = nnx.Linear(hidden, 1, kernel_init=nnx.initializers.zeros_init(),
                          bias_init=nnx.initializers.zeros_init(), dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs)

  def __call__(self, tokens_BxL, mask_BxL):
    h_BxLxD, _ = self.backbone.features(tokens_BxL, transformer.positions(mask_BxL), mask_BxL)
    z_BxL = self.fc2(jax.nn.gelu(self.fc1(h_BxLxD), approximate=False))[..., 0]
    z_BxL = transformer.upcast(z_BxL)
    w_BxL = jax.nn.softplus(self.beta * z_BxL) / self.beta * mask_BxL
    if self.mean_weight > 0:
      # Each document's weights rescaled to one mean: the inner step's size is then fixed by the inner lr,
      # and the meta-gradient can only move weight between tokens, not grow every weight (a larger step).
      w_BxL = w_BxL * (self.mean_weight / jnp.maximum(uptake_lib.mean_weight_B(w_BxL, mask_BxL), 1e-30))[:, None]
    return w_BxL


def weighting_config() -> ml_collections.ConfigDict:
  """The `weighting` section of a CaMeLS config."""
  return ml_collections.ConfigDict(dict(
      # "base": the first `base_layers` blocks of the base model, initialised from its weights;
      # "random": a small backbone (`random` shape, base vocabulary) from scratch; else a model source
      # (as model.source: .gguf, HF folder, "hub:NAME") sharing the base model's tokenizer.
      backbone="base",
      base_layers=4,  # blocks taken from the base model when backbone == "base" (1 to its n_layers)
      # backbone == "random": sizes >= 1, d_model a multiple of n_heads, n_heads a multiple of n_kv_heads.
      random=dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256),
      hidden=128,  # width of the MLP head (reference: 128)
      beta=3.0,  # softplus sharpness, > 0 (reference: 3)
      # > 0: every document's weights are rescaled to this mean (over its predicted tokens), so meta-training
      # learns where to put the weight, not how big a step to take (that is the inner lr). >= 0; 0 = off (ref.).
      mean_weight=0.0,
      seed=0,  # init seed of the head (and of a random backbone)
  ))


WEIGHTING_RULES = {
    "backbone": checks.nonempty_string,
    "base_layers": checks.count,
    "random": {name: checks.count for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff")},
    "hidden": checks.count,
    "beta": checks.positive,
    "mean_weight": checks.non_negative,
    "seed": checks.seed,
}


def _random_backbone(c, at=""):
  """A random backbone's heads must divide as a ModelConfig needs (its own check, at a stand-in vocabulary)."""
  if c.backbone != "random":
    return []
  try:
    ModelConfig(arch="llama", vocab_size=1, max_len=1, **c.random.to_dict())
  except (TypeError, ValueError) as e:
    return [f"{at}random: {e}"]
  return []


WEIGHTING_CROSS = [_random_backbone]


def build_weighting_model(wcfg: ml_collections.ConfigDict, base: loading.Loaded):
  """(graphdef, params) of the weighting model described by `wcfg`, sharing `base`'s tokenizer."""
  bcfg, source = loading.backbone(wcfg.backbone, wcfg.base_layers, wcfg.random, base,
                                  "weighting.backbone" if wcfg.backbone != "base" else "weighting.base_layers")
  graphdef, params = nnx.split(WeightingModel(bcfg, wcfg.hidden, wcfg.beta, wcfg.mean_weight,
                                              rngs=nnx.Rngs(wcfg.seed)))
  return graphdef, loading.start_from(params, source, "backbone")


def token_weights(wm_graphdef, wm_params, tokens_BxL, mask_BxL):
  """w_BxL: the weighting model's weight of every token (0 on padding)."""
  return nnx.merge(wm_graphdef, wm_params)(tokens_BxL, mask_BxL)


@dataclasses.dataclass(frozen=True)
class MetaConfig:
  """Static settings of the meta objective (a jit static argument)."""

  inner: inner_lib.InnerConfig = inner_lib.InnerConfig()
  inner_lr: float = 5e-4  # SGD lr of the inner update (reference: 5e-4)
  learn_inner_lr: bool = False  # meta-learn log(inner lr) too
  c_kl: float = 0.1  # weight of the locality KL (reference: 0.1)
  mixing: bool = False  # average the outer loss over the params after each inner pass


def init_meta_params(wm_params, mcfg: MetaConfig) -> dict:
  """The meta-parameters: the weighting model and, if learned, the log inner lr."""
  meta = {"wm": wm_params}
  if mcfg.learn_inner_lr:
    dtype = jax.tree.leaves(wm_params)[0].dtype
    meta["log_inner_lr"] = jnp.asarray(math.log(mcfg.inner_lr), dtype)
  return meta


def inner_lr(meta_params, mcfg: MetaConfig):
  return jnp.exp(meta_params["log_inner_lr"]) if mcfg.learn_inner_lr else mcfg.inner_lr


def outer_loss(graphdef, params, base_logits_KxTxV, batch, mcfg: MetaConfig):
  """(total, qa, kl) of adapted params: answer NLL of the batch's questions + c_kl * locality KL."""
  qa = answer_loss(graphdef, params, batch)
  post_KxTxV = transformer.apply(graphdef, params, batch["loc_tokens_KxT"], batch["loc_mask_KxT"])
  kl = loss.kl_pre_post(base_logits_KxTxV, post_KxTxV, batch["loc_mask_KxT"])
  return qa + mcfg.c_kl * kl, (qa, kl)


def answer_loss(graphdef, params, batch):
  """The answer NLL of the batch's questions, token-mean over all their answer tokens (the outer QA loss)."""
  qa_tokens = batch["qa_tokens_BxQxS"]
  b, q, s = qa_tokens.shape
  qa_tokens_NxS = qa_tokens.reshape(b * q, s)
  qa_mask_NxS = batch["qa_mask_BxQxS"].reshape(b * q, s)
  loss_mask_NxS = batch["qa_loss_mask_BxQxS"].reshape(b * q, s) * batch["qa_valid_BxQ"].reshape(b * q, 1)
  return loss.answer_nll_mean(transformer.apply(graphdef, params, qa_tokens_NxS, qa_mask_NxS), qa_tokens_NxS,
                              loss_mask_NxS)


def adapt_and_score(graphdef, base_params, base_logits_KxTxV, batch, w_BxL, lr, mcfg: MetaConfig,
                    precond=None):
  """(outer loss, (qa, kl), adapted params) after the inner update on `batch`'s documents with `w_BxL`
  (preconditioned by `precond` when given: `inner.second_moment_precond`)."""
  outer = lambda p: outer_loss(graphdef, p, base_logits_KxTxV, batch, mcfg)
  adapted, per_pass = inner_lib.adapt(graphdef, base_params, batch["doc_tokens_BxL"], batch["doc_mask_BxL"],
                                      w_BxL, batch["doc_valid_B"], lr, mcfg.inner,
                                      outer_fn=outer if mcfg.mixing else None, precond=precond)
  if mcfg.mixing:
    total_S, (qa_S, kl_S) = per_pass
    return total_S.mean(), (qa_S[-1], kl_S[-1]), adapted
  total, (qa, kl) = outer(adapted)
  return total, (qa, kl), adapted


def _base_logits(graphdef, base_params, batch):
  return jax.lax.stop_gradient(
      transformer.apply(graphdef, base_params, batch["loc_tokens_KxT"], batch["loc_mask_KxT"]))


def _real_weight_mean(w_BxL, mask_BxL, valid_B):
  """Mean weight over the real tokens of the valid documents (the logged `weight_mean`)."""
  real = mask_BxL * valid_B[:, None]
  return (w_BxL * real).sum() / jnp.maximum(real.sum(), 1)


def meta_loss(meta_params, base_params, batch, precond=None, *, graphdef, wm_graphdef, mcfg: MetaConfig):
  """Outer loss after adapting `base_params` on one stream's batch of documents.

  Returns:
    (loss, aux) with aux = {"qa", "kl", "weight_mean"} metrics and "adapted" (the adapted base
    params, without gradient, for carrying the base model over to the next batch).
  """
  tokens_BxL, mask_BxL = batch["doc_tokens_BxL"], batch["doc_mask_BxL"]
  w_BxL = token_weights(wm_graphdef, meta_params["wm"], tokens_BxL, mask_BxL)
  total, (qa, kl), adapted = adapt_and_score(graphdef, base_params, _base_logits(graphdef, base_params, batch),
                                             batch, w_BxL, inner_lr(meta_params, mcfg), mcfg, precond)
  return total, {"qa": qa, "kl": kl, "weight_mean": _real_weight_mean(w_BxL, mask_BxL, batch["doc_valid_B"]),
                 "adapted": jax.lax.stop_gradient(adapted)}


def meta_loss_streams(meta_params, base_params_P, batch_P, precond=None, *, graphdef, wm_graphdef,
                      mcfg: MetaConfig):
  """Mean meta loss over P independent streams (the data-parallel axis): vmapped `meta_loss` (one
  preconditioner for every stream)."""
  f = lambda base, batch: meta_loss(meta_params, base, batch, precond, graphdef=graphdef, wm_graphdef=wm_graphdef,
                                    mcfg=mcfg)
  total_P, aux = jax.vmap(f)(base_params_P, batch_P)
  adapted_P = aux.pop("adapted")
  return total_P.mean(), ({k: v.mean() for k, v in aux.items()} | {"loss": total_P.mean()}, adapted_P)


def meta_train_step(meta_params, opt_state, base_params_P, batch_P, precond=None, *, graphdef, wm_graphdef,
                    mcfg: MetaConfig, optimizer: optax.GradientTransformation):
  """One outer step: exact meta-gradient, optimiser update; returns the adapted bases for carry-over."""
  (_, (metrics, adapted_P)), grads = jax.value_and_grad(meta_loss_streams, has_aux=True)(
      meta_params, base_params_P, batch_P, precond, graphdef=graphdef, wm_graphdef=wm_graphdef, mcfg=mcfg)
  updates, opt_state = optimizer.update(grads, opt_state, meta_params)
  meta_params = optax.apply_updates(meta_params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return meta_params, opt_state, adapted_P, metrics


def question_nll(graphdef, params, batch):
  """nll_BxQ: each question's mean answer-token NLL (0 in empty slots)."""
  tokens = batch["qa_tokens_BxQxS"]
  b, q, s = tokens.shape
  tokens_NxS = tokens.reshape(b * q, s)
  logits_NxSxV = transformer.apply(graphdef, params, tokens_NxS, batch["qa_mask_BxQxS"].reshape(b * q, s))
  lw_NxS = loss.shift_targets(batch["qa_loss_mask_BxQxS"].reshape(b * q, s).astype(jnp.float32))
  nll_N = (loss.token_nll(logits_NxSxV, tokens_NxS) * lw_NxS).sum(-1) / jnp.maximum(lw_NxS.sum(-1), 1.0)
  return nll_N.reshape(b, q) * batch["qa_valid_BxQ"]


def scores_before(base_params, batch, *, graphdef, per_question: bool = False) -> dict:
  """What `uptake_eval` measures on the unadapted model: the locality logits, the answer NLL ("qa_before")
  and, with `per_question`, each question's ("nll_BxQ"). They do not depend on the weights, so a comparison
  of many weightings on one batch computes them once (`before=` of `uptake_eval`)."""
  out = {"base_logits": _base_logits(graphdef, base_params, batch),
         "qa_before": answer_loss(graphdef, base_params, batch)}
  if per_question:
    out["nll_BxQ"] = question_nll(graphdef, base_params, batch)
  return out


def uptake_eval(meta_params, base_params, batch, w_BxL, *, graphdef, mcfg: MetaConfig,
                per_question: bool = False, before: dict | None = None, precond=None):
  """What one inner update with weights `w_BxL` teaches, from `base_params`, on the batch's questions.

  Args:
    before: `scores_before` of the same base params and batch (computed here when None).
    precond: the inner step's diagonal preconditioner (None: SGD).

  Returns:
    {"loss": outer loss after, "qa_before", "qa": answer NLL before/after (the same questions, the same
    token-mean), "uptake": qa_before - qa, "kl": locality KL after}. The reference logs the same
    quantity as `qa_gain`. With `per_question`, also "uptake_BxQ": each question's mean answer-token NLL
    before minus after (0 in empty slots), for intervals over questions.
  """
  if before is None:
    before = scores_before(base_params, batch, graphdef=graphdef, per_question=per_question)
  total, (qa, kl), adapted = adapt_and_score(graphdef, base_params, before["base_logits"], batch, w_BxL,
                                             inner_lr(meta_params, mcfg), mcfg, precond)
  return _uptake(graphdef, adapted, batch, before, total, qa, kl, per_question)


def _uptake(graphdef, adapted, batch, before, total, qa, kl, per_question):
  """The metrics of `uptake_eval`; without "loss" and "kl" when `kl` is None (not computed)."""
  out = {"qa_before": before["qa_before"], "qa": qa, "uptake": before["qa_before"] - qa}
  if kl is not None:
    out |= {"loss": total, "kl": kl}
  if per_question:
    out["uptake_BxQ"] = before["nll_BxQ"] - question_nll(graphdef, adapted, batch)
  return out


def one_step_grads(base_params, batch, w_BxL, *, graphdef, mcfg: MetaConfig, precond=None):
  """The inner gradient of a batch of one document at `base_params` (`inner.sgd_step`'s, preconditioned
  with `precond`), 0 for a padding document. The step from it, lr * grads, is linear in the weights and in
  lr; `uptake_at_step` takes any multiple of it without another backward pass."""
  grads = jax.grad(inner_lib.doc_loss, argnums=1)(graphdef, base_params, batch["doc_tokens_BxL"],
                                                  batch["doc_mask_BxL"], w_BxL, mcfg.inner)
  grads = inner_lib.preconditioned(grads, precond)
  return jax.tree.map(lambda g: g * batch["doc_valid_B"][0].astype(g.dtype), grads)


def uptake_at_step(meta_params, base_params, grads, scale, batch, before, *, graphdef, mcfg: MetaConfig,
                   with_kl: bool = True):
  """`uptake_eval(..., per_question=True)` of weights `scale * w_BxL` on a batch of one document with one
  inner step, from `grads = one_step_grads(..., w_BxL)`: the same update, scale * lr * grads.

  Without `with_kl`, only the answer NLLs: no "loss" or "kl", and no forward pass on the locality text,
  which costs more than the questions' (256 tokens against 6 x 32 in the default)."""
  lr = inner_lr(meta_params, mcfg) * scale
  adapted = jax.tree.map(lambda p, g: p - (lr * g).astype(p.dtype), base_params, grads)
  if with_kl:
    total, (qa, kl) = outer_loss(graphdef, adapted, before["base_logits"], batch, mcfg)
  else:
    total, qa, kl = None, answer_loss(graphdef, adapted, batch), None
  return _uptake(graphdef, adapted, batch, before, total, qa, kl, True)


def meta_eval_step(meta_params, base_params, batch, precond=None, *, graphdef, wm_graphdef, mcfg: MetaConfig):
  """Validation on one batch, from the (reset) base params: the learned weights' uptake and that of
  uniform weights with the same mean weight per document (a plain step of the same size), and the sums of
  the facts/filler ratio."""
  tokens_BxL, mask_BxL, valid_B = batch["doc_tokens_BxL"], batch["doc_mask_BxL"], batch["doc_valid_B"]
  w_BxL = token_weights(wm_graphdef, meta_params["wm"], tokens_BxL, mask_BxL)
  ev = functools.partial(uptake_eval, meta_params, base_params, batch, graphdef=graphdef, mcfg=mcfg,
                         precond=precond)
  learned = ev(w_BxL)
  uniform = ev(uptake_lib.mean_matched(jnp.ones_like(w_BxL), w_BxL, mask_BxL, valid_B))
  metrics = learned | {f"uniform_{k}": uniform[k] for k in ("qa", "uptake", "kl")}
  metrics["weight_mean"] = _real_weight_mean(w_BxL, mask_BxL, valid_B)
  return metrics | uptake_lib.facts_filler_sums(w_BxL, batch["doc_answer_mask_BxL"], mask_BxL, valid_B)


# ------------------------------------------------------------------------------------------------
# Meta-training loop.


def camels_config() -> ml_collections.ConfigDict:
  """The `camels` section of a job config (reference values in comments)."""
  return ml_collections.ConfigDict(dict(
      weighting=weighting_config(),
      inner_steps=1,  # passes (>= 1) over a batch's documents, one SGD step per document each (reference: 1)
      normalization="padded",  # inner loss / (padded_len - 1) ("padded", reference) or / real tokens ("tokens")
      padded_len=0,  # length "padded" divides by, >= the longest document bucket; 0 = that bucket (ref.: 1024)
      inner_lr=5e-4,  # inner SGD lr, > 0 (reference: 5e-4)
      learn_inner_lr=False,  # meta-learn log(inner lr) as well
      first_order=False,  # drop second-order terms (inner gradients taken at constant params)
      mixing=False,  # average the outer loss over the params after each inner pass (inner_steps > 1)
      # Recompute inner steps in the backward pass. Off: with 2 documents it costs time and saves nothing
      # (bench.meta_step: 15.2 s, 9.5 GB with it, 13.6 s, 8.7 GB without); the memory saver is
      # model.remat=True with model.remat_policy="dots_with_no_batch_dims_saveable" (6.1 GB, 14.0 s).
      remat=False,
      c_kl=0.1,  # weight of the locality KL term, >= 0 (reference: 0.1)
      outer_lr=1e-5,  # Adam lr of the weighting model, > 0 (reference: 1e-5)
      grad_accum=4,  # batches (>= 1) per outer update (reference: 4)
      grad_clip=1e9,  # global-norm clip of the meta-gradient, > 0 (reference: 1e9, i.e. none)
      reset_every=4,  # batches (>= 1) the base model keeps its updates for before it is reset (reference: 4)
      streams=1,  # P independent document streams per step, sharded over devices (a multiple of their count)
      steps=400,  # meta-training batches (per stream); 0 = only validate the initial weighting model
      val_every=100,  # batches between validations; each is also a checkpoint (a multiple of reset_every)
      val_batches=0,  # meta-val batches per validation (0 = all of meta_val); each from the reset base
      # Fixed weightings whose uptake on all meta-val batches is measured after training at the learned
      # weights' mean weight per document (comma-separated subset of baselines.DOC_WEIGHTINGS; "" = none).
      compare="uniform,ssm,tfidf,oracle",
      compare_batches=0,  # meta-val batches of that comparison (0 = all of meta_val)
      # Documents per inner update of that comparison: 0 = data.meta_batch_docs, from the reset base model as
      # meta-training validates; 1 = each document's own step, as the meta-objective on the test documents
      # (`eval.meta_objective`), where one backward pass per weighting serves every step of the grid.
      compare_docs=0,
      # The comparison is also made at inner steps 2^-k .. 2^k times the learned one (`step_scales`): whether a
      # weighting's advantage belongs to its weights or to one step size. 0 = at the learned step only.
      compare_octaves=2,
      # The inner step divided by the root mean square of the unadapted model's gradients on the first this many
      # meta-train documents (uniform weights, one document per gradient): shaped like the steps of the test
      # stream's Adam, and differentiable (`inner.second_moment_precond`). 0 = plain SGD (the reference).
      # inner_lr is then in Adam's units (its lrs are ~1e-5, not SGD's ~1e-2).
      precond_docs=0,
      precond_eps=1e-8,  # added to the root mean square, > 0 (optax.adam's eps)
      seed=0,  # RNG seed of the run (>= 0)
  ))


RULES = {
    "weighting": WEIGHTING_RULES,
    "inner_steps": checks.count,
    "normalization": checks.one_of(*loss.NORMALIZATIONS),
    "padded_len": checks.count_or_zero,
    "inner_lr": checks.positive,
    "learn_inner_lr": checks.boolean,
    "first_order": checks.boolean,
    "mixing": checks.boolean,
    "remat": checks.boolean,
    "c_kl": checks.non_negative,
    "outer_lr": checks.positive,
    "grad_accum": checks.count,
    "grad_clip": checks.positive,
    "reset_every": checks.count,
    "streams": checks.count,
    "steps": checks.count_or_zero,
    "val_every": checks.count,
    "val_batches": checks.count_or_zero,
    "compare": checks.subset_of(*baselines.DOC_WEIGHTINGS, allow_empty=True),
    "compare_batches": checks.count_or_zero,
    "compare_docs": checks.count_or_zero,
    "compare_octaves": checks.count_or_zero,
    "precond_docs": checks.count_or_zero,
    "precond_eps": checks.positive,
    "seed": checks.seed,
}


def _checkpoints_at_resets(c, at=""):
  if c.val_every % c.reset_every:
    return [f"{at}val_every={c.val_every} must be a multiple of {at}reset_every={c.reset_every}: checkpoints "
            f"are taken where the base model is reset"]
  return []


def _mixing_steps(c, at=""):
  if c.mixing and c.inner_steps < 2:
    return [f"{at}mixing=True needs {at}inner_steps >= 2 (it averages over the params after each pass), "
            f"got {c.inner_steps}"]
  return []


# The device count check (streams a multiple of it) is in `_check`: it needs the devices.
CROSS = checks.within("weighting", WEIGHTING_CROSS) + [_checkpoints_at_resets, _mixing_steps]


def meta_config(c: ml_collections.ConfigDict, doc_buckets) -> MetaConfig:
  icfg = inner_lib.InnerConfig(steps=c.inner_steps, normalization=c.normalization,
                               padded_len=c.padded_len or max(doc_buckets), first_order=c.first_order,
                               remat=c.remat)
  return MetaConfig(inner=icfg, inner_lr=c.inner_lr, learn_inner_lr=c.learn_inner_lr, c_kl=c.c_kl,
                    mixing=c.mixing)


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.MultiSteps(optax.chain(optax.clip_by_global_norm(c.grad_clip), optax.adam(c.outer_lr)),
                          every_k_schedule=c.grad_accum)


def _check(c: ml_collections.ConfigDict, n_data: int) -> None:
  checks.validate_section("camels", c, RULES, CROSS)
  if c.streams % n_data:
    raise checks.ConfigError(f"camels.streams={c.streams} must be a multiple of the mesh's {n_data} data shards "
                     f"(devices / mesh.fsdp)")


def _stack(batches):
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


JOB = "camels"  # the loop's checkpoints: <workdir>/camels
BEST_METRIC = "val_loss"  # the validation that picks the weighting model evaluation uses


class Trainable(NamedTuple):
  """What `init` builds: the weighting model's graph, the state the loop trains and checkpoints."""

  wm_graphdef: Any
  state: dict  # {"meta": meta-parameters (`init_meta_params`), "opt": the outer optimizer's state}
  optimizer: optax.GradientTransformation
  mcfg: MetaConfig


def init(config: ml_collections.ConfigDict, base: loading.Loaded, mesh) -> Trainable:
  """The weighting model, its meta-parameters and optimizer state on `mesh`, split by their logical axis
  names: what `fit` trains and `load_trained` restores onto."""
  c = config.camels
  mcfg = meta_config(c, config.data.doc_buckets)
  optimizer = make_optimizer(c)
  wm_graphdef, wm_params = build_weighting_model(c.weighting, base)
  meta = sharding.place_params(init_meta_params(wm_params, mcfg), mesh)
  return Trainable(wm_graphdef, {"meta": meta, "opt": sharding.place_params(optimizer.init(meta), mesh)},
                   optimizer, mcfg)


def no_trained(directory: str) -> checks.UserError:
  return checks.UserError(f"{directory}: no trained weighting model, which eval.methods=camels needs; run "
                          f"`python -m camels_jax.train` with this config and workdir first (jobs qa_tune,camels), "
                          f"or drop camels from eval.methods")


def require_trained(workdir: str) -> None:
  """Raises `no_trained` unless <workdir>/camels holds a trained weighting model (before anything loads)."""
  loop.require_trained(os.path.join(workdir, JOB), no_trained)


def load_trained(config: ml_collections.ConfigDict, base: loading.Loaded, workdir: str):
  """(wm_graphdef, meta params) of the best validation of the camels job in `workdir`, on `base`'s mesh
  (every device of a multi-process run) as `fit` put them."""
  t = init(config, base, sharding.mesh_of(base.params))
  return t.wm_graphdef, loop.restore_best(os.path.join(workdir, JOB), t.state, no_trained)["meta"]


def precond_of(config: ml_collections.ConfigDict, base: loading.Loaded, base_params, data):
  """The inner step's preconditioner (`inner.second_moment_precond`) from the gradients of `base_params` on the
  first `camels.precond_docs` meta-train documents with uniform weights, one document each; None when 0.

  Deterministic in the config and the base params, so evaluation recomputes what training used."""
  c = config.camels
  if not c.precond_docs:
    return None
  docs = data.splits["meta_train"][:c.precond_docs]
  mesh = sharding.mesh_of(base_params)
  grads_fn = jax.jit(functools.partial(one_step_grads, graphdef=base.graphdef,
                                       mcfg=meta_config(c, config.data.doc_buckets)))
  add = jax.jit(inner_lib.add_square, donate_argnums=0)
  sum_sq = None
  for batch in pipeline.meta_eval_batches(docs, data.loc, data.spec, data.pad_id, 1, config.data.loc_batch):
    batch = sharding.replicate(batch, mesh)
    w_BxL = batch["doc_mask_BxL"].astype(jnp.float32)  # uniform: every real token weighs 1
    g = grads_fn(base_params, batch, w_BxL)
    sum_sq = inner_lib.add_square(None, g) if sum_sq is None else add(sum_sq, g)
  return jax.jit(functools.partial(inner_lib.second_moment_precond, n=len(docs), eps=c.precond_eps))(sum_sq)


def _validation(eval_step, base_params, batches, extra=()):
  """meta params -> the means over `batches` of `meta_eval_step`'s metrics, prefixed "val_" (`extra`: the
  preconditioner, when there is one)."""

  def validate(meta):
    sums = {}
    for batch in batches:
      for k, v in eval_step(meta, base_params, batch, *extra).items():
        sums[k] = sums.get(k, 0.0) + float(v)
    return {f"val_{k}": v for k, v in summarize(sums, len(batches)).items()}
  return validate


def fit(config: ml_collections.ConfigDict, base: loading.Loaded, base_params, data, workdir: str,
        writer, progress: bool = True):
  """Meta-trains the weighting model through `loop.run` (resuming from <workdir>/camels).

  Args:
    config: the job config (uses `config.camels` and `config.data.doc_buckets`).
    base: the base model; `base_params` (the QA-tuned params) replace its own.
    data: `camels_jax.data.Data`; batches come from its meta-train loader, validation from meta_val.
    workdir: checkpoints go to <workdir>/camels.
    writer: a `metrics.MetricWriter`.
    progress: show a progress bar.

  Returns:
    (wm_graphdef, best meta params by validation loss, results dict).
  """
  c = config.camels
  mesh = sharding.job_mesh(config)
  _check(c, mesh.shape[sharding.DATA_AXIS])
  t = init(config, base, mesh)
  rep, dat = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  # Every parameter-shaped tree by its logical axis names: split over the FSDP axis, whole without one; the
  # per-stream base params (adapted in place between resets) also over the streams on "data".
  base_params = sharding.place_params(base_params, mesh)
  broadcast = lambda p: jax.tree.map(lambda x: jnp.broadcast_to(x, (c.streams,) + x.shape), p)
  base_sh, meta_sh, opt_sh = (sharding.param_shardings(x, mesh) for x in (base_params, *t.state.values()))
  streams_sh = sharding.param_shardings(jax.eval_shape(broadcast, base_params), mesh, lead=(sharding.DATA_AXIS,))
  kw = dict(graphdef=base.graphdef, wm_graphdef=t.wm_graphdef, mcfg=t.mcfg)
  precond = precond_of(config, base, base_params, data)
  extra, extra_sh = ((precond,), (base_sh,)) if precond is not None else ((), ())
  train_step = jax.jit(functools.partial(meta_train_step, optimizer=t.optimizer, **kw),
                       in_shardings=(meta_sh, opt_sh, streams_sh, dat) + extra_sh,
                       out_shardings=(meta_sh, opt_sh, streams_sh, rep), donate_argnums=(0, 1, 2))
  eval_step = jax.jit(functools.partial(meta_eval_step, **kw), in_shardings=(meta_sh, base_sh, rep) + extra_sh,
                      out_shardings=rep)
  reset_train = jax.jit(broadcast, out_shardings=streams_sh)
  val_batches = list(data.meta_eval_batches())[:c.val_batches or None]
  validate = _validation(eval_step, base_params, [sharding.replicate(b, mesh) for b in val_batches], extra)
  rows = sharding.process_rows(c.streams, mesh)  # the streams this process builds and feeds
  loader = data.meta_loader()

  def step_fn(state, base_P, step, rng):
    del rng  # the inner updates are deterministic
    if step % c.reset_every == 0:
      base_P = reset_train(base_params)
    batch_P = sharding.shard_rows(_stack(loader.take(c.streams, rows)), c.streams, mesh)
    meta, opt_state, base_P, m = train_step(state["meta"], state["opt"], base_P, batch_P, *extra)
    return {"meta": meta, "opt": opt_state}, base_P, m

  cfg = loop.LoopConfig(JOB, c.steps, c.val_every, BEST_METRIC)
  r = loop.run(cfg, t.state, step_fn, lambda state: validate(state["meta"]), workdir=workdir, writer=writer,
               rng=jax.random.key(c.seed), loader=loader, progress=progress, desc="camels meta-train")
  results = {"best_step": r.best_step, "best": r.best, "history": r.history}
  names = [n.strip() for n in c.compare.split(",") if n.strip()]
  if names:
    by_step = compare_on(config, base, base_params, data, t.wm_graphdef, r.state["meta"], data.splits["meta_val"],
                         names, batch_docs=c.compare_docs or config.data.meta_batch_docs,
                         scales=step_scales(c.compare_octaves),
                         max_batches=c.compare_batches, progress=progress, precond=precond,
                         desc="camels: weightings against the step (meta-val)")
    results["compare"], results["compare_step"] = by_step["1"], r.best_step
    if len(by_step) > 1:
      results["compare_by_step"] = by_step
    writer.write_scalars(r.best_step, {f"{JOB}/compare/{n}/{k}": v.get("mean") if isinstance(v, dict) else v
                                       for n, m in by_step["1"].items() for k, v in m.items()})
  return t.wm_graphdef, r.state["meta"], results


def compare_on(config, base, base_params, data, wm_graphdef, meta, docs, names, *, batch_docs: int,
               scales=(1.0,), max_batches: int = 0, progress: bool = False, precond=None,
               desc: str = "compare weightings") -> dict[str, dict]:
  """`compare_weightings` of the weighting model `meta` against the fixed weightings `names` on `docs`:
  `batch_docs` documents per inner update from the reset `base_params`, then their own questions.

  Args:
    config: the job config (`camels`, `data`).
    base: the base model (graph, tokenizer); `base_params` (on their mesh) replace its own.
    data: `camels_jax.data.Data` (spec, locality texts; TF-IDF's idf over every split's documents).
    wm_graphdef, meta: the weighting model (`load_trained` or `fit`).
    docs: the documents (`TokenizedDoc`s): meta-val, or held-out test documents.
    names: fixed weightings (`baselines.DOC_WEIGHTINGS`).
    batch_docs: documents per inner update (1: each document's own step).
    scales: inner steps as multiples of the learned one (`step_scales`).
    max_batches: only the first batches (0: all).
    progress, desc: `compare_weightings`' progress bar.
    precond: the inner step's preconditioner (`precond_of`; None: SGD).
  """
  mesh = sharding.mesh_of(base_params)
  chunks = pipeline.meta_eval_chunks(docs, data.spec.qa_slots, batch_docs)
  texts = [d.doc.text for split in data.splits.values() for d in split]
  fns = {n: baselines.doc_weighting(n, base.tokenizer, texts, data.spec.add_bos) for n in names}
  batches = [sharding.replicate(b, mesh) for b in pipeline.meta_eval_batches(
      docs, data.loc, data.spec, data.pad_id, batch_docs, config.data.loc_batch)]
  if max_batches:
    batches, chunks = batches[:max_batches], chunks[:max_batches]
  return compare_weightings(meta, base_params, batches, chunks, fns, graphdef=base.graphdef,
                            wm_graphdef=wm_graphdef, mcfg=meta_config(config.camels, config.data.doc_buckets),
                            scales=scales, progress=progress, precond=precond, desc=desc)


def summarize(sums: dict[str, float], n_batches: int) -> dict[str, float | None]:
  """Means over validation batches of per-batch metrics, the pooled facts/filler ratio, and the learned
  weights' uptake over mean-matched uniform weights' (None where undefined)."""
  ff_keys = ("facts_w", "facts_n", "filler_w", "filler_n")
  out = {k: v / n_batches for k, v in sums.items() if k not in ff_keys}
  if all(k in sums for k in ff_keys):
    ratio = uptake_lib.facts_filler_ratio({k: sums[k] for k in ff_keys})
    out["facts_filler"] = ratio if math.isfinite(ratio) else None
  if "uniform_uptake" in out:
    out["uptake_x_uniform"] = out["uptake"] / out["uniform_uptake"] if out["uniform_uptake"] > 0 else None
  return out


def step_scales(octaves: int) -> tuple[float, ...]:
  """The inner-step multipliers 2^-octaves .. 2^octaves: a grid centred (geometrically) on the learned step."""
  return tuple(2.0 ** k for k in range(-octaves, octaves + 1))


def compare_weightings(meta, base_params, batches, chunks, weightings, *, graphdef, wm_graphdef,
                       mcfg: MetaConfig, scales=(1.0,), progress: bool = False, precond=None,
                       desc: str = "compare weightings") -> dict[str, dict[str, dict]]:
  """Uptake of the learned weights and of fixed weightings at the same step, on the same batches, at each
  of `scales` times the learned inner step.

  Every fixed weighting is rescaled per document to the learned weights' mean weight (`mean_matched`),
  so all take the same total step and differ only in where they put it. At scale s every weighting is
  multiplied by s: the same as s times the inner lr (each inner step is linear in lr * w), so the rows of
  one scale are one step size and the scales show whether an advantage belongs to the weights or to a step.

  Args:
    meta: the meta params (weighting model; inner lr if learned).
    base_params: the base model every batch is adapted from.
    batches: meta-eval batches (on device); `chunks` their items (`pipeline.meta_eval_chunks`).
    weightings: {name: fn(TokenizedDoc, L) -> w_L} (`baselines.doc_weighting`).
    scales: inner steps as multiples of the learned one (`step_scales`).
    progress, desc: a progress bar over the (batch, step, weighting) updates, and its label.
    precond: the inner step's diagonal preconditioner (None: SGD).

  Returns:
    {f"{scale:g}": {"learned" and each name: {"uptake", "qa_before", "qa", "kl" and "loss" (with one document
    per update, at scale 1 only), "weight_mean", "facts_filler", "x_uniform" (uptake over uniform's, when
    "uniform" is among them), "question_uptake" (bootstrap interval of the mean per-question uptake),
    "vs_uniform" / "vs_learned" (paired intervals of the per-question uptake difference on the same
    questions)}}}.
  """
  weights_fn = jax.jit(functools.partial(token_weights, wm_graphdef))
  before_fn = jax.jit(functools.partial(scores_before, graphdef=graphdef, per_question=True))
  score_fn = jax.jit(functools.partial(uptake_eval, graphdef=graphdef, mcfg=mcfg, per_question=True))
  grads_fn = jax.jit(functools.partial(one_step_grads, graphdef=graphdef, mcfg=mcfg))
  step_fn = jax.jit(functools.partial(uptake_at_step, graphdef=graphdef, mcfg=mcfg), static_argnames="with_kl")
  names = ["learned", *weightings]
  sums = {s: {name: {} for name in names} for s in scales}
  per_q = {s: {name: [] for name in names} for s in scales}
  bar = tqdm.tqdm(total=len(batches) * len(scales) * len(names), desc=desc, disable=not progress)
  for batch, chunk in zip(batches, chunks):
    ws = _mean_matched_weightings(weights_fn(meta["wm"], batch["doc_tokens_BxL"], batch["doc_mask_BxL"]),
                                  batch, chunk, weightings)
    valid_BxQ = np.asarray(batch["qa_valid_BxQ"], bool)
    before = before_fn(base_params, batch)  # once per batch: the same for every weighting and step
    # One document, one step: the update is linear in the step, so each weighting's backward pass serves
    # every scale (a third of the cost at three scales). Sequences of documents take the general path.
    linear = batch["doc_tokens_BxL"].shape[0] == 1 and mcfg.inner.steps == 1 and not mcfg.mixing
    for name, w1_BxL in ws.items():
      grads = grads_fn(base_params, batch, w1_BxL, precond=precond) if linear else None
      for s in scales:
        w_BxL = w1_BxL * s if s != 1.0 else w1_BxL
        if linear:
          # The locality KL at the learned step only (the outer loss's own term): at the other steps it would
          # cost a quarter of the comparison's time, and no table reads it.
          m = dict(step_fn(meta, base_params, grads, s, batch, before, with_kl=s == 1.0))
        else:
          m = dict(score_fn(meta, base_params, batch, w_BxL, before=before, precond=precond))
        bar.update()
        per_q[s][name].extend(np.asarray(m.pop("uptake_BxQ"))[valid_BxQ].tolist())
        m |= uptake_lib.facts_filler_sums(w_BxL, batch["doc_answer_mask_BxL"], batch["doc_mask_BxL"],
                                          batch["doc_valid_B"])
        m["weight_mean"] = (uptake_lib.mean_weight_B(w_BxL, batch["doc_mask_BxL"], batch["doc_valid_B"]).sum()
                            / batch["doc_valid_B"].sum())
        for k, v in m.items():
          sums[s][name][k] = sums[s][name].get(k, 0.0) + float(v)
  bar.close()
  return {f"{s:g}": _compared(sums[s], per_q[s], len(batches)) for s in scales}


def _mean_matched_weightings(learned_BxL, batch, chunk, weightings) -> dict:
  """{"learned": learned_BxL, name: that weighting of the batch's documents at the learned mean weight}."""
  mask_BxL, valid_B = batch["doc_mask_BxL"], batch["doc_valid_B"]
  length = mask_BxL.shape[1]
  ws = {"learned": learned_BxL}
  for name, fn in weightings.items():
    w_BxL = np.stack([fn(item[0], length) if item else np.zeros(length, np.float32) for item in chunk])
    ws[name] = uptake_lib.mean_matched(w_BxL, learned_BxL, mask_BxL, valid_B)
  return ws


def _compared(sums: dict, per_q: dict, n_batches: int) -> dict[str, dict]:
  """`compare_weightings`' entry of one scale from its per-weighting sums and per-question uptakes."""
  out = {name: summarize(s, n_batches) for name, s in sums.items()}
  for name, m in out.items():
    m.pop("uptake_x_uniform", None)
    u = out.get("uniform", {}).get("uptake")
    m["x_uniform"] = m["uptake"] / u if u is not None and u > 0 else None
    m["question_uptake"] = stats.bootstrap_ci(per_q[name])
    for other in ("uniform", "learned"):
      if other in per_q and other != name:
        m[f"vs_{other}"] = stats.paired_bootstrap_ci(per_q[name], per_q[other])
  return out
