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
    Measured on SmolLM2 (static, 1,024 WikiText-2 tokens, chunk 256 + memory 256): identical per-token
    NLLs to overlapping 512/256 windows while the memory fills (the first 512 tokens), then worse (3.07
    vs 2.63 nats on tokens 512-639): once the sequence's first tokens leave the memory, the model loses
    the "attention sink" it was trained with (Xiao et al. 2023, StreamingLLM), which every fresh overlap
    window has. Keeping the first tokens in the memory would need keys stored before rotation; not done.

Updates: every segment's loss is the mean NLL of the tokens it scores. With `update_every` = k the
gradients of k consecutive segments (each taken at the same, not yet updated, parameters) are averaged
(optax.MultiSteps) and then clipped (`grad_clip`, global norm) and applied: one optimizer step per k
segments. `params` = "full" trains every parameter (in at least float32, cast back to the model's
storage dtype for each forward); "lora" trains only LoRA adapters (camels_jax.adapt.lora) of rank
`lora_rank` and scale lora_alpha / lora_rank on the `lora_targets` projections of every block.

Every segment has a fixed shape (the last one is padded and masked), so each of the two step functions
(score only; score and update) compiles once per `evaluate` call. The update step is one jitted pure
function whose trainable params, optimizer state and KV cache are donated.
"""

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence

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
OPTIMIZERS = ("sgd", "adam")


def dynamic_config() -> ml_collections.ConfigDict:
  """The `dynamic` section of a perplexity job: how the text is segmented, and the online updates."""
  return ml_collections.ConfigDict(dict(
      context="overlap",  # "overlap" (sliding windows, context recomputed) or "xl" (chunks + cached KV memory)
      window=512,  # overlap: tokens per window, >= 1 and <= the model's max_len
      stride=256,  # overlap: new tokens scored per window after the first, in [1, window]
      chunk=256,  # xl: tokens per chunk, >= 1; chunk + memory <= the model's max_len
      memory=256,  # xl: earlier tokens whose cached keys/values each chunk attends to, >= 0 (0 = none)
      update_every=1,  # segments (windows or chunks) per optimizer step, >= 1 (their gradients averaged)
      params="full",  # what is trained: "full" (every parameter) or "lora" (adapters only)
      lora_rank=8,  # lora: adapter rank, >= 1 and <= the narrowest targeted projection's width
      lora_alpha=16.0,  # lora: the update is (lora_alpha / lora_rank) * A @ B, > 0
      lora_targets="q,k,v,o",  # lora: comma-separated projections: q,k,v,o + gate,up,down (llama) or fc,proj (gpt2)
      lora_seed=0,  # lora: seed of the random A matrices, >= 0
      optimizer="adam",  # "sgd" or "adam" (optax defaults: b1 0.9, b2 0.999, eps 1e-8)
      lr=1e-5,  # learning rate, >= 0 (0: no change, equals static evaluation)
      grad_clip=0.0,  # global-norm clip of each (averaged) gradient, >= 0 (0 = no clipping)
  ))


RULES = {
    "context": checks.one_of(*CONTEXTS),
    "window": checks.count,
    "stride": checks.count,
    "chunk": checks.count,
    "memory": checks.count_or_zero,
    "update_every": checks.count,
    "params": checks.one_of(*PARAMS),
    "lora_rank": checks.count,
    "lora_alpha": checks.positive,
    "lora_targets": checks.subset_of(*lora.TARGETS),
    "lora_seed": checks.seed,
    "optimizer": checks.one_of(*OPTIMIZERS),
    "lr": checks.non_negative,
    "grad_clip": checks.non_negative,
}


def _stride_within_window(c, at=""):
  if c.context == "overlap" and c.stride > c.window:
    return [f"{at}stride={c.stride} must be <= {at}window={c.window}: windows moved by more than their length "
            f"would leave tokens unscored"]
  return []


# Constraints that need the model (max_len, projection widths) are in `model_violations`.
CROSS = [_stride_within_window]


def model_violations(c: ml_collections.ConfigDict, model_cfg: ModelConfig, at: str = "") -> list[str]:
  """What is wrong with section `c` for a model of `model_cfg` (keys named as f"{at}key")."""
  found = []
  if c.context == "overlap" and c.window > model_cfg.max_len:
    found.append(f"{at}window={c.window} exceeds the model's max_len={model_cfg.max_len}")
  if c.context == "xl" and c.chunk + c.memory > model_cfg.max_len:
    found.append(f"{at}chunk={c.chunk} + {at}memory={c.memory} = {c.chunk + c.memory} exceeds the model's "
                 f"max_len={model_cfg.max_len} (a chunk attends to up to chunk + memory tokens)")
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
    pos = min(seg.start, c.memory) + np.arange(size, dtype=np.int32)  # see the module docstring
  elif c.context == "xl":
    pos = seg.start + np.arange(size, dtype=np.int32)
  else:
    pos = np.arange(size, dtype=np.int32)
  return {"tokens": tokens, "labels": labels, "mask": mask, "score": score, "pos": pos}


# ------------------------------------------------------------------------------------------------
# Pure step functions.


def _forward(graphdef, params, batch, cache, *, context: str, chunk: int, memory: int):
  """Per-position NLL of the segment's labels (nll_L) and the memory for the next chunk ("xl")."""
  tokens_1xL, mask_1xL = batch["tokens"][None], batch["mask"][None]
  if context == "overlap":
    logits_1xLxV = transformer.apply(graphdef, params, tokens_1xL, mask_1xL)
    new_cache = None
  else:
    # Cache slots [0, memory) hold the memory (oldest first), [memory, memory + chunk) the chunk, which
    # `decode_step` writes at index = memory and attends causally; the memory is visible wherever its
    # mask is 1. Then every slot moves `chunk` to the left: the last `memory` tokens become the memory
    # (the chunk slots, holding stale values, are overwritten, mask included, by the next chunk).
    logits_1xLxV, cache = transformer.decode_step(graphdef, params, tokens_1xL, batch["pos"][None], mask_1xL,
                                                  cache)
    new_cache = transformer.KVCache(jnp.roll(cache.k_NxBxSxKxE, -chunk, axis=2),
                                    jnp.roll(cache.v_NxBxSxKxE, -chunk, axis=2),
                                    jnp.roll(cache.mask_BxS, -chunk, axis=1), jnp.asarray(memory, jnp.int32))
  logp_LxV = jax.nn.log_softmax(transformer.upcast(logits_1xLxV[0]), axis=-1)
  nll_L = -jnp.take_along_axis(logp_LxV, batch["labels"][:, None], axis=-1)[:, 0]
  return nll_L, new_cache


def _score_step(params, cache, batch, *, graphdef, forward):
  nll_L, cache = forward(graphdef, params, batch, cache)
  return nll_L, cache


def _update_step(trainable, opt_state, cache, batch, frozen, *, graphdef, forward, build: Callable,
                 optimizer: optax.GradientTransformation):
  """Scores the segment with the current params, then one (accumulating) optimizer step on its loss."""

  def loss_fn(trainable):
    nll_L, new_cache = forward(graphdef, build(frozen, trainable), batch, cache)
    w_L = batch["score"]
    return (nll_L * w_L).sum() / jnp.maximum(w_L.sum(), 1.0), (nll_L, new_cache)

  (_, (nll_L, new_cache)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  updates, opt_state = optimizer.update(grads, opt_state, trainable)
  return optax.apply_updates(trainable, updates), opt_state, new_cache, nll_L


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """sgd/adam at lr, after a global-norm clip (grad_clip > 0), on gradients averaged over update_every."""
  opt = optax.sgd(c.lr) if c.optimizer == "sgd" else optax.adam(c.lr)
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


def score(graphdef: nnx.GraphDef, params, cfg: ModelConfig, ids: Sequence[int], c: ml_collections.ConfigDict, *,
          dynamic: bool, progress: bool = False) -> Scored:
  """Per-token NLLs of `ids` (every token but the first) under section `c`; `params` is never modified."""
  checks.validate_section("dynamic", c, RULES, CROSS)
  check_model(c, cfg)
  ids = np.asarray(ids, np.int32)
  n = len(ids)
  if n < 2:
    raise ValueError(f"dynamic_eval: {n} token(s): at least 2 are needed to score one")
  forward = functools.partial(_forward, context=c.context, chunk=c.chunk, memory=c.memory)
  cache = None
  if c.context == "xl":
    cache = transformer.empty_cache(cfg, 1, c.memory + c.chunk)._replace(index=jnp.asarray(c.memory, jnp.int32))

  if dynamic:
    frozen, trainable, build = _trainable(params, c)
    optimizer = make_optimizer(c)
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
  for seg, nll_L in pending:
    nll_T[seg.start + seg.first:seg.start + seg.length] = np.asarray(nll_L)[seg.first:seg.length]
  assert not np.isnan(nll_T).any(), "a token was left unscored"
  return Scored(nll_T, count // c.update_every if dynamic else 0, trainable)


def evaluate(graphdef: nnx.GraphDef, params, cfg: ModelConfig, ids: Sequence[int], c: ml_collections.ConfigDict,
             *, dynamic: bool, progress: bool = True) -> dict:
  """{"nll", "ppl", "tokens", "time_s", "updates"}: mean NLL and perplexity of every token of `ids` but the
  first, static or with dynamic evaluation under section `c` (`dynamic_config()`)."""
  t0 = time.perf_counter()
  s = score(graphdef, params, cfg, ids, c, dynamic=dynamic, progress=progress)
  nll = float(s.nll_T.mean())
  return {"nll": nll, "ppl": math.exp(nll), "tokens": int(s.nll_T.size), "time_s": time.perf_counter() - t0,
          "updates": s.updates}
