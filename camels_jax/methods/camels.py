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
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from flax import nnx

from camels_jax import checkpoint, sharding
from camels_jax.adapt import inner as inner_lib
from camels_jax.adapt import loss
from camels_jax.models import loading, transformer
from camels_jax.models.config import ModelConfig

INIT_WEIGHT = math.log(2.0) / 3.0  # softplus_beta(0) with beta = 3: every token's weight at init


class WeightingModel(nnx.Module):
  """Causal transformer backbone + MLP head (d -> hidden -> 1, GELU) + softplus(beta), masked."""

  def __init__(self, backbone: ModelConfig, hidden: int, beta: float, *, rngs: nnx.Rngs):
    self.beta = beta
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
    return jax.nn.softplus(self.beta * z_BxL) / self.beta * mask_BxL


def weighting_config() -> ml_collections.ConfigDict:
  """The `weighting` section of a CaMeLS config."""
  return ml_collections.ConfigDict(dict(
      # "base": the first `base_layers` blocks of the base model, initialised from its weights;
      # "random": a small backbone (`random` shape, base vocabulary) from scratch; else a model source
      # (as model.source: .gguf, HF folder, "hub:NAME") sharing the base model's tokenizer.
      backbone="base",
      base_layers=4,  # blocks taken from the base model when backbone == "base"
      random=dict(d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256),  # backbone == "random"
      hidden=128,  # width of the MLP head (reference: 128)
      beta=3.0,  # softplus sharpness (reference: 3)
      seed=0,  # init seed of the head (and of a random backbone)
  ))


def _flat(state) -> dict[tuple, Any]:
  return {path: var for path, var in nnx.to_flat_state(state)}


def build_weighting_model(wcfg: ml_collections.ConfigDict, base: loading.Loaded):
  """(graphdef, params) of the weighting model described by `wcfg`, sharing `base`'s tokenizer."""
  rngs = nnx.Rngs(wcfg.seed)
  if wcfg.backbone == "base":
    if not 1 <= wcfg.base_layers <= base.cfg.n_layers:
      raise ValueError(f"weighting.base_layers={wcfg.base_layers}: the base model has "
                       f"{base.cfg.n_layers} layers")
    bcfg = base.cfg.replace(n_layers=wcfg.base_layers, tie_embeddings=True, remat=False)
    source = {path: var for path, var in _flat(transformer.first_layers(base.params, wcfg.base_layers)).items()
              if path[0] != "lm_head"}
  elif wcfg.backbone == "random":
    r = wcfg.random
    bcfg = ModelConfig(arch="llama", vocab_size=base.cfg.vocab_size, max_len=base.cfg.max_len,
                       d_model=r.d_model, n_layers=r.n_layers, n_heads=r.n_heads, n_kv_heads=r.n_kv_heads,
                       d_ff=r.d_ff, dtype=base.cfg.dtype, param_dtype=base.cfg.param_dtype)
    source = {}
  else:
    other = loading.load(loading.model_config(wcfg.backbone) | {"dtype": base.cfg.dtype,
                                                                "param_dtype": base.cfg.param_dtype})
    if other.tokenizer.vocab_size != base.tokenizer.vocab_size:
      raise ValueError(f"weighting.backbone={wcfg.backbone}: its tokenizer ({other.tokenizer.vocab_size} "
                       f"ids) differs from the base model's ({base.tokenizer.vocab_size})")
    bcfg = other.cfg.replace(tie_embeddings=True, remat=False)
    source = {p: v for p, v in _flat(other.params).items() if p[0] != "lm_head"}
  graphdef, params = nnx.split(WeightingModel(bcfg, wcfg.hidden, wcfg.beta, rngs=rngs))
  flat = []
  for path, var in nnx.to_flat_state(params):
    if path[0] == "backbone" and path[1:] in source:
      var = var.replace(source[path[1:]].get_value())
    flat.append((path, var))
  return graphdef, nnx.from_flat_state(flat)


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
  qa_tokens = batch["qa_tokens_BxQxS"]
  b, q, s = qa_tokens.shape
  qa_tokens_NxS = qa_tokens.reshape(b * q, s)
  qa_mask_NxS = batch["qa_mask_BxQxS"].reshape(b * q, s)
  loss_mask_NxS = batch["qa_loss_mask_BxQxS"].reshape(b * q, s) * batch["qa_valid_BxQ"].reshape(b * q, 1)
  qa = loss.answer_nll_mean(transformer.apply(graphdef, params, qa_tokens_NxS, qa_mask_NxS), qa_tokens_NxS,
                            loss_mask_NxS)
  post_KxTxV = transformer.apply(graphdef, params, batch["loc_tokens_KxT"], batch["loc_mask_KxT"])
  kl = loss.kl_pre_post(base_logits_KxTxV, post_KxTxV, batch["loc_mask_KxT"])
  return qa + mcfg.c_kl * kl, (qa, kl)


def meta_loss(meta_params, base_params, batch, *, graphdef, wm_graphdef, mcfg: MetaConfig):
  """Outer loss after adapting `base_params` on one stream's batch of documents.

  Returns:
    (loss, aux) with aux = {"qa", "kl", "weight_mean"} metrics and "adapted" (the adapted base
    params, without gradient, for carrying the base model over to the next batch).
  """
  tokens_BxL, mask_BxL = batch["doc_tokens_BxL"], batch["doc_mask_BxL"]
  w_BxL = token_weights(wm_graphdef, meta_params["wm"], tokens_BxL, mask_BxL)
  base_logits = jax.lax.stop_gradient(
      transformer.apply(graphdef, base_params, batch["loc_tokens_KxT"], batch["loc_mask_KxT"]))
  outer = lambda p: outer_loss(graphdef, p, base_logits, batch, mcfg)
  adapted, per_pass = inner_lib.adapt(graphdef, base_params, tokens_BxL, mask_BxL, w_BxL, batch["doc_valid_B"],
                                  inner_lr(meta_params, mcfg), mcfg.inner,
                                  outer_fn=outer if mcfg.mixing else None)
  if mcfg.mixing:
    total_S, (qa_S, kl_S) = per_pass
    total, qa, kl = total_S.mean(), qa_S[-1], kl_S[-1]
  else:
    total, (qa, kl) = outer(adapted)
  real = mask_BxL * batch["doc_valid_B"][:, None]
  weight_mean = (w_BxL * real).sum() / jnp.maximum(real.sum(), 1)
  return total, {"qa": qa, "kl": kl, "weight_mean": weight_mean,
                 "adapted": jax.lax.stop_gradient(adapted)}


def meta_loss_streams(meta_params, base_params_P, batch_P, *, graphdef, wm_graphdef, mcfg: MetaConfig):
  """Mean meta loss over P independent streams (the data-parallel axis): vmapped `meta_loss`."""
  f = lambda base, batch: meta_loss(meta_params, base, batch, graphdef=graphdef, wm_graphdef=wm_graphdef,
                                    mcfg=mcfg)
  total_P, aux = jax.vmap(f)(base_params_P, batch_P)
  adapted_P = aux.pop("adapted")
  return total_P.mean(), ({k: v.mean() for k, v in aux.items()} | {"loss": total_P.mean()}, adapted_P)


def meta_train_step(meta_params, opt_state, base_params_P, batch_P, *, graphdef, wm_graphdef,
                    mcfg: MetaConfig, optimizer: optax.GradientTransformation):
  """One outer step: exact meta-gradient, optimiser update; returns the adapted bases for carry-over."""
  (_, (metrics, adapted_P)), grads = jax.value_and_grad(meta_loss_streams, has_aux=True)(
      meta_params, base_params_P, batch_P, graphdef=graphdef, wm_graphdef=wm_graphdef, mcfg=mcfg)
  updates, opt_state = optimizer.update(grads, opt_state, meta_params)
  meta_params = optax.apply_updates(meta_params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return meta_params, opt_state, adapted_P, metrics


def meta_eval_step(meta_params, base_params_P, batch_P, *, graphdef, wm_graphdef, mcfg: MetaConfig):
  """Validation: the meta loss, its parts, and the answer NLL before adaptation (for reference)."""
  _, (metrics, adapted_P) = meta_loss_streams(meta_params, base_params_P, batch_P, graphdef=graphdef,
                                              wm_graphdef=wm_graphdef, mcfg=mcfg)
  return metrics, adapted_P


# ------------------------------------------------------------------------------------------------
# Meta-training loop.


def camels_config() -> ml_collections.ConfigDict:
  """The `camels` section of a job config (reference values in comments)."""
  return ml_collections.ConfigDict(dict(
      weighting=weighting_config(),
      inner_steps=1,  # passes over a batch's documents, one SGD step per document each (reference: 1)
      normalization="padded",  # inner loss / (padded_len - 1) ("padded", reference) or / real tokens
      padded_len=0,  # length "padded" divides by; 0 = the longest document bucket (reference: 1024)
      inner_lr=5e-4,  # inner SGD lr (reference: 5e-4)
      learn_inner_lr=False,  # meta-learn log(inner lr) as well
      first_order=False,  # drop second-order terms (inner gradients taken at constant params)
      mixing=False,  # average the outer loss over the params after each inner pass (inner_steps > 1)
      remat=True,  # recompute inner steps in the backward pass (memory ~ one step, not all of them)
      c_kl=0.1,  # weight of the locality KL term (reference: 0.1)
      outer_lr=1e-5,  # Adam lr of the weighting model (reference: 1e-5)
      grad_accum=4,  # batches per outer update (reference: 4)
      grad_clip=1e9,  # global-norm clip of the meta-gradient (reference: 1e9, i.e. none)
      reset_every=4,  # batches the base model keeps its updates for before it is reset (reference: 4)
      streams=1,  # P independent document streams per step, sharded over devices (data parallel)
      steps=400,  # meta-training batches (per stream)
      val_every=100,  # batches between validations; each is also a checkpoint (multiple of reset_every)
      val_batches=0,  # meta-val batches per validation (0 = all of meta_val)
      seed=0,  # RNG seed of the run
  ))


def meta_config(c: ml_collections.ConfigDict, doc_buckets) -> MetaConfig:
  icfg = inner_lib.InnerConfig(steps=c.inner_steps, normalization=c.normalization,
                               padded_len=c.padded_len or max(doc_buckets), first_order=c.first_order,
                               remat=c.remat)
  return MetaConfig(inner=icfg, inner_lr=c.inner_lr, learn_inner_lr=c.learn_inner_lr, c_kl=c.c_kl,
                    mixing=c.mixing)


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.MultiSteps(optax.chain(optax.clip_by_global_norm(c.grad_clip), optax.adam(c.outer_lr)),
                          every_k_schedule=c.grad_accum)


def _check(c: ml_collections.ConfigDict, n_devices: int) -> None:
  if c.val_every % c.reset_every:
    raise ValueError(f"camels.val_every={c.val_every} must be a multiple of camels.reset_every="
                     f"{c.reset_every}: checkpoints are taken where the base model is reset")
  if c.streams % n_devices:
    raise ValueError(f"camels.streams={c.streams} must be a multiple of the {n_devices} devices")
  if c.mixing and c.inner_steps < 2:
    raise ValueError("camels.mixing needs camels.inner_steps >= 2")


def _stack(batches):
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def fit(config: ml_collections.ConfigDict, base: loading.Loaded, base_params, data, workdir: str,
        writer, progress: bool = True):
  """Meta-trains the weighting model; resumes from `workdir`'s latest checkpoint if there is one.

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
  mesh = sharding.make_mesh()
  _check(c, mesh.size)
  mcfg = meta_config(c, config.data.doc_buckets)
  optimizer = make_optimizer(c)
  wm_graphdef, wm_params = build_weighting_model(c.weighting, base)
  rep, dat = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  kw = dict(graphdef=base.graphdef, wm_graphdef=wm_graphdef, mcfg=mcfg)
  train_step = jax.jit(functools.partial(meta_train_step, optimizer=optimizer, **kw),
                       in_shardings=(rep, rep, dat, dat), out_shardings=(rep, rep, dat, rep),
                       donate_argnums=(0, 1, 2))
  eval_step = jax.jit(functools.partial(meta_eval_step, **kw), in_shardings=(rep, rep, rep),
                      out_shardings=(rep, rep))
  broadcast = lambda n, s: jax.jit(
      lambda p: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), p), out_shardings=s)
  reset_train, reset_val = broadcast(c.streams, dat), broadcast(1, rep)
  base_params = sharding.replicate(base_params, mesh)

  val_batches = list(data.meta_eval_batches())
  if c.val_batches:
    val_batches = val_batches[:c.val_batches]

  def validate(meta):
    sums, base_1 = {}, None
    for i, batch in enumerate(val_batches):
      if i % c.reset_every == 0:
        base_1 = reset_val(base_params)
      m, base_1 = eval_step(meta, base_1, jax.device_put(_stack([batch]), rep))
      for k, v in m.items():
        sums[k] = sums.get(k, 0.0) + float(v)
    return {f"val_{k}": v / len(val_batches) for k, v in sums.items()}

  meta = sharding.replicate(init_meta_params(wm_params, mcfg), mesh)
  opt_state = sharding.replicate(optimizer.init(meta), mesh)
  loader = data.meta_loader()
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "camels"), max_to_keep=2, best_metric="val_loss")
  step, rng, history = 0, jax.random.key(c.seed), []
  if ckpt.latest_step() is not None:
    restored = ckpt.restore(None, {"meta": meta, "opt": opt_state})
    meta, opt_state = restored.state["meta"], restored.state["opt"]
    loader.restore(restored.meta["data"])
    step, rng, history = restored.step, restored.rng, restored.meta["history"]
    logging.info("camels: resumed from step %d of %s", step, ckpt.directory)

  def checkpoint_now(step, val):
    checkpoint.check_finite(step, validation_loss=jnp.asarray(val["val_loss"]))
    history.append({"step": step} | val)
    writer.write_scalars(step, val)
    ckpt.save(step, {"meta": meta, "opt": opt_state}, meta={"data": loader.state, "history": history},
              rng=rng, metrics=val)

  if step == 0:
    checkpoint_now(0, validate(meta))
  bar = tqdm.tqdm(range(step, c.steps), initial=step, total=c.steps, desc="camels meta-train",
                  disable=not progress)
  for step in bar:
    if step % c.reset_every == 0:
      base_P = reset_train(base_params)
    batch_P = sharding.shard_batch(_stack([next(loader) for _ in range(c.streams)]), mesh)
    meta, opt_state, base_P, m = train_step(meta, opt_state, base_P, batch_P)
    checkpoint.check_finite(step, loss=m["loss"], meta_gradient=m["grad_norm"])
    m = {k: float(v) for k, v in m.items()}
    bar.set_postfix(loss=f"{m['loss']:.4f}")
    writer.write_scalars(step + 1, {f"train_{k}": v for k, v in m.items()})
    if (step + 1) % c.val_every == 0 or step + 1 == c.steps:
      checkpoint_now(step + 1, validate(meta))
  ckpt.wait()
  best = ckpt.restore_best({"meta": meta, "opt": opt_state})
  ckpt.close()
  results = {"best_step": best.step, "best": best.metrics, "history": history}
  return wm_graphdef, best.state["meta"], results
