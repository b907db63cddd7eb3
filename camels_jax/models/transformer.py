"""Decoder-only transformer (GPT-2 and Llama families) as Flax NNX modules, plus its functional core.

The modules are only ever driven functionally: `init` splits a model once into a graphdef and a params
pytree, and `apply` / `hidden` / `decode_step` merge them inside pure functions, so `jax.grad`,
`jax.jit` and `lax.scan` see nothing but arrays.

Shapes: B batch, L query length, S key length (cache size), D d_model, H query heads, K kv heads,
G = H // K query heads per kv head, E head dim, F MLP width, V vocabulary.
"""

import inspect
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from camels_jax.models.config import ModelConfig

Params = nnx.State
_MASKED = -1e30  # finite, so a query with no visible key gets a uniform (not NaN) softmax


class KVCache(NamedTuple):
  """Keys and values of every layer, written in place at `index` as decoding proceeds."""

  k_NxBxSxKxE: jax.Array  # N = n_layers
  v_NxBxSxKxE: jax.Array
  mask_BxS: jax.Array  # 1 where the slot holds a real (non-padding) token
  index: jax.Array  # scalar int32: the next slot to write


class Prefix(NamedTuple):
  """Keys and values of every layer that every query attends to in a softmax of its own (`Attention`).

  A frozen model conditioned on P vectors per layer (MAC's modulation): a prefix with zero values leaves
  the model's outputs exactly unchanged, whatever its keys.
  """

  k_NxBxPxKxE: jax.Array  # N = n_layers; no rotary embedding: prefix slots have no position
  v_NxBxPxKxE: jax.Array


# Logical axis names of the parameters (nnx sharding metadata; the stacked blocks add LAYERS in front):
# `sharding.param_shardings` maps them to mesh axes, so no job says how a model is split.
VOCAB_AXIS, EMBED_AXIS, HEADS_AXIS, MLP_AXIS, POS_AXIS, LAYERS_AXIS = "vocab", "embed", "heads", "mlp", "pos", "layers"


def _default(cls, name: str):
  """Flax's own default initializer of `cls`'s argument `name`, so annotating it changes no value."""
  return inspect.signature(cls.__init__).parameters[name].default


def _named(cls, name: str, axes: tuple[str, ...]):
  return nnx.with_partitioning(_default(cls, name), axes)


def _linear(cfg: ModelConfig, d_in: int, d_out: int, rngs: nnx.Rngs, axes: tuple[str, str]) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=cfg.arch == "gpt2", dtype=cfg.compute_dtype,
                    param_dtype=cfg.storage_dtype, kernel_init=_named(nnx.Linear, "kernel_init", axes),
                    bias_init=_named(nnx.Linear, "bias_init", axes[1:]), rngs=rngs)


def _norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
  if cfg.arch == "gpt2":
    return nnx.LayerNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=cfg.compute_dtype,
                         param_dtype=cfg.storage_dtype, scale_init=_named(nnx.LayerNorm, "scale_init", (EMBED_AXIS,)),
                         bias_init=_named(nnx.LayerNorm, "bias_init", (EMBED_AXIS,)), rngs=rngs)
  return nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=cfg.compute_dtype,
                     param_dtype=cfg.storage_dtype, scale_init=_named(nnx.RMSNorm, "scale_init", (EMBED_AXIS,)),
                     rngs=rngs)


def _embed(cfg: ModelConfig, n: int, axis: str, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(n, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.storage_dtype,
                   embedding_init=_named(nnx.Embed, "embedding_init", (axis, EMBED_AXIS)), rngs=rngs)


def upcast(x: jax.Array) -> jax.Array:
  """At least float32: softmaxes and norms of bfloat16 models run in float32, float64 stays float64."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def rope(x_BxLxHxE: jax.Array, pos_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the "rotate half" layout used by Hugging Face Llama checkpoints."""
  e = x_BxLxHxE.shape[-1]
  x_up = upcast(x_BxLxHxE)
  inv_freq = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=x_up.dtype) / e))
  ang_BxLxE2 = pos_BxL.astype(x_up.dtype)[..., None] * inv_freq
  ang_BxLx1xE = jnp.concatenate([ang_BxLxE2, ang_BxLxE2], axis=-1)[:, :, None, :]
  x1, x2 = jnp.split(x_up, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  out = x_up * jnp.cos(ang_BxLx1xE) + rotated * jnp.sin(ang_BxLx1xE)
  return out.astype(x_BxLxHxE.dtype)


class Attention(nnx.Module):
  """Causal multi-head attention with grouped-query heads and an optional KV cache."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    e = cfg.head_dim
    self.q = _linear(cfg, cfg.d_model, cfg.n_heads * e, rngs, (EMBED_AXIS, HEADS_AXIS))
    self.k = _linear(cfg, cfg.d_model, cfg.n_kv_heads * e, rngs, (EMBED_AXIS, HEADS_AXIS))
    self.v = _linear(cfg, cfg.d_model, cfg.n_kv_heads * e, rngs, (EMBED_AXIS, HEADS_AXIS))
    self.o = _linear(cfg, cfg.n_heads * e, cfg.d_model, rngs, (HEADS_AXIS, EMBED_AXIS))

  def __call__(self, x_BxLxD, pos_BxL, kvmask_BxS, kv_cache=None, index=None, prefix=None):
    cfg = self.cfg
    b, l, _ = x_BxLxD.shape
    k_heads, e = cfg.n_kv_heads, cfg.head_dim
    g = cfg.n_heads // k_heads
    q_BxLxHxE = self.q(x_BxLxD).reshape(b, l, cfg.n_heads, e)
    k_BxLxKxE = self.k(x_BxLxD).reshape(b, l, k_heads, e)
    v_BxLxKxE = self.v(x_BxLxD).reshape(b, l, k_heads, e)
    if cfg.arch == "llama":
      q_BxLxHxE = rope(q_BxLxHxE, pos_BxL, cfg.rope_theta)
      k_BxLxKxE = rope(k_BxLxKxE, pos_BxL, cfg.rope_theta)

    if kv_cache is None:
      keys, values, new_cache = k_BxLxKxE, v_BxLxKxE, None
      q_idx_L = jnp.arange(l)
    else:
      k_cache, v_cache = kv_cache
      keys = jax.lax.dynamic_update_slice(k_cache, k_BxLxKxE.astype(k_cache.dtype), (0, index, 0, 0))
      values = jax.lax.dynamic_update_slice(v_cache, v_BxLxKxE.astype(v_cache.dtype), (0, index, 0, 0))
      new_cache = (keys, values)
      q_idx_L = index + jnp.arange(l)
    s = keys.shape[1]
    visible_BxLxS = (jnp.arange(s)[None, None, :] <= q_idx_L[None, :, None]) & (
        kvmask_BxS[:, None, :] > 0)

    q_BxLxKxGxE = q_BxLxHxE.reshape(b, l, k_heads, g, e)
    scores_BxKxGxLxS = jnp.einsum("blkge,bske->bkgls", q_BxLxKxGxE, keys.astype(q_BxLxKxGxE.dtype))
    scores_BxKxGxLxS = upcast(scores_BxKxGxLxS) / math.sqrt(e)
    # An additive bias rather than a select: its backward is the identity, so the layer scan stores
    # no per-layer mask residual.
    bias_BxLxS = jnp.where(visible_BxLxS, 0.0, _MASKED).astype(scores_BxKxGxLxS.dtype)
    scores_BxKxGxLxS = scores_BxKxGxLxS + bias_BxLxS[:, None, None]
    probs = jax.nn.softmax(scores_BxKxGxLxS, axis=-1).astype(cfg.compute_dtype)
    out_BxLxKxGxE = jnp.einsum("bkgls,bske->blkge", probs, values.astype(cfg.compute_dtype))
    if prefix is not None:
      # A separate softmax over the prefix slots, added to the attention output (zero-init attention of
      # LLaMA-Adapter rather than P-tuning v2's joint softmax): the model's own attention pattern is never
      # diluted, and zero prefix values are exactly the unconditioned model.
      pk_BxPxKxE, pv_BxPxKxE = prefix
      pscores_BxKxGxLxP = jnp.einsum("blkge,bpke->bkglp", q_BxLxKxGxE, pk_BxPxKxE.astype(q_BxLxKxGxE.dtype))
      pprobs = jax.nn.softmax(upcast(pscores_BxKxGxLxP) / math.sqrt(e), axis=-1).astype(cfg.compute_dtype)
      out_BxLxKxGxE = out_BxLxKxGxE + jnp.einsum("bkglp,bpke->blkge", pprobs, pv_BxPxKxE.astype(cfg.compute_dtype))
    return self.o(out_BxLxKxGxE.reshape(b, l, cfg.n_heads * e)), new_cache


class MLP(nnx.Module):
  """tanh-GELU MLP (GPT-2) or SwiGLU (Llama)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.arch = cfg.arch
    if cfg.arch == "gpt2":
      self.fc = _linear(cfg, cfg.d_model, cfg.d_ff, rngs, (EMBED_AXIS, MLP_AXIS))
      self.proj = _linear(cfg, cfg.d_ff, cfg.d_model, rngs, (MLP_AXIS, EMBED_AXIS))
    else:
      self.gate = _linear(cfg, cfg.d_model, cfg.d_ff, rngs, (EMBED_AXIS, MLP_AXIS))
      self.up = _linear(cfg, cfg.d_model, cfg.d_ff, rngs, (EMBED_AXIS, MLP_AXIS))
      self.down = _linear(cfg, cfg.d_ff, cfg.d_model, rngs, (MLP_AXIS, EMBED_AXIS))

  def __call__(self, x_BxLxD):
    if self.arch == "gpt2":
      return self.proj(jax.nn.gelu(self.fc(x_BxLxD), approximate=True))
    return self.down(jax.nn.silu(self.gate(x_BxLxD)) * self.up(x_BxLxD))


class Block(nnx.Module):
  """Pre-norm residual block."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.ln1 = _norm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.ln2 = _norm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x_BxLxD, pos_BxL, kvmask_BxS, kv_cache=None, index=None, prefix=None):
    h_BxLxD, kv_cache = self.attn(self.ln1(x_BxLxD), pos_BxL, kvmask_BxS, kv_cache, index, prefix)
    x_BxLxD = x_BxLxD + h_BxLxD
    return x_BxLxD + self.mlp(self.ln2(x_BxLxD)), kv_cache


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
  """One Block whose every parameter carries a leading layer axis of size n_layers."""

  @nnx.split_rngs(splits=cfg.n_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
  def create(layer_rngs):
    return Block(cfg, layer_rngs)

  return create(rngs)


class Decoder(nnx.Module):
  """Token embedding, `n_layers` blocks, final norm and the (tied or untied) output projection."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    # The axis names are metadata for `sharding.param_shardings`; flax's eager sharding (placing each
    # parameter as it is created, which needs a mesh in context) stays off: jobs place params on their mesh.
    with nnx.use_eager_sharding(False):
      self._build(cfg, rngs)

  def _build(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _embed(cfg, cfg.vocab_size, VOCAB_AXIS, rngs)
    if cfg.arch == "gpt2":
      self.pos_embed = _embed(cfg, cfg.max_len, POS_AXIS, rngs)
    # Stacked, and run by lax.scan, so XLA compiles one block instead of n_layers: the exact
    # meta-gradient (grad of grad inside scans) of a 30-block model otherwise takes minutes to compile.
    self.blocks = _stacked_blocks(cfg, rngs)
    self.ln_f = _norm(cfg, rngs)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                                param_dtype=cfg.storage_dtype,
                                kernel_init=_named(nnx.Linear, "kernel_init", (EMBED_AXIS, VOCAB_AXIS)), rngs=rngs)

  def features(self, tokens_BxL, pos_BxL, kvmask_BxS, cache: KVCache | None = None,
               prefix: Prefix | None = None):
    """Final-norm hidden states, and the updated cache when one is given; `prefix` conditions every layer."""
    x_BxLxD = self.embed(tokens_BxL)
    if self.cfg.arch == "gpt2":
      x_BxLxD = x_BxLxD + self.pos_embed(pos_BxL)
    block_def, block_params = nnx.split(self.blocks)
    index = None if cache is None else cache.index

    def layer(x_BxLxD, xs):
      layer_params, layer_cache, layer_prefix = xs
      block = nnx.merge(block_def, layer_params)
      return block(x_BxLxD, pos_BxL, kvmask_BxS, layer_cache, index, layer_prefix)

    if self.cfg.remat:
      # A pure function of (activations, layer params), so jax.checkpoint composes with any outer
      # jax.grad, including one that does not differentiate the base params.
      layer = jax.checkpoint(layer, policy=getattr(jax.checkpoint_policies, self.cfg.remat_policy))
    layer_cache = None if cache is None else (cache.k_NxBxSxKxE, cache.v_NxBxSxKxE)
    layer_prefix = None if prefix is None else (prefix.k_NxBxPxKxE, prefix.v_NxBxPxKxE)
    x_BxLxD, new_kv = jax.lax.scan(layer, x_BxLxD, (block_params, layer_cache, layer_prefix))
    h_BxLxD = self.ln_f(x_BxLxD)
    if cache is None:
      return h_BxLxD, None
    new_cache = KVCache(new_kv[0], new_kv[1], cache.mask_BxS, cache.index + tokens_BxL.shape[1])
    return h_BxLxD, new_cache

  def unembed(self, h_BxLxD):
    if self.cfg.tie_embeddings:
      return upcast(self.embed.attend(h_BxLxD))
    return upcast(self.lm_head(h_BxLxD))

  def __call__(self, tokens_BxL, mask_BxL=None, prefix: Prefix | None = None):
    if mask_BxL is None:
      mask_BxL = jnp.ones_like(tokens_BxL)
    h_BxLxD, _ = self.features(tokens_BxL, positions(mask_BxL), mask_BxL, prefix=prefix)
    return self.unembed(h_BxLxD)


def positions(mask_BxL: jax.Array) -> jax.Array:
  """Position of each token counting real tokens only, so left padding does not shift positions."""
  return jnp.maximum(jnp.cumsum(mask_BxL.astype(jnp.int32), axis=-1) - 1, 0)


# ------------------------------------------------------------------------------------------------
# Functional core: every function below is pure in (graphdef, params, arrays).


def init(cfg: ModelConfig, seed: int = 0) -> tuple[nnx.GraphDef, Params]:
  """Randomly initialised model, split into its static graphdef and its params pytree."""
  return nnx.split(Decoder(cfg, rngs=nnx.Rngs(seed)))


def abstract(cfg: ModelConfig) -> tuple[nnx.GraphDef, Params]:
  """graphdef and a params pytree of ShapeDtypeStructs, with no memory allocated."""
  return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))


def apply(graphdef: nnx.GraphDef, params: Params, tokens_BxL: jax.Array,
          mask_BxL: jax.Array | None = None, prefix: Prefix | None = None) -> jax.Array:
  """Next-token logits (at least float32) of right- or left-padded sequences: logits_BxLxV."""
  return nnx.merge(graphdef, params)(tokens_BxL, mask_BxL, prefix)


def hidden(graphdef: nnx.GraphDef, params: Params, tokens_BxL: jax.Array,
           mask_BxL: jax.Array) -> jax.Array:
  """Final hidden states h_BxLxD (the weighting model's features)."""
  h_BxLxD, _ = nnx.merge(graphdef, params).features(tokens_BxL, positions(mask_BxL), mask_BxL)
  return h_BxLxD


def zero_prefix(cfg: ModelConfig, batch: int, size: int, dtype=jnp.float32) -> Prefix:
  shape = (cfg.n_layers, batch, size, cfg.n_kv_heads, cfg.head_dim)
  return Prefix(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def empty_cache(cfg: ModelConfig, batch: int, size: int) -> KVCache:
  shape = (cfg.n_layers, batch, size, cfg.n_kv_heads, cfg.head_dim)
  return KVCache(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype),
                 jnp.zeros((batch, size), jnp.int32), jnp.zeros((), jnp.int32))


def decode_step(graphdef: nnx.GraphDef, params: Params, tokens_BxL: jax.Array, pos_BxL: jax.Array,
                mask_BxL: jax.Array, cache: KVCache, prefix: Prefix | None = None) -> tuple[jax.Array, KVCache]:
  """Feeds L new tokens (a prefill when L > 1) at cache.index; returns their logits and the cache."""
  cache = cache._replace(mask_BxS=jax.lax.dynamic_update_slice(
      cache.mask_BxS, mask_BxL.astype(jnp.int32), (0, cache.index)))
  model = nnx.merge(graphdef, params)
  h_BxLxD, cache = model.features(tokens_BxL, pos_BxL, cache.mask_BxS, cache, prefix)
  return model.unembed(h_BxLxD), cache


def first_layers(params: Params, n_layers: int) -> Params:
  """The params of the model made of the first `n_layers` blocks (embeddings and final norm kept)."""
  flat = [(path, var.replace(var.get_value()[:n_layers]) if path[0] == "blocks" else var)
          for path, var in nnx.to_flat_state(params)]
  return nnx.from_flat_state(flat)


def cast(params: Params, dtype: Any) -> Params:
  """Params with every floating leaf in `dtype`."""
  return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                      params)
