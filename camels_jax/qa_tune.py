"""QA tuning of the base LM: the "out-of-date base QA model" every method starts from.

The reference (`subroutines.qa_light_tune_early_stop`, notes/reference.md §5) trains on QA sequences only,
with Adam (lr 2.5e-5), gradient clipping at 100 and the mean answer+EOS cross-entropy; it validates on
the QA-val split every `val_steps` updates starting at step 0, stops early when the best of the last
`stop_k` validations is worse than the best before them, and returns the best model by the stopping
metric. This module does the same with a pure, jitted `train_step` run by the shared `loop`: in a job it
checkpoints at every validation (<workdir>/qa_tune), so a QA-tuning killed at any step resumes to the
uninterrupted result, and the finished model is kept in <workdir>/qa_tuned for the jobs after it.

Deviations: the transformer has no dropout (the reference trains GPT-2 in train mode, dropout 0.1); a step
here is one optimizer update (the reference counts micro-batches); a final validation runs at max_steps
so the last params can be chosen.
"""

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from camels_jax import checkpoint, checks, loop, qa, sharding
from camels_jax.adapt import loss
from camels_jax.data import pipeline
from camels_jax.models import transformer

JOB = "qa_tune"  # the loop's checkpoints: <workdir>/qa_tune
TUNED = "qa_tuned"  # the finished QA-tuned params: <workdir>/qa_tuned
STOP_METRICS = {"nll": "min", "f1": "max", "em": "max", "prefix_em": "max"}
OPTIMIZERS = ("adam", "adamw", "sgd")
_TRAIN_KEYS = qa.LIKELIHOOD_KEYS


def qa_tune_config() -> ml_collections.ConfigDict:
  """The `qa_tune` section of a job config (defaults sized for the generated dataset on 2 CPU cores)."""
  c = ml_collections.ConfigDict()
  c.lr = 2.5e-5  # learning rate, > 0 (reference: 2.5e-5)
  c.optimizer = "adam"  # "adam" (reference; torch defaults b1 0.9, b2 0.999, eps 1e-8), "adamw" or "sgd"
  c.weight_decay = 0.0  # decoupled weight decay (>= 0), "adamw" only (reference: none)
  c.grad_clip = 100.0  # global gradient-norm clip (reference: 100); <= 0 disables it
  c.grad_accum = 1  # micro-batches (of data.qa_batch_size) per update, >= 1 (reference: 2 x 32)
  c.max_steps = 60  # updates at most: 5 epochs of the default generated QA-train (reference: unlimited)
  c.val_every = 6  # updates between validations (>= 1); step 0 is validated too (reference: 512)
  c.patience = 3  # stop when the last `patience` (>= 1) validations are all worse than an earlier one (ref: 10)
  c.stop_metric = "nll"  # "nll" (reference) or "f1" / "em" / "prefix_em" (need val_decoding)
  c.val_decoding = ""  # "" = NLL only; "greedy" (reference light-tune) or "beam" adds EM / F1
  c.max_new_tokens = 16  # answer budget of the validation decoding (reference: 16)
  c.log_every = 10  # updates between train-metric scalars (means over the interval), >= 1
  c.train_split = "qa_train"  # data split trained on (a key of data.split_sizes)
  c.val_split = "qa_val"  # data split validated on (a key of data.split_sizes)
  return c


RULES = {
    "lr": checks.positive,
    "optimizer": checks.one_of(*OPTIMIZERS),
    "weight_decay": checks.non_negative,
    "grad_clip": checks.any_number,  # <= 0 disables clipping
    "grad_accum": checks.count,
    "max_steps": checks.count,
    "val_every": checks.count,
    "patience": checks.count,
    "stop_metric": checks.one_of(*STOP_METRICS),
    "val_decoding": checks.one_of("", *qa.DECODINGS),
    "max_new_tokens": checks.count,
    "log_every": checks.count,
    "train_split": checks.nonempty_string,
    "val_split": checks.nonempty_string,
}


def _metric_decoded(c, at=""):
  if c.stop_metric != "nll" and not c.val_decoding:
    return [f"{at}stop_metric={c.stop_metric!r} needs {at}val_decoding ('greedy' or 'beam'): only decoded "
            f"answers have an EM / F1"]
  return []


def _decay_used(c, at=""):
  if c.weight_decay and c.optimizer != "adamw":  # adam and sgd would silently ignore it
    return [f"{at}weight_decay={c.weight_decay} is used by {at}optimizer='adamw' only, not {c.optimizer!r}"]
  return []


CROSS = [_metric_decoded, _decay_used]


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Gradient clipping followed by the configured optimizer.

  Equal settings give the same (cached) object: `train_step` takes the optimizer as a static argument, so
  a new but equal optimizer would otherwise compile the step again.
  """
  return _optimizer(config.optimizer, float(config.lr), float(config.weight_decay), float(config.grad_clip))


@functools.lru_cache(maxsize=None)
def _optimizer(name: str, lr: float, weight_decay: float, grad_clip: float) -> optax.GradientTransformation:
  if name == "adam":
    opt = optax.adam(lr)
  elif name == "adamw":
    opt = optax.adamw(lr, weight_decay=weight_decay)
  elif name == "sgd":
    opt = optax.sgd(lr)
  else:
    raise ValueError(f"qa_tune.optimizer={name!r} is not one of {', '.join(OPTIMIZERS)}")
  if grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(grad_clip), opt)
  return opt


def _qa_loss(graphdef, params, batch):
  logits_BxSxV = transformer.apply(graphdef, params, batch["qa_tokens_BxS"], batch["qa_mask_BxS"])
  loss_mask_BxS = batch["qa_loss_mask_BxS"] & batch["qa_valid_B"][:, None]
  return loss.answer_nll_mean(logits_BxSxV, batch["qa_tokens_BxS"], loss_mask_BxS)


@functools.partial(jax.jit, static_argnums=(0, 1))
def train_step(graphdef: nnx.GraphDef, opt: optax.GradientTransformation, params: transformer.Params,
               opt_state: optax.OptState, batch: Mapping[str, jax.Array]):
  """One optimizer update on the mean answer(+EOS) NLL.

  Args:
    graphdef: the model's static graph.
    opt: the optimizer (static; build it once, e.g. with `make_optimizer`).
    params, opt_state: the current state.
    batch: a QA batch (qa_tokens_BxS, qa_mask_BxS, qa_loss_mask_BxS, qa_valid_B), or A such batches
      stacked on a new leading axis (`stack`) for gradient accumulation: the gradient is then the mean of
      the A micro-batch gradients, as the reference's loss / grad_acc_steps.

  Returns:
    (params, opt_state, metrics) with metrics {"loss": mean micro-batch loss, "grad_norm": global norm
    of the (unclipped) gradient}.
  """
  grad_fn = jax.value_and_grad(functools.partial(_qa_loss, graphdef))
  if batch["qa_tokens_BxS"].ndim == 2:
    loss_value, grads = grad_fn(params, batch)
  else:
    def accumulate(carry, micro):
      loss_sum, grad_sum = carry
      l, g = grad_fn(params, micro)
      return (loss_sum + l, jax.tree.map(jnp.add, grad_sum, g)), None

    a = batch["qa_tokens_BxS"].shape[0]
    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), batch)
    loss_value, grads = loss_sum / a, jax.tree.map(lambda g: g / a, grad_sum)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = opt.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return params, opt_state, {"loss": loss_value, "grad_norm": grad_norm}


def stack(batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Micro-batches stacked on a leading axis (the training keys only), for `train_step`."""
  return {k: np.stack([b[k] for b in batches]) for k in _TRAIN_KEYS}


# ------------------------------------------------------------------------------------------------
# Early stopping.


def stop_rule(history: Sequence[Mapping[str, float]], metric: str, patience: int) -> bool:
  """`loop.should_stop` on `metric` of validation records; a "max" metric that never changed falls back to NLL
  (the reference's rule for, e.g., an F1 stuck at 0)."""
  values = [h[metric] for h in history]
  mode = STOP_METRICS[metric]
  if mode == "max" and values and max(values) == min(values):
    return loop.should_stop([h["nll"] for h in history], patience, "min")
  return loop.should_stop(values, patience, mode)


def validate(model, data, config: ml_collections.ConfigDict, params,
             progress: bool = False) -> dict[str, Any]:
  """QA-val metrics of `params`: NLL, plus EM / prefix EM / F1 when config.val_decoding is set."""
  split = config.val_split
  return qa.evaluate_qa(model.graphdef, params, model.cfg, model.tokenizer, list(data.qa_eval_batches(split)),
                        pipeline.questions(data.splits[split]), config.val_decoding or None,
                        progress=progress, desc="qa val", max_new_tokens=config.max_new_tokens)


def _check(config: ml_collections.ConfigDict) -> None:
  checks.validate_section("qa_tune", config, RULES, CROSS)


def qa_tune(model, data, config: ml_collections.ConfigDict, writer, progress: bool = True,
            mesh: jax.sharding.Mesh | None = None, workdir: str | None = None
            ) -> tuple[transformer.Params, list[dict[str, Any]]]:
  """QA-tunes `model` on data's QA-train split with early stopping on QA-val, through `loop.run`.

  Args:
    model: a `loading.Loaded` (graphdef, params, cfg, tokenizer); its params are not modified.
    data: a `data.Data` (qa_loader / qa_eval_batches / splits).
    config: a `qa_tune_config()` section.
    writer: has write_scalars(step, dict) (`metrics.MetricWriter`); gets "qa_tune/train/*" every
      log_every updates and "qa_tune/val/*" at every validation.
    progress: show tqdm bars.
    mesh: batches are split over its data axis (default: the mesh the model's params are on).
    workdir: checkpoints in <workdir>/qa_tune at every validation (a killed run resumes from the last one);
      None keeps the best params in memory (the evaluation's light-tune).

  Returns:
    (best_params, history): the params of the best validation by config.stop_metric, and the validation
    records (step, train_loss, nll, em, prefix_em, f1, n, tokens, is_best, stop), oldest first.
  """
  _check(config)
  mesh = mesh or sharding.mesh_of(model.params)
  if data.config.qa_batch_size % mesh.shape[sharding.DATA_AXIS]:
    raise checks.ConfigError(f"data.qa_batch_size={data.config.qa_batch_size} must be a multiple of the "
                             f"{mesh.shape[sharding.DATA_AXIS]} devices QA-tuning splits each batch over")
  opt = make_optimizer(config)
  loader = data.qa_loader(config.train_split)

  def step_fn(state, carry, step, rng):
    del step, rng
    micro = [next(loader) for _ in range(config.grad_accum)]
    batch = stack(micro) if config.grad_accum > 1 else {k: micro[0][k] for k in _TRAIN_KEYS}
    # Data parallel: the question rows split over the mesh's data axis (every process feeds its own).
    batch = sharding.shard_batch(batch, mesh, dim=int(config.grad_accum > 1))
    params, opt_state, metrics = train_step(model.graphdef, opt, state["params"], state["opt"], batch)
    return {"params": params, "opt": opt_state}, carry, metrics

  cfg = loop.LoopConfig(JOB, config.max_steps, config.val_every, config.stop_metric,
                        STOP_METRICS[config.stop_metric], log_every=config.log_every, max_to_keep=1)
  opt_state = sharding.place_params(opt.init(model.params), sharding.mesh_of(model.params))
  result = loop.run(cfg, {"params": model.params, "opt": opt_state}, step_fn,
                    lambda state: validate(model, data, config, state["params"], progress), workdir=workdir,
                    writer=writer, rng=jax.random.key(0), loader=loader,
                    stop_fn=lambda history: stop_rule(history, config.stop_metric, config.patience),
                    progress=progress, desc="qa tune")
  return result.state["params"], result.history


# ------------------------------------------------------------------------------------------------
# The QA-tuned model of a workdir.


def load_tuned(model, workdir: str):
  """(params, history) of the finished QA-tuning in <workdir>/qa_tuned, or None if there is none."""
  directory = os.path.join(workdir, TUNED)
  if not os.path.isdir(directory):
    return None
  with checkpoint.Checkpointer(directory, max_to_keep=1) as ckpt:
    if ckpt.latest_step() is None:
      return None
    restored = ckpt.restore(None, {"params": model.params})
  logging.info("qa_tune: loaded the QA-tuned model from %s", directory)
  return restored.state["params"], restored.meta["history"]


def tuned_params(config: ml_collections.ConfigDict, model, data, workdir: str, writer, progress: bool = True,
                 say: Callable[[str], None] = logging.info):
  """The QA-tuned base params of the job `config`: loaded from <workdir>/qa_tuned when a QA-tuning finished
  there, else trained (resuming an interrupted one from <workdir>/qa_tune) and saved there.

  Returns:
    (params, history) as `qa_tune` returns them.
  """
  tuned = os.path.join(workdir, TUNED)
  try:
    found = load_tuned(model, workdir)
  except checkpoint.DamagedCheckpoint as e:
    # The loop's own checkpoints in <workdir>/qa_tune hold the same run: set the damaged copy aside (nothing
    # written is deleted) and rebuild it from them, which costs no training when that run had finished.
    os.replace(tuned, _free_name(tuned + checkpoint.DAMAGED_SUFFIX))
    say(f"qa_tune: {e}; set it aside and rebuilding it from {os.path.join(workdir, JOB)}")
    found = None
  if found is not None:
    say(f"qa_tune: loaded the finished QA-tuning in {tuned}")
    return found
  say(f"qa_tune: QA-tuning the base model, at most {config.qa_tune.max_steps} steps")
  params, history = qa_tune(model, data, config.qa_tune, writer, progress=progress,
                            mesh=sharding.job_mesh(config), workdir=workdir)
  with checkpoint.Checkpointer(tuned, max_to_keep=1) as ckpt:
    ckpt.save(history[-1]["step"] + 1, {"params": params}, meta={"history": history})
  return params, history


def _free_name(path: str) -> str:
  """`path`, or `path`.1, .2, ... : the first that does not exist."""
  candidate, i = path, 0
  while os.path.exists(candidate):
    i += 1
    candidate = f"{path}.{i}"
  return candidate
