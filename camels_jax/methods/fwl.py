"""Fast Weight Layers (Clark et al. 2022, "Meta-Learning Fast Weight Language Models", EMNLP).

A small head between the transformer body and the output softmax whose weights, for every token t, are
the weights after one SGD step on the LM losses of all earlier tokens. Dynamic evaluation at the cost of
linear attention, trained end to end (the step sizes too), so the model learns to use the update.

Head (position-wise, on the body's final hidden states h_t):

  y1 = W1 h + b1                 dense d -> m*d (m = hidden_mult, paper: 4)
  a  = relu(y1)^2                squared ReLU
  y2 = W2 a + b2                 dense m*d -> d
  o  = gamma * norm(y2) + beta   LayerNorm
  out = h + o  (residual=True)   or  out = o (residual=False, the paper's layout)
  logits = unembed(out)          the base model's own unembedding: slow, never fast-updated

Fast weights. Loss of position i: L_i = -log p(token_{i+1} | tokens <= i), counted where a real token
predicts a real token (`adapt.loss.target_mask`). A first, slow pass at the original params gives each
layer's input x_i and the per-token gradient of L_i w.r.t. the layer's output, g_i = dL_i/dy_i (the head
is position-wise, so L_i depends on position i's outputs only). One SGD step on sum_{i<t} L_i changes a
dense layer to W - eta_W sum_i g_i x_i^T, b - eta_b sum_i g_i, so its fast output at t is

  y_t = W x_t + b - eta_W sum_{i<t} (x_t . x_i) g_i - eta_b sum_{i<t} g_i

with x_t the layer's input in the fast pass (layer 2 sees layer 1's fast output): causal linear attention
with queries x_t, keys x_i, values g_i. LayerNorm's gain and bias become
gamma - eta_gamma sum_{i<t} g_i * norm(x_i) and beta - eta_beta sum_{i<t} g_i (g_i w.r.t. its output,
norm(x_i) from the slow pass). Position t only uses losses i < t, whose targets are tokens <= t: causal.

Computation: the slow pass is one forward and one backward (jax.grad w.r.t. zero perturbations of each
layer's output) over the whole sequence; the fast pass is a lax.scan over chunks of `chunk` tokens: inside
a chunk a strictly causal masked matmul, across chunks carried sums (a d_in x d_out matrix per dense
layer plus the bias / LayerNorm vectors), so memory is linear in the length and all the work is matmuls.
The last chunk is zero-padded (padded positions have g = 0, so they add nothing). Training is plain
jax.grad through both passes (second order through the slow backward); there is no custom backward.

Design choices (what the paper / its official code, google-research/fwl, does, and what is chosen here):
- Layout: dense (4x), squared ReLU, dense, LayerNorm, as the official README and code. The paper's FWL
  ends in its own (slow) Dense(vocab); here the base model's unembedding is reused (no new V x d matrix).
- Residual: the paper has none (the LayerNorm's output goes straight to the softmax). With a pretrained
  body the base unembedding expects h, so by default (residual=True) the head adds its LayerNorm's output
  to h, with that LayerNorm's gain and bias initialised to 0: at init, and at step size 0, the model is
  exactly the base model. The fast LayerNorm update is nonzero from the first step, so the head is not
  inert at init. residual=False is the paper's layout (gain initialised to 1).
- Step sizes: the official TF code learns one step size per parameter group (kernel and bias of each
  dense layer, gain and bias of the LayerNorm; its JAX code one per layer), each a raw scalar initialised
  to 0.01 and left unconstrained. Here: the same six groups (`STEP_GROUPS`), each eta = exp(log_step),
  positive by construction (as camels.py's learned inner lr), initialised to `step_init`.
- Losses feeding the update: the official code's slow loss is the weighted NLL averaged over every
  weighted token of the *batch*, so a sequence's fast weights depend on which other sequences share its
  batch and how long they are. Here g_i is the gradient of the per-token NLL, summed over earlier tokens
  (a plain SGD step on sum_{i<t} L_i): a sequence's logits depend on its own tokens only, whatever the
  batching or padding. The paper's 0.01 on a batch mean is therefore ~0.01 / (tokens per batch) here; the
  default `step_init` is larger than that (1e-3) because the step sizes are learned in log space and the
  LayerNorm groups (the only ones active at init with residual=True) need a sizeable step to matter.
- Dtype: the head runs in at least float32 (`transformer.upcast`), sums over thousands of tokens.

Shapes: B batch, L length, N chunks, C chunk size, D d_model, F hidden width (hidden_mult * D), V vocab.
"""

import functools
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from camels_jax import checks, loop, sharding
from camels_jax.adapt import loss
from camels_jax.data import text as text_lib
from camels_jax.models import transformer

# The parameter groups with a learned step size, in the order of FWLHead.log_step (module path.name).
STEP_GROUPS = ("fc1.kernel", "fc1.bias", "fc2.kernel", "fc2.bias", "norm.scale", "norm.bias")
UnembedFn = Callable[[jax.Array], jax.Array]  # h_BxLxD -> logits_BxLxV


def fwl_config() -> ml_collections.ConfigDict:
  """The `fwl` section of a job config."""
  return ml_collections.ConfigDict(dict(
      hidden_mult=4,  # width of the head's hidden layer in units of d_model, >= 1 (paper: 4)
      # True: out = h + LayerNorm(...), gain and bias 0 at init (starts as the base model); False: the paper's
      # out = LayerNorm(...), gain 1 at init.
      residual=True,
      step_init=1e-3,  # initial step size of each of the 6 parameter groups, > 0 (per token, summed losses)
      chunk=256,  # tokens per chunk of the causal linear attention, >= 1; any length works (paper: 4096 / 16)
      train_body=False,  # also train the base model (else only the head is trained)
      # False: the same body trained and scored without the head (its static logits), for the FWL paper's
      # from-scratch comparison: a model trained without FWL for the same steps. Needs train_body.
      fast_weights=True,
      lr=1e-3,  # Adam lr of the head (its step sizes included), > 0
      body_lr=1e-5,  # Adam lr of the base model when train_body, > 0
      grad_clip=1.0,  # global-norm clip of the gradient, > 0
      steps=1000,  # training steps, >= 0 (0 = evaluate the initial head)
      seq_len=256,  # tokens per training / validation window, >= 2 (capped at the model's context)
      batch_size=4,  # windows per training step, >= 1
      val_every=50,  # steps between validations (each also a checkpoint), >= 1
      val_windows=16,  # validation-article windows scored at each validation, >= 0 (0 = all of them)
      patience=0,  # stop once the last `patience` validations all fail to beat an earlier one, >= 0 (0 = never)
      seed=0,  # init seed of the head and of the order of the training windows, >= 0
  ))


RULES = {
    "hidden_mult": checks.count,
    "residual": checks.boolean,
    "step_init": checks.positive,
    "chunk": checks.count,
    "train_body": checks.boolean,
    "fast_weights": checks.boolean,
    "lr": checks.positive,
    "body_lr": checks.positive,
    "grad_clip": checks.positive,
    "steps": checks.count_or_zero,
    "seq_len": checks.at_least(2, integer=True),
    "batch_size": checks.count,
    "val_every": checks.count,
    "val_windows": checks.count_or_zero,
    "patience": checks.count_or_zero,
    "seed": checks.seed,
}


def _baseline_trains_body(c, at=""):
  if not c.fast_weights and not c.train_body:
    return [f"{at}fast_weights=False trains the model without the head, so it needs {at}train_body=True "
            f"(with a frozen body there is nothing to train)"]
  return []


CROSS = [_baseline_trains_body]


class FWLHead(nnx.Module):
  """Dense d -> m*d, squared ReLU, dense m*d -> d, LayerNorm (+ h if residual), and the log step sizes."""

  def __init__(self, d_model: int, hidden_mult: int = 4, residual: bool = True, step_init: float = 1e-3,
               eps: float = 1e-5, param_dtype="float32", *, rngs: nnx.Rngs):
    self.residual, self.eps = residual, eps
    f = hidden_mult * d_model
    self.fc1 = nnx.Linear(d_model, f, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = nnx.Linear(f, d_model, param_dtype=param_dtype, rngs=rngs)
    scale_init = nnx.initializers.zeros_init() if residual else nnx.initializers.ones_init()
    self.norm = nnx.LayerNorm(d_model, epsilon=eps, scale_init=scale_init, param_dtype=param_dtype, rngs=rngs)
    self.log_step = nnx.Param(jnp.full((len(STEP_GROUPS),), math.log(step_init), param_dtype))

  def weights(self) -> "_Weights":
    return _Weights(self.fc1.kernel.get_value(), self.fc1.bias.get_value(), self.fc2.kernel.get_value(),
                    self.fc2.bias.get_value(), self.norm.scale.get_value(), self.norm.bias.get_value())

  def __call__(self, h_BxLxD):
    """The slow head's output features (no update), out_BxLxD."""
    w = self.weights()
    h_BxLxD = _compute(h_BxLxD, w)
    y2_BxLxD = _dense(_sqrelu(_dense(h_BxLxD, w.k1_DxF, w.b1_F)), w.k2_FxD, w.b2_D)
    out_BxLxD = w.scale_D * _normalize(y2_BxLxD, self.eps) + w.bias_D
    return h_BxLxD + out_BxLxD if self.residual else out_BxLxD


class _Weights(NamedTuple):
  k1_DxF: jax.Array
  b1_F: jax.Array
  k2_FxD: jax.Array
  b2_D: jax.Array
  scale_D: jax.Array
  bias_D: jax.Array


def _compute(h_BxLxD: jax.Array, w: _Weights) -> jax.Array:
  """h in the head's compute dtype: at least float32, and at least the params' dtype."""
  return transformer.upcast(h_BxLxD.astype(jnp.promote_types(h_BxLxD.dtype, w.k1_DxF.dtype)))


def _dense(x, kernel, bias):
  return x @ kernel.astype(x.dtype) + bias.astype(x.dtype)


def _sqrelu(x):
  return jnp.square(jax.nn.relu(x))


def _normalize(x_BxLxD, eps):
  mean = x_BxLxD.mean(-1, keepdims=True)
  centred = x_BxLxD - mean
  return centred * jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)


def init_head(cfg: ml_collections.ConfigDict, d_model: int, seed: int | None = None,
              param_dtype="float32") -> tuple[nnx.GraphDef, transformer.Params]:
  """(graphdef, params) of a freshly initialised head for a body of width d_model (seed None: cfg.seed)."""
  seed = cfg.seed if seed is None else seed
  return nnx.split(FWLHead(d_model, cfg.hidden_mult, cfg.residual, cfg.step_init, param_dtype=param_dtype,
                           rngs=nnx.Rngs(seed)))


def step_sizes(head_params: transformer.Params) -> dict[str, jax.Array]:
  """{group: eta} of the head's learned step sizes (for logging)."""
  eta_6 = jnp.exp(head_params["log_step"].get_value())
  return {group: eta_6[i] for i, group in enumerate(STEP_GROUPS)}


def with_step_sizes(head_params: transformer.Params, etas: float | dict[str, float]) -> transformer.Params:
  """head_params with the step sizes set: one value for all groups, or {group: eta} for some (0 allowed)."""
  if not isinstance(etas, dict):
    etas = {group: etas for group in STEP_GROUPS}
  unknown = set(etas) - set(STEP_GROUPS)
  if unknown:
    raise ValueError(f"with_step_sizes: unknown group(s) {sorted(unknown)}; expected some of {STEP_GROUPS}")
  flat = []
  for path, var in nnx.to_flat_state(head_params):
    if path == ("log_step",):
      log_step = var.get_value()
      for group, eta in etas.items():
        log_step = log_step.at[STEP_GROUPS.index(group)].set(jnp.log(jnp.asarray(eta, log_step.dtype)))
      var = var.replace(log_step)
    flat.append((path, var))
  return nnx.from_flat_state(flat)


def base_unembed(graphdef: nnx.GraphDef, params: transformer.Params) -> UnembedFn:
  """The base model's output projection, h_BxLxD -> logits_BxLxV (tied or untied)."""
  return nnx.merge(graphdef, params).unembed


# ------------------------------------------------------------------------------------------------
# Functional core.


class _Slow(NamedTuple):
  """What the fast pass needs from the slow one, per token (0 where a token's loss is not counted)."""

  a_BxLxF: jax.Array  # input of fc2 (squared ReLU output)
  n_BxLxD: jax.Array  # normalized input of the LayerNorm
  g1_BxLxF: jax.Array  # dL_i/d(fc1 output)
  g2_BxLxD: jax.Array  # dL_i/d(fc2 output)
  g3_BxLxD: jax.Array  # dL_i/d(LayerNorm output)


def _slow_pass(head: FWLHead, h_BxLxD, tokens_BxL, mask_BxL, unembed_fn: UnembedFn) -> _Slow:
  w = head.weights()
  lw_BxL = loss.target_mask(mask_BxL)

  def total_loss(p1_BxLxF, p2_BxLxD, p3_BxLxD):
    a_BxLxF = _sqrelu(_dense(h_BxLxD, w.k1_DxF, w.b1_F) + p1_BxLxF)
    n_BxLxD = _normalize(_dense(a_BxLxF, w.k2_FxD, w.b2_D) + p2_BxLxD, head.eps)
    out_BxLxD = w.scale_D * n_BxLxD + w.bias_D + p3_BxLxD
    if head.residual:
      out_BxLxD = h_BxLxD + out_BxLxD
    nll_BxL = loss.token_nll(unembed_fn(out_BxLxD), tokens_BxL)
    return (nll_BxL * lw_BxL.astype(nll_BxL.dtype)).sum(), (a_BxLxF, n_BxLxD)

  b, l, d = h_BxLxD.shape
  zeros = (jnp.zeros((b, l, w.k1_DxF.shape[1]), h_BxLxD.dtype), jnp.zeros((b, l, d), h_BxLxD.dtype),
           jnp.zeros((b, l, d), h_BxLxD.dtype))
  (g1, g2, g3), (a, n) = jax.grad(total_loss, argnums=(0, 1, 2), has_aux=True)(*zeros)
  return _Slow(a, n, g1, g2, g3)


def _fast_features(head: FWLHead, h_BxLxD, slow: _Slow, chunk: int) -> jax.Array:
  """out_BxLxD: the head's output at every t with its weights after the SGD step on the losses i < t."""
  w = head.weights()
  dtype = h_BxLxD.dtype
  eta_6 = jnp.exp(head.log_step.get_value()).astype(dtype)
  b, l, d = h_BxLxD.shape
  f = w.k1_DxF.shape[1]
  c = min(chunk, l)
  n_chunks = -(-l // c)

  def chunked(x_BxLxX):  # -> NxBxCxX, zero-padded to a whole number of chunks
    x_BxLxX = jnp.pad(x_BxLxX, ((0, 0), (0, n_chunks * c - l), (0, 0)))
    return x_BxLxX.reshape(b, n_chunks, c, x_BxLxX.shape[-1]).swapaxes(0, 1)

  earlier_CxC = jnp.tril(jnp.ones((c, c), dtype), -1)  # [t, i] = 1 where i < t

  def attend(q_BxCxX, k_BxCxX, v_BxCxY):  # sum over i < t in the chunk of (q_t . k_i) v_i
    s_BxCxC = jnp.einsum("btx,bix->bti", q_BxCxX, k_BxCxX) * earlier_CxC
    return jnp.einsum("bti,biy->bty", s_BxCxC, v_BxCxY)

  def prefix(v_BxCxY):  # sum over i < t in the chunk of v_i
    return jnp.einsum("ti,biy->bty", earlier_CxC, v_BxCxY)

  def step(carry, xs):
    s1_BxDxF, c1_BxF, s2_BxFxD, c2_BxD, cs_BxD, cb_BxD = carry
    h_BxCxD, a_BxCxF, n_BxCxD, g1_BxCxF, g2_BxCxD, g3_BxCxD = xs
    # fc1: its fast input is h itself, so queries and keys are both h.
    y1_BxCxF = (_dense(h_BxCxD, w.k1_DxF, w.b1_F)
                - eta_6[0] * (attend(h_BxCxD, h_BxCxD, g1_BxCxF) + jnp.einsum("btd,bdf->btf", h_BxCxD, s1_BxDxF))
                - eta_6[1] * (prefix(g1_BxCxF) + c1_BxF[:, None]))
    fa_BxCxF = _sqrelu(y1_BxCxF)  # fc2's fast input (queries); a_BxCxF, its slow input, are the keys
    y2_BxCxD = (_dense(fa_BxCxF, w.k2_FxD, w.b2_D)
                - eta_6[2] * (attend(fa_BxCxF, a_BxCxF, g2_BxCxD) + jnp.einsum("btf,bfd->btd", fa_BxCxF, s2_BxFxD))
                - eta_6[3] * (prefix(g2_BxCxD) + c2_BxD[:, None]))
    gn_BxCxD = g3_BxCxD * n_BxCxD  # per-token gradient of the LayerNorm gain
    scale_BxCxD = w.scale_D - eta_6[4] * (prefix(gn_BxCxD) + cs_BxD[:, None])
    bias_BxCxD = w.bias_D - eta_6[5] * (prefix(g3_BxCxD) + cb_BxD[:, None])
    out_BxCxD = scale_BxCxD * _normalize(y2_BxCxD, head.eps) + bias_BxCxD
    if head.residual:
      out_BxCxD = h_BxCxD + out_BxCxD
    carry = (s1_BxDxF + jnp.einsum("bid,bif->bdf", h_BxCxD, g1_BxCxF), c1_BxF + g1_BxCxF.sum(1),
             s2_BxFxD + jnp.einsum("bif,bid->bfd", a_BxCxF, g2_BxCxD), c2_BxD + g2_BxCxD.sum(1),
             cs_BxD + gn_BxCxD.sum(1), cb_BxD + g3_BxCxD.sum(1))
    return carry, out_BxCxD

  carry = (jnp.zeros((b, d, f), dtype), jnp.zeros((b, f), dtype), jnp.zeros((b, f, d), dtype),
           jnp.zeros((b, d), dtype), jnp.zeros((b, d), dtype), jnp.zeros((b, d), dtype))
  xs = tuple(chunked(x) for x in (h_BxLxD, slow.a_BxLxF, slow.n_BxLxD, slow.g1_BxLxF, slow.g2_BxLxD,
                                  slow.g3_BxLxD))
  _, out_NxBxCxD = jax.lax.scan(step, carry, xs)
  return out_NxBxCxD.swapaxes(0, 1).reshape(b, n_chunks * c, d)[:, :l]


def head_logits(head_graphdef: nnx.GraphDef, head_params: transformer.Params, h_BxLxD: jax.Array,
                tokens_BxL: jax.Array, mask_BxL: jax.Array, unembed_fn: UnembedFn, chunk: int) -> jax.Array:
  """logits_BxLxV of the fast-weight head on right-padded sequences (position t: the head after one SGD
  step on the losses of positions i < t of its own sequence). `chunk` (static) sets only the cost."""
  if chunk < 1:
    raise ValueError(f"head_logits: chunk={chunk} must be >= 1")
  head = nnx.merge(head_graphdef, head_params)
  h_BxLxD = _compute(h_BxLxD, head.weights())
  slow = _slow_pass(head, h_BxLxD, tokens_BxL, mask_BxL, unembed_fn)
  return unembed_fn(_fast_features(head, h_BxLxD, slow, chunk))


def slow_logits(head_graphdef: nnx.GraphDef, head_params: transformer.Params, h_BxLxD: jax.Array,
                unembed_fn: UnembedFn) -> jax.Array:
  """logits_BxLxV of the plain head (its slow weights, no update)."""
  return unembed_fn(nnx.merge(head_graphdef, head_params)(h_BxLxD))


def logits(base_graphdef: nnx.GraphDef, base_params: transformer.Params, head_graphdef: nnx.GraphDef,
           head_params: transformer.Params, tokens_BxL: jax.Array, mask_BxL: jax.Array, chunk: int) -> jax.Array:
  """logits_BxLxV of the whole FWL model: base body, fast-weight head, base unembedding (right padding)."""
  h_BxLxD = transformer.hidden(base_graphdef, base_params, tokens_BxL, mask_BxL)
  return head_logits(head_graphdef, head_params, h_BxLxD, tokens_BxL, mask_BxL,
                     base_unembed(base_graphdef, base_params), chunk)


def lm_loss(base_graphdef: nnx.GraphDef, base_params: transformer.Params, head_graphdef: nnx.GraphDef,
            head_params: transformer.Params, tokens_BxL: jax.Array, mask_BxL: jax.Array, chunk: int) -> jax.Array:
  """Mean next-token NLL of the FWL model over every real target of the batch (pooled over sequences)."""
  logits_BxLxV = logits(base_graphdef, base_params, head_graphdef, head_params, tokens_BxL, mask_BxL, chunk)
  lw_BxL = loss.target_mask(mask_BxL)
  return (loss.token_nll(logits_BxLxV, tokens_BxL) * lw_BxL).sum() / jnp.maximum(lw_BxL.sum(), 1.0)


def reference_logits(head_graphdef: nnx.GraphDef, head_params: transformer.Params, h_BxLxD: jax.Array,
                     tokens_BxL: jax.Array, mask_BxL: jax.Array, unembed_fn: UnembedFn) -> jax.Array:
  """`head_logits` the slow, explicit way (tests only): for every sequence b and position t, jax.grad of
  the summed losses of positions i < t w.r.t. the head's params (at the original params), one SGD step
  with each group's step size, then the updated head's logits at t."""
  lw_BxL = loss.target_mask(mask_BxL)
  etas = step_sizes(head_params)
  b, l, _ = h_BxLxD.shape

  def earlier_loss(params, h_1xLxD, tokens_1xL, lw_1xL):
    nll_1xL = loss.token_nll(slow_logits(head_graphdef, params, h_1xLxD, unembed_fn), tokens_1xL)
    return (nll_1xL * lw_1xL).sum()

  @jax.jit
  def logits_at(t, h_1xLxD, tokens_1xL, lw_1xL):
    grads = jax.grad(earlier_loss)(head_params, h_1xLxD, tokens_1xL, lw_1xL * (jnp.arange(l) < t))
    flat_grads = dict(nnx.to_flat_state(grads))
    flat = []
    for path, var in nnx.to_flat_state(head_params):
      group = ".".join(map(str, path))
      if group in etas:
        var = var.replace(var.get_value() - etas[group] * flat_grads[path].get_value())
      flat.append((path, var))
    return slow_logits(head_graphdef, nnx.from_flat_state(flat), h_1xLxD, unembed_fn)[0, t]

  rows = [[logits_at(t, h_BxLxD[i:i + 1], tokens_BxL[i:i + 1], lw_BxL[i:i + 1]) for t in range(l)]
          for i in range(b)]
  return jnp.stack([jnp.stack(row) for row in rows])


# ------------------------------------------------------------------------------------------------
# Scoring and training (the `fwl` job of camels_jax.train, the `fwl` method of camels_jax.perplexity).


def _token_nlls(base_graphdef, base_params, head_graphdef, head_params, tokens_BxL, mask_BxL, chunk: int,
                with_static: bool = True):
  """(fast nll_BxL, static nll_BxL, lw_BxL): per-position NLLs (position t scores token t+1, `loss.token_nll`)
  of the FWL model and of the plain base model, and the real-target mask. `with_static=False` leaves the
  static NLLs zero and their unembedding uncomputed (for timing FWL alone)."""
  h_BxLxD = transformer.hidden(base_graphdef, base_params, tokens_BxL, mask_BxL)
  unembed = base_unembed(base_graphdef, base_params)
  lw_BxL = loss.target_mask(mask_BxL)
  fast = loss.token_nll(head_logits(head_graphdef, head_params, h_BxLxD, tokens_BxL, mask_BxL, unembed, chunk),
                        tokens_BxL)
  static = loss.token_nll(unembed(h_BxLxD), tokens_BxL) * lw_BxL if with_static else jnp.zeros_like(fast)
  return fast * lw_BxL, static, lw_BxL


@functools.partial(jax.jit, static_argnames=("base_graphdef", "head_graphdef", "chunk"))
def nll_sums(base_graphdef, base_params, head_graphdef, head_params, tokens_BxL, mask_BxL, *, chunk: int):
  """(summed next-token NLL over real targets, their count, the same sum for the plain base model)."""
  fast, static, lw = _token_nlls(base_graphdef, base_params, head_graphdef, head_params, tokens_BxL, mask_BxL,
                                 chunk)
  return fast.sum(), lw.sum(), static.sum()


token_nlls = jax.jit(_token_nlls, static_argnames=("base_graphdef", "head_graphdef", "chunk", "with_static"))


def _padded_batches(tokens_NxL: np.ndarray, mask_NxL: np.ndarray, batch_size: int, progress: bool, desc: str):
  """The windows `batch_size` at a time, the last batch zero-padded: one shape, one compilation."""
  for i in tqdm.trange(0, len(tokens_NxL), batch_size, desc=desc, disable=not progress, leave=False):
    t, m = tokens_NxL[i:i + batch_size], mask_NxL[i:i + batch_size]
    if len(t) < batch_size:
      t, m = np.pad(t, ((0, batch_size - len(t)), (0, 0))), np.pad(m, ((0, batch_size - len(m)), (0, 0)))
    yield t, m


def score_windows(base_graphdef, base_params, head_graphdef, head_params, tokens_NxL, mask_NxL, batch_size: int,
                  chunk: int, progress: bool = False, desc: str = "fwl",
                  fast_weights: bool = True) -> dict[str, float]:
  """{"nll", "ppl", "static_nll", "static_ppl", "tokens"} of the model on windows, and of the base model without
  the head. `fast_weights=False` (a model trained without its head, `fwl.fast_weights`): "nll" and "ppl" are the
  static ones."""
  fast = static = count = 0.0
  for t, m in _padded_batches(tokens_NxL, mask_NxL, batch_size, progress, desc):
    f, c, s = nll_sums(base_graphdef, base_params, head_graphdef, head_params, t, m, chunk=chunk)
    fast, count, static = fast + float(f), count + float(c), static + float(s)
  nll, static_nll = (fast if fast_weights else static) / max(count, 1.0), static / max(count, 1.0)
  return {"nll": nll, "ppl": math.exp(nll), "static_nll": static_nll, "static_ppl": math.exp(static_nll),
          "tokens": int(count)}


def token_scores(base_graphdef, base_params, head_graphdef, head_params, ids: np.ndarray, targets: int,
                 batch_size: int, chunk: int, progress: bool = False,
                 with_static: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(fast nll_T, static nll_T): the NLL of every token of `ids` but the first, with the FWL model and with the
  plain base model, in windows of `targets` predictions (targets + 1 tokens, each window's last token the next
  one's first). Token j's context is then the tokens of its window before it: the same tokens and contexts as
  `dynamic_eval`'s non-overlapping windows of `targets` (window = stride = targets), so the two pair up.
  `with_static=False`: the static NLLs are zeros, not computed (`_token_nlls`)."""
  ids = np.asarray(ids, np.int32)
  n_targets = len(ids) - 1
  n = max(1, math.ceil(n_targets / targets))
  tokens_NxL = np.zeros((n, targets + 1), np.int32)
  mask_NxL = np.zeros((n, targets + 1), np.int32)
  for i in range(n):
    w = ids[i * targets:i * targets + targets + 1]
    tokens_NxL[i, :len(w)], mask_NxL[i, :len(w)] = w, 1
  fast, static = [], []
  for t, m in _padded_batches(tokens_NxL, mask_NxL, batch_size, progress, "fwl"):
    f, s, _ = token_nlls(base_graphdef, base_params, head_graphdef, head_params, t, m, chunk=chunk,
                         with_static=with_static)
    fast.append(np.asarray(f, np.float64)[:, :targets])
    static.append(np.asarray(s, np.float64)[:, :targets])
  # Row i, position t scores token i * targets + t + 1: row-major order is token order.
  return (np.concatenate(fast).reshape(-1)[:n_targets], np.concatenate(static).reshape(-1)[:n_targets])


@functools.lru_cache
def make_optimizer(lr: float, body_lr: float, grad_clip: float, train_body: bool) -> optax.GradientTransformation:
  """Clipped Adam on {"head": ..., "body": ...} (the body at its own lr); equal settings, the same object."""
  adams = {"head": optax.adam(lr)} | ({"body": optax.adam(body_lr)} if train_body else {})
  return optax.chain(optax.clip_by_global_norm(grad_clip),
                     optax.multi_transform(adams, {k: k for k in adams}))


def static_lm_loss(base_graphdef: nnx.GraphDef, base_params: transformer.Params, tokens_BxL: jax.Array,
                   mask_BxL: jax.Array) -> jax.Array:
  """Mean next-token NLL of the plain base model (no head), pooled over the batch's real targets."""
  h_BxLxD = transformer.hidden(base_graphdef, base_params, tokens_BxL, mask_BxL)
  lw_BxL = loss.target_mask(mask_BxL)
  nll_BxL = loss.token_nll(base_unembed(base_graphdef, base_params)(h_BxLxD), tokens_BxL)
  return (nll_BxL * lw_BxL).sum() / jnp.maximum(lw_BxL.sum(), 1.0)


@functools.partial(jax.jit, static_argnames=("base_graphdef", "head_graphdef", "chunk", "optimizer", "fast"),
                   donate_argnums=(1, 2))
def train_step(base_graphdef, trainable, opt_state, frozen_body, tokens_BxL, mask_BxL, *, head_graphdef,
               chunk: int, optimizer: optax.GradientTransformation, fast: bool = True):
  """One Adam step on the FWL model's LM loss: through the fast weights, the step sizes included. `fast=False`:
  on the plain model's loss (the head gets no gradient; `fwl.fast_weights`)."""

  def loss_fn(tr):
    body = tr.get("body", frozen_body)
    if not fast:
      return static_lm_loss(base_graphdef, body, tokens_BxL, mask_BxL)
    return lm_loss(base_graphdef, body, head_graphdef, tr["head"], tokens_BxL, mask_BxL, chunk)

  value, grads = jax.value_and_grad(loss_fn)(trainable)
  updates, opt_state = optimizer.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, value


def _order(n_windows: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n_windows)


JOB = "fwl"  # the loop's checkpoints: <workdir>/fwl
BEST_METRIC = "val_nll"  # NLL per token on the validation articles


class Trainable(NamedTuple):
  """What `init` builds: the head's graph, the state the loop trains and checkpoints, its optimizer."""

  head_graphdef: nnx.GraphDef
  state: dict  # {"trainable": {"head": ..., ["body": ...]}, "opt": the optimizer's state}
  optimizer: optax.GradientTransformation


def init(config: ml_collections.ConfigDict, base) -> Trainable:
  """The FWL head (and the body when `fwl.train_body`) with its optimizer state, on the base model's mesh and
  split over its FSDP axis like the base model: what `fit` trains and `load_trained` restores onto."""
  c = config.fwl
  head_graphdef, head_params = init_head(c, base.cfg.d_model)
  mesh = sharding.mesh_of(base.params)
  trainable = {"head": sharding.place_params(head_params, mesh)} | ({"body": base.params} if c.train_body else {})
  optimizer = make_optimizer(float(c.lr), float(c.body_lr), float(c.grad_clip), bool(c.train_body))
  # Placed, not left where `init` put them: a counter on one device cannot be checkpointed by many processes.
  opt_state = sharding.place_params(optimizer.init(trainable), mesh)
  return Trainable(head_graphdef, {"trainable": trainable, "opt": opt_state}, optimizer)


def _windows(config: ml_collections.ConfigDict, base, seq_len: int):
  """(train_NxL, train_mask_NxL, val_NxL, val_mask_NxL, articles): `config.text` in windows of `seq_len`."""
  c, tok = config.fwl, base.tokenizer
  # The test articles are never read here: validation (and the best checkpoint) uses the validation articles.
  train_articles, val_articles, test_articles = text_lib.load_articles(config.text)
  train_NxL, train_mask_NxL = text_lib.windows(text_lib.token_stream(tok, train_articles), seq_len, tok.pad_id)
  val_NxL, val_mask_NxL = text_lib.windows(text_lib.token_stream(tok, val_articles), seq_len, tok.pad_id)
  if c.val_windows:
    val_NxL, val_mask_NxL = val_NxL[:c.val_windows], val_mask_NxL[:c.val_windows]
  if len(train_NxL) < c.batch_size:
    raise checks.UserError(f"fwl: {len(train_NxL)} training windows of {seq_len} tokens, fewer than "
                           f"fwl.batch_size={c.batch_size}; give more text or a smaller batch")
  return train_NxL, train_mask_NxL, val_NxL, val_mask_NxL, {"train_articles": len(train_articles),
                                                            "val_articles": len(val_articles),
                                                            "test_articles": len(test_articles)}


def fit(config: ml_collections.ConfigDict, base, workdir: str, writer, progress: bool = True):
  """Trains an FWL head (and the body when `fwl.train_body`) on `config.text`'s training articles through
  `loop.run`; validates on its validation articles, never on the test articles. Resumes from <workdir>/fwl (the
  step is the data position).

  Args:
    config: the job config (`fwl` and `text` sections).
    base: the loaded base model (`models.loading.Loaded`).
    workdir: checkpoints go to <workdir>/fwl.
    writer: TensorBoard scalars (fwl/train/loss, fwl/val/ppl, fwl/val/static_ppl, fwl/val/eta/<group>).

  Returns:
    (head_graphdef, best trainable {"head", ["body"]}, results: {"history", "best", "best_step",
    "train_windows", "val_windows", ...}).
  """
  c = config.fwl
  seq_len = min(c.seq_len, base.cfg.max_len)
  train_NxL, train_mask_NxL, val_NxL, val_mask_NxL, articles = _windows(config, base, seq_len)
  t = init(config, base)
  frozen = None if c.train_body else base.params

  def validate(state):
    trainable = state["trainable"]
    m = score_windows(base.graphdef, trainable.get("body", frozen), t.head_graphdef, trainable["head"], val_NxL,
                      val_mask_NxL, c.batch_size, c.chunk, fast_weights=bool(c.fast_weights))
    return {"val_nll": m["nll"], "val_ppl": m["ppl"], "val_static_ppl": m["static_ppl"], "val_tokens": m["tokens"]
            } | {f"eta/{g}": float(v) for g, v in step_sizes(trainable["head"]).items()}

  n_per_epoch = len(train_NxL) // c.batch_size

  def step_fn(state, carry, step, rng):
    del rng
    epoch, k = divmod(step, n_per_epoch)
    idx = _order(len(train_NxL), c.seed, epoch)[k * c.batch_size:(k + 1) * c.batch_size]
    trainable, opt_state, value = train_step(base.graphdef, state["trainable"], state["opt"], frozen,
                                             train_NxL[idx], train_mask_NxL[idx], head_graphdef=t.head_graphdef,
                                             chunk=c.chunk, optimizer=t.optimizer, fast=bool(c.fast_weights))
    return {"trainable": trainable, "opt": opt_state}, carry, {"loss": value}

  def plateaued(history) -> bool:
    return bool(c.patience) and loop.should_stop([h[BEST_METRIC] for h in history], c.patience)

  r = loop.run(loop.LoopConfig(JOB, c.steps, c.val_every, BEST_METRIC, log_every=c.val_every), t.state, step_fn,
               validate, workdir=workdir, writer=writer, rng=jax.random.key(c.seed), stop_fn=plateaued,
               progress=progress, desc="fwl train")
  results = {"history": r.history, "best": r.best, "best_step": r.best_step, "steps_run": r.steps_run,
             "fast_weights": bool(c.fast_weights), "seq_len": seq_len, "train_windows": len(train_NxL),
             "val_windows": len(val_NxL)} | articles
  return t.head_graphdef, r.state["trainable"], results


def no_trained(directory: str) -> checks.UserError:
  return checks.UserError(f"{directory}: no trained FWL head; run `python -m camels_jax.train` with an fwl "
                          f"config (jobs=fwl) and this workdir first")


def require_trained(workdir: str) -> None:
  """Raises `no_trained` unless <workdir>/fwl holds a trained head (before anything loads)."""
  loop.require_trained(os.path.join(workdir, JOB), no_trained)


def load_trained(config: ml_collections.ConfigDict, base, workdir: str):
  """(head_graphdef, trainable {"head", ["body"]}) of the best checkpoint of the fwl job in `workdir`."""
  t = init(config, base)
  return t.head_graphdef, loop.restore_best(os.path.join(workdir, JOB), t.state, no_trained)["trainable"]
