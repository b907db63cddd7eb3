"""Perplexity of a token sequence, static or with dynamic evaluation (online gradient steps on the text).

Dynamic evaluation (Krause et al. 2018, 2019; Rannen-Triki et al. 2024) reads a sequence in segments,
and for each segment: scores its tokens with the current parameters, then takes a gradient step on the
loss of exactly those tokens with the context they were scored with, so that every token is predicted by
a model that has only been trained on the tokens before it. Static evaluation is the same loop without
the steps (and equals dynamic evaluation with lr = 0).

Two ways of giving a segment its context (`context`):
  * "overlap": sliding windows of `window` tokens moved by `stride`. Each window is one forward from
    position 0; the first window scores all its tokens, every later one only its last `stride` (those no
    earlier window scored), so each token is scored once, with up to `window - 1` tokens of context.
    The context is recomputed with the current parameters at every window.
  * "xl": Transformer-XL-style non-overlapping chunks of `chunk` tokens. The keys and values of the last
    `memory` tokens are carried over in a KV cache, as computed when their chunk was scored (no
    recomputation; the memory is a constant of the gradient step: no gradient flows into it).
    Positions: Llama (RoPE) uses absolute positions in the sequence. Cached keys are stored rotated by
    the position they were computed at, and attention scores depend only on position differences, so
    the chunked forward equals one long forward pass for any sequence length (the angles are float32
    as in a long forward; only differences up to memory + chunk - 1 are ever used, within max_len).
    GPT-2 (learned absolute positions, at most max_len of them) cannot be consistent: a chunk's tokens
    take positions n_mem, ..., n_mem + chunk - 1 where n_mem is the number of tokens in the memory at
    that time. While the memory is filling up (the first memory + chunk tokens) these are the absolute
    positions, so the result equals a long forward; once it is full every chunk takes positions memory,
    ..., memory + chunk - 1 and the memory holds keys computed at those same positions, an approximation
    (the reason Transformer-XL uses relative positions).
    Attention sinks (`sinks` = s > 0): the first s tokens of the sequence stay in the cache for good, in slots
    of their own before the memory, so every chunk attends to them however far it is from the start (Xiao et
    al. 2023, StreamingLLM). Without them, SmolLM2 scores 3.07 against 2.63 nats on tokens 512-639 once the
    sequence's first tokens leave a 256-token memory (static, WikiText-2, chunk 256): it was trained with
    the first tokens always in view and dumps attention on them. A sink token is masked out of the memory
    slots while it is still there, so no token is seen twice. Llama, `sink_positions`:
      - "absolute": the sinks' keys stay rotated at their own positions 0..s-1, so XL with sinks equals one
        long forward pass in which token i attends to tokens 0..s-1 and to the memory + chunk before it
        (the tests check this past max_len). But a chunk's distance to the sinks grows with the text, past
        the distances the model was trained on.
      - "adjacent" (default; StreamingLLM's choice): the stored sink keys are rotated, for each chunk, to
        the positions just before the oldest memory token, so no distance exceeds s + memory + chunk.
    Measured on SmolLM2 (static, chunk 256 + memory 256, WikiText-2's last 7 articles): on their first
    12,288 tokens 43.36 without sinks, 22.68 with 4 absolute sinks (22.80 with 16), overlapping 512/256
    windows 22.03; on their first 16,384, absolute sinks 34.59 against overlap 19.47: past ~12k tokens the
    sinks are farther than SmolLM2's 8,192-token context and stop working. On all 14,163 tokens of the 7
    validation articles before them: overlap 23.72, no sinks 47.31, 4 absolute 28.41 (34.27 past token 8,192),
    4 adjacent 24.27, 16 adjacent 24.28. GPT-2 chunks take positions from
    min(start, s + memory), the same approximation as above.

Updates: every segment's loss is the mean NLL of the tokens it scores. With `update_every` = k the
gradients of k consecutive segments (each taken at the same, not yet updated, parameters) are averaged
(optax.MultiSteps) and then clipped (`grad_clip`, global norm) and applied: one optimizer step per k
segments. `params` = "full" trains every parameter (in at least float32, cast back to the model's
storage dtype for each forward); "lora" trains only LoRA adapters (camels_jax.adapt.lora) of rank
`lora_rank` and scale lora_alpha / lora_rank on the `lora_targets` projections of every block.

Optimizers: SGD, Adam, and "rms", the update of Krause et al. (2018, 2019):
    theta <- theta - lr * g / (rms + rms_eps * mean(rms)) + min(decay * rms / mean(rms), 1) * (theta_0 - theta)
where rms is each weight's root-mean-square gradient over `stat_segments` segments of training text
(`gradient_rms`, at the original weights theta_0, with the same segmentation) and mean(rms) its mean over
every weight: steps are normalised per weight by how much its gradient usually moves, and the weights that
move most decay fastest back to theta_0. At lr 0 and decay 0 it is static evaluation. Ours, not the paper's:
the cap at 1 (never past theta_0); one mean over all weights rather than per tensor; and an epsilon relative
to that mean where Krause et al.'s is absolute (2e-5 for their LSTMs). The statistics come from a few
thousand tokens, so the rows of SmolLM2's tied embedding for tokens absent from them have an RMS down to 4e-12
(median 5e-7 against a mean of 1.5e-4 over all weights): with an absolute epsilon of 1e-8 a validation
token's gradient there is 1e6 times its RMS, and every learning rate of the sweep diverged. With
rms_eps * mean(rms) added the largest ratio is ~900 on the embedding and ~100 elsewhere.

Every segment has a fixed shape (the last one is padded and masked), so each of the two step functions
(score only; score and update) compiles once per `evaluate` call. The update step is one jitted pure
function whose trainable params, optimizer state and KV cache are donated.
"""

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from camels_jax import checks
from camels_jax.adapt import lora
from camels_jax.models import transformer
from camels_jax.models.config import ModelConfig

CONTEXTS = ("overlap", "xl")
PARAMS = ("full", "lora")
OPTIMIZERS = ("sgd", "adam", "rms")


def dynamic_config() -> ml_collections.ConfigDict:
  """The `dynamic` section of a perplexity job: how the text is segmented, and the online updates."""
  return ml_collections.ConfigDict(dict(
      context="overlap",  # "overlap" (sliding windows, context recomputed) or "xl" (chunks + cached KV memory)
      window=512,  # overlap: tokens per window, >= 1 and <= the model's max_len
      stride=256,  # overlap: new tokens scored per window after the first, in [1, window]
      chunk=256,  # xl: tokens per chunk, >= 1; chunk + memory <= the model's max_len
      memory=256,  # xl: earlier tokens whose cached keys/values each chunk attends to, >= 0 (0 = none)
      sinks=0,  # xl: the sequence's first tokens, kept in the cache for every chunk, in [0, chunk]
      # xl sinks, Llama: "adjacent" rotates the sinks' keys to the positions just before the memory (StreamingLLM;
      # no distance exceeds sinks + memory + chunk); "absolute" keeps their own positions 0..sinks-1 (exactly a long
      # forward pass with a sink + sliding-window mask, but distances grow past the model's trained context).
      sink_positions="adjacent",
      update_every=1,  # segments (windows or chunks) per optimizer step, >= 1 (their gradients averaged)
      params="full",  # what is trained: "full" (every parameter) or "lora" (adapters only)
      lora_rank=8,  # lora: adapter rank, >= 1 and <= the narrowest targeted projection's width
      lora_alpha=16.0,  # lora: the update is (lora_alpha / lora_rank) * A @ B, > 0
      lora_targets="q,k,v,o",  # lora: comma-separated projections: q,k,v,o + gate,up,down (llama) or fc,proj (gpt2)
      lora_seed=0,  # lora: seed of the random A matrices, >= 0
      optimizer="adam",  # "sgd", "adam" (optax defaults) or "rms" (Krause et al.: RMS-normalised, with decay)
      # learning rate, >= 0 (0: no change, equals static evaluation); Adam 1e-4 is what the perplexity job's sweep
      # selected for SmolLM2 on WikiText-2 validation articles (overlap 512/256; README)
      lr=1e-4,
      decay=0.0,  # rms: pull towards the original weights per step (scaled by each weight's RMS), >= 0
      rms_eps=1.0,  # rms: rms_eps * mean(rms) is added to each weight's gradient RMS before dividing by it, > 0
      stat_segments=16,  # rms: segments of training text whose gradients give each weight's RMS, >= 1
      grad_clip=0.0,  # global-norm clip of each (averaged) gradient, >= 0 (0 = no clipping)
  ))


RULES = {
    "context": checks.one_of(*CONTEXTS),
    "window": checks.count,
    "stride": checks.count,
    "chunk": checks.count,
    "memory": checks.count_or_zero,
    "sinks": checks.count_or_zero,
    "sink_positions": checks.one_of("adjacent", "absolute"),
    "update_every": checks.count,
    "params": checks.one_of(*PARAMS),
    "lora_rank": checks.count,
    "lora_alpha": checks.positive,
    "lora_targets": checks.subset_of(*lora.TARGETS),
    "lora_seed": checks.seed,
    "optimizer": checks.one_of(*OPTIMIZERS),
    "lr": checks.non_negative,
    "decay": checks.non_negative,
    "rms_eps": checks.positive,
    "stat_segments": checks.count,
    "grad_clip": checks.non_negative,
}


def _stride_within_window(c, at=""):
  if c.context == "overlap" and c.stride > c.window:
    return [f"{at}stride={c.stride} must be <= {at}window={c.window}: windows moved by more than their length "
            f"would leave tokens unscored"]
  return []


def _sinks_within_chunk(c, at=""):
  if c.context == "xl" and c.sinks > c.chunk:
    return [f"{at}sinks={c.sinks} must be <= {at}chunk={c.chunk}: the sinks are copied from the first chunk"]
  return []


def _rms_trains_full_params(c, at=""):
  if c.optimizer == "rms" and c.params != "full":
    return [f"{at}optimizer='rms' needs {at}params='full': LoRA's B matrices start at zero, so the A matrices' "
            f"gradient RMS on training text is 0 and the normalised step would divide by it"]
  return []


# Constraints that need the model (max_len, projection widths) are in `model_violations`.
CROSS = [_stride_within_window, _sinks_within_chunk, _rms_trains_full_params]


def model_violations(c: ml_collections.ConfigDict, model_cfg: ModelConfig, at: str = "") -> list[str]:
  """What is wrong with section `c` for a model of `model_cfg` (keys named as f"{at}key")."""
  found = []
  if c.context == "overlap" and c.window > model_cfg.max_len:
    found.append(f"{at}window={c.window} exceeds the model's max_len={model_cfg.max_len}")
  if c.context == "xl" and c.chunk + c.memory + c.sinks > model_cfg.max_len:
    found.append(f"{at}chunk={c.chunk} + {at}memory={c.memory} + {at}sinks={c.sinks} = "
                 f"{c.chunk + c.memory + c.sinks} exceeds the model's max_len={model_cfg.max_len} (a chunk "
                 f"attends to up to that many tokens)")
  if c.params == "lora":
    found.extend(lora.violations(model_cfg, c.lora_targets, c.lora_rank, at))
  return found


def check_model(c: ml_collections.ConfigDict, model_cfg: ModelConfig, at: str = "dynamic.") -> None:
  """Raises one ConfigError listing every problem of section `c` with a model of `model_cfg`."""
  found = model_violations(c, model_cfg, at)
  if found:
    raise checks.ConfigError(f"config: {len(found)} invalid field(s) for this model: " + "; ".join(found))


# ------------------------------------------------------------------------------------------------
# Segments.


@dataclasses.dataclass(frozen=True)
class Segment:
  """ids[start : start + length] are fed; they predict ids[start + 1 : start + length + 1], of which
  those from offset `first` on are scored."""

  start: int
  length: int
  first: int


def segments(n: int, c: ml_collections.ConfigDict) -> Iterator[Segment]:
  """The segments of a sequence of `n` tokens: every token but the first is scored exactly once."""
  if c.context == "xl":
    for start in range(0, n - 1, c.chunk):
      yield Segment(start, min(c.chunk, n - 1 - start), 0)
    return
  done, start = 0, 0  # done: index of the last token scored so far
  while done < n - 1:
    length = min(c.window, n - 1 - start)
    yield Segment(start, length, done - start)
    done, start = start + length, start + c.stride


def num_segments(n: int, c: ml_collections.ConfigDict) -> int:
  if c.context == "xl":
    return math.ceil((n - 1) / c.chunk)
  return 1 + max(0, math.ceil((n - 1 - c.window) / c.stride))


def _batch(ids: np.ndarray, seg: Segment, c, model_cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The segment's arrays, padded to the fixed segment length L."""
  size = c.window if c.context == "overlap" else c.chunk
  end = seg.start + seg.length
  tokens, labels = np.zeros(size, np.int32), np.zeros(size, np.int32)
  tokens[:seg.length], labels[:seg.length] = ids[seg.start:end], ids[seg.start + 1:end + 1]
  mask = (np.arange(size) < seg.length).astype(np.int32)
  score = ((np.arange(size) >= seg.first) & (mask > 0)).astype(np.float32)
  if c.context == "xl" and model_cfg.arch == "gpt2":
    pos = min(seg.start, c.sinks + c.memory) + np.arange(size, dtype=np.int32)  # see the module docstring
  elif c.context == "xl":
    pos = seg.start + np.arange(size, dtype=np.int32)
  else:
    pos = np.arange(size, dtype=np.int32)
  return {"tokens": tokens, "labels": labels, "mask": mask, "score": score, "pos": pos,
          "start": np.int32(seg.start)}


# ------------------------------------------------------------------------------------------------
# Pure step functions.


def _forward(graphdef, params, batch, cache, *, context: str, chunk: int, memory: int, sinks: int = 0,
             sink_theta: float | None = None):
  """Per-position NLL of the segment's labels (nll_L) and the cache for the next chunk ("xl"). `sink_theta`: the
  RoPE base with which the sinks' keys are moved to sit just before the memory ("adjacent"), None to leave them."""
  tokens_1xL, mask_1xL = batch["tokens"][None], batch["mask"][None]
  if context == "overlap":
    logits_1xLxV = transformer.apply(graphdef, params, tokens_1xL, mask_1xL)
    new_cache = None
  else:
    if sink_theta is not None:
      # Stored at their own positions 0..sinks-1; rotating by `shift` moves them to shift..shift+sinks-1, the
      # positions just before the oldest memory token (RoPE: R(a) R(b) = R(a + b)). Restored after the step.
      stored = cache.k_NxBxSxKxE[:, :, :sinks]
      shift = jnp.maximum(batch["start"] - memory - sinks, 0)
      n, b, s, k, e = stored.shape
      moved = transformer.rope(stored.reshape(n * b, s, k, e), jnp.full((n * b, s), shift), sink_theta)
      cache = cache._replace(k_NxBxSxKxE=cache.k_NxBxSxKxE.at[:, :, :sinks].set(moved.reshape(stored.shape)))
    logits_1xLxV, cache = transformer.decode_step(graphdef, params, tokens_1xL, batch["pos"][None], mask_1xL,
                                                  cache)
    if sink_theta is not None:
      cache = cache._replace(k_NxBxSxKxE=cache.k_NxBxSxKxE.at[:, :, :sinks].set(stored))
    new_cache = _slide(cache, batch["start"], chunk=chunk, memory=memory, sinks=sinks)
  logp_LxV = jax.nn.log_softmax(transformer.upcast(logits_1xLxV[0]), axis=-1)
  nll_L = -jnp.take_along_axis(logp_LxV, batch["labels"][:, None], axis=-1)[:, 0]
  return nll_L, new_cache


def _slide(cache: transformer.KVCache, start, *, chunk: int, memory: int, sinks: int) -> transformer.KVCache:
  """The cache after the chunk starting at token `start`, for the next chunk.

  Slots: [0, sinks) the sinks, [sinks, sinks + memory) the memory (oldest first), then the chunk, which
  `decode_step` wrote at index = sinks + memory and attended causally; a slot is visible where its mask is
  1. Every slot after the sinks moves `chunk` to the left, so the last `memory` tokens become the memory
  (the chunk slots, holding stale values, are overwritten, mask included, by the next chunk). The first
  chunk's first `sinks` tokens are copied into the sink slots, and a memory slot holding one of them is
  masked (it is already visible as a sink).
  """
  def move(x, axis):
    kept, rest = jnp.split(x, [sinks], axis=axis)
    rest = jnp.roll(rest, -chunk, axis=axis)
    if sinks:
      first = jax.lax.slice_in_dim(x, sinks + memory, 2 * sinks + memory, axis=axis)
      kept = jnp.where(start == 0, first, kept)
    return jnp.concatenate([kept, rest], axis=axis)

  mask_BxS = move(cache.mask_BxS, 1)
  if sinks:
    token_of_slot_M = start + chunk - memory + jnp.arange(memory)
    mask_BxS = mask_BxS.at[:, sinks:sinks + memory].multiply((token_of_slot_M >= sinks).astype(mask_BxS.dtype))
  return transformer.KVCache(move(cache.k_NxBxSxKxE, 2), move(cache.v_NxBxSxKxE, 2), mask_BxS,
                             jnp.asarray(sinks + memory, jnp.int32))


def _score_step(params, cache, batch, *, graphdef, forward):
  nll_L, cache = forward(graphdef, params, batch, cache)
  return nll_L, cache


def _loss_and_grad(trainable, cache, batch, frozen, *, graphdef, forward, build: Callable):
  def loss_fn(trainable):
    nll_L, new_cache = forward(graphdef, build(frozen, trainable), batch, cache)
    w_L = batch["score"]
    return (nll_L * w_L).sum() / jnp.maximum(w_L.sum(), 1.0), (nll_L, new_cache)

  (_, (nll_L, new_cache)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  return grads, nll_L, new_cache


def _update_step(trainable, opt_state, cache, batch, frozen, *, graphdef, forward, build: Callable,
                 optimizer: optax.GradientTransformation):
  """Scores the segment with the current params, then one (accumulating) optimizer step on its loss."""
  grads, nll_L, new_cache = _loss_and_grad(trainable, cache, batch, frozen, graphdef=graphdef, forward=forward,
                                           build=build)
  updates, opt_state = optimizer.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, new_cache, nll_L


def _square_step(sum_sq, cache, batch, trainable, frozen, *, graphdef, forward, build: Callable):
  grads, _, new_cache = _loss_and_grad(trainable, cache, batch, frozen, graphdef=graphdef, forward=forward,
                                       build=build)
  return jax.tree.map(lambda s, g: s + jnp.square(g), sum_sq, grads), new_cache


class RmsDecayState(NamedTuple):
  lr: jax.Array  # a state array, not a constant of the step: every lr of a sweep runs one compiled step
  theta0: optax.Params  # the weights dynamic evaluation started from
  step_scale: optax.Params  # 1 / (rms + eps * mean(rms))
  pull: optax.Params  # min(decay * rms / mean(rms), 1)


def rms_decay(lr: float, decay: float, rms, eps: float = 1.0) -> optax.GradientTransformation:
  """Krause et al.'s RMS-normalised step with decay towards the starting weights (module docstring);
  `rms`: each trainable weight's gradient RMS on training text (`gradient_rms`)."""

  def init(params):
    leaves = jax.tree.leaves(rms)
    mean = sum(jnp.sum(x) for x in leaves) / sum(x.size for x in leaves)
    return RmsDecayState(lr=jnp.asarray(lr, jnp.float32), theta0=jax.tree.map(jnp.copy, params),
                         step_scale=jax.tree.map(lambda r: 1.0 / (r + eps * mean), rms),
                         pull=jax.tree.map(lambda r: jnp.minimum(decay * r / mean, 1.0), rms))

  def update(grads, state, params):
    if params is None:
      raise ValueError("rms_decay needs the params (its decay pulls them towards their starting values)")
    updates = jax.tree.map(lambda g, s, p, t0, x: -state.lr * g * s + p * (t0 - x), grads, state.step_scale,
                           state.pull, state.theta0, params)
    return updates, state

  return optax.GradientTransformation(init, update)


def make_optimizer(c: ml_collections.ConfigDict, rms=None) -> optax.GradientTransformation:
  """sgd/adam/rms at lr, after a global-norm clip (grad_clip > 0), on gradients averaged over update_every;
  "rms" needs the trainable weights' gradient RMS (`gradient_rms`)."""
  if c.optimizer == "rms":
    if rms is None:
      raise ValueError("optimizer 'rms' needs the gradient RMS of the weights (dynamic_eval.gradient_rms)")
    opt = rms_decay(c.lr, c.decay, rms, c.rms_eps)
  else:
    # The lr lives in the optimizer state (inject_hyperparams), so the compiled step is the same for every lr
    # and a sweep compiles it once (the persistent compilation cache serves the rest).
    opt = optax.inject_hyperparams(optax.sgd if c.optimizer == "sgd" else optax.adam)(learning_rate=c.lr)
  if c.grad_clip > 0:
    opt = optax.chain(optax.clip_by_global_norm(c.grad_clip), opt)
  if c.update_every > 1:
    opt = optax.MultiSteps(opt, every_k_schedule=c.update_every)
  return opt


def _trainable(params, c):
  """(frozen, trainable, build): build(frozen, trainable) -> the params of the forward."""
  if c.params == "lora":
    adapters = lora.lora_init(params, c.lora_targets, c.lora_rank, c.lora_seed)
    s = lora.scale(c.lora_alpha, c.lora_rank)
    return params, adapters, lambda frozen, a: lora.merge(frozen, a, s)
  # A fresh copy (it is donated to the step), in at least float32 so small steps are not rounded away.
  leaves, treedef = jax.tree.flatten(params)
  dtypes = [x.dtype for x in leaves]
  master = jax.tree.unflatten(treedef, [
      jnp.array(x, dtype=jnp.promote_types(x.dtype, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
                else x.dtype, copy=True) for x in leaves])

  def build(_, trainable):
    return jax.tree.unflatten(treedef, [x.astype(d) for x, d in zip(jax.tree.leaves(trainable), dtypes)])

  return None, master, build


@dataclasses.dataclass
class Scored:
  nll_T: np.ndarray  # nll_T[t - 1] = -log p(ids[t] | ids[:t]) as scored, for t = 1 .. len(ids) - 1
  updates: int  # optimizer steps taken
  trainable: object  # the final trained params or adapters (None for static evaluation)


def _checked(ids, c, cfg) -> np.ndarray:
  checks.validate_section("dynamic", c, RULES, CROSS)
  check_model(c, cfg)
  ids = np.asarray(ids, np.int32)
  if len(ids) < 2:
    raise ValueError(f"dynamic_eval: {len(ids)} token(s): at least 2 are needed to score one")
  return ids


def _empty_cache(cfg: ModelConfig, c) -> transformer.KVCache | None:
  if c.context != "xl":
    return None
  size = c.sinks + c.memory + c.chunk
  return transformer.empty_cache(cfg, 1, size)._replace(index=jnp.asarray(c.sinks + c.memory, jnp.int32))


def _segment_forward(c, cfg: ModelConfig):
  adjacent = c.context == "xl" and c.sinks and c.sink_positions == "adjacent" and cfg.arch == "llama"
  return functools.partial(_forward, context=c.context, chunk=c.chunk, memory=c.memory, sinks=c.sinks,
                           sink_theta=cfg.rope_theta if adjacent else None)


def gradient_rms(graphdef: nnx.GraphDef, params, cfg: ModelConfig, ids: Sequence[int], c: ml_collections.ConfigDict,
                 progress: bool = False):
  """Each trainable weight's root-mean-square gradient of the segment loss over the first `c.stat_segments`
  segments of `ids` (training text), at `params`, segmented as `c` says: optimizer "rms"'s statistics."""
  ids = _checked(ids, c, cfg)
  frozen, trainable, build = _trainable(params, c)
  step = jax.jit(functools.partial(_square_step, graphdef=graphdef, forward=_segment_forward(c, cfg), build=build),
                 donate_argnums=(0, 1))
  sum_sq = jax.tree.map(jnp.zeros_like, trainable)
  cache, count = _empty_cache(cfg, c), 0
  segs = list(itertools.islice(segments(len(ids), c), c.stat_segments))
  for seg in tqdm.tqdm(segs, desc="gradient RMS", disable=not progress):
    sum_sq, cache = step(sum_sq, cache, _batch(ids, seg, c, cfg), trainable, frozen)
    count += 1
  return jax.tree.map(lambda s: jnp.sqrt(s / count), sum_sq)


def score(graphdef: nnx.GraphDef, params, cfg: ModelConfig, ids: Sequence[int], c: ml_collections.ConfigDict, *,
          dynamic: bool, progress: bool = False, rms=None) -> Scored:
  """Per-token NLLs of `ids` (every token but the first) under section `c`; `params` is never modified.
  `rms`: optimizer "rms"'s statistics (`gradient_rms` on training text)."""
  ids = _checked(ids, c, cfg)
  n = len(ids)
  forward = _segment_forward(c, cfg)
  cache = _empty_cache(cfg, c)

  if dynamic:
    frozen, trainable, build = _trainable(params, c)
    optimizer = make_optimizer(c, rms)
    opt_state = optimizer.init(trainable)
    step = jax.jit(functools.partial(_update_step, graphdef=graphdef, forward=forward, build=build,
                                     optimizer=optimizer), donate_argnums=(0, 1, 2))
  else:
    step = jax.jit(functools.partial(_score_step, graphdef=graphdef, forward=forward), donate_argnums=(1,))
    trainable = None

  nll_T = np.full(n - 1, np.nan, np.float64)
  pending = []  # (segment, device nll_L): read back at the end, so the host never waits on a step
  count = 0
  for seg in tqdm.tqdm(segments(n, c), total=num_segments(n, c), desc="dynamic eval" if dynamic else "static eval",
                       disable=not progress):
    batch = _batch(ids, seg, c, cfg)
    if dynamic:
      trainable, opt_state, cache, nll_L = step(trainable, opt_state, cache, batch, frozen)
    else:
      nll_L, cache = step(params, cache, batch)
    pending.append((seg, nll_L))
    count += 1
  scored_T = np.zeros(n - 1, bool)  # coverage, apart from the values: a diverged run's NLLs are NaN or inf
  for seg, nll_L in pending:
    nll_T[seg.start + seg.first:seg.start + seg.length] = np.asarray(nll_L)[seg.first:seg.length]
    scored_T[seg.start + seg.first:seg.start + seg.length] = True
  assert scored_T.all(), "a token was left unscored"
  return Scored(nll_T, count // c.update_every if dynamic else 0, trainable)


def perplexity(nll: float) -> float:
  """exp(nll); inf for a diverged run (exp overflows past 709) rather than an OverflowError, nan for nan."""
  return math.inf if nll > 709 else math.exp(nll)


def evaluate(graphdef: nnx.GraphDef, params, cfg: ModelConfig, ids: Sequence[int], c: ml_collections.ConfigDict,
             *, dynamic: bool, progress: bool = True, rms=None) -> dict:
  """{"nll", "ppl", "tokens", "time_s", "updates"}: mean NLL and perplexity of every token of `ids` but the
  first, static or with dynamic evaluation under section `c` (`dynamic_config()`)."""
  t0 = time.perf_counter()
  s = score(graphdef, params, cfg, ids, c, dynamic=dynamic, progress=progress, rms=rms)
  nll = float(s.nll_T.mean())
  return {"nll": nll, "ppl": perplexity(nll), "tokens": int(s.nll_T.size), "time_s": time.perf_counter() - t0,
          "updates": s.updates}
