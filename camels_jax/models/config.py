"""The one configuration that describes every decoder the library runs (GPT-2 and Llama families)."""

import dataclasses

import jax.numpy as jnp

ARCHS = ("gpt2", "llama")
# jax.checkpoint_policies a rematerialised block may keep its residuals by: everything recomputed; every
# matmul output kept; or the weight matmuls' outputs kept, attention and elementwise work recomputed.
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder-only LM.

  GPT-2: learned positions, LayerNorm, tanh-GELU MLP, biases, tied embeddings.
  Llama: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, tied or untied embeddings.
  """

  arch: str  # "gpt2" or "llama"
  vocab_size: int  # rows of the embedding table (may exceed the tokenizer's vocabulary)
  d_model: int  # residual width
  n_layers: int  # number of transformer blocks
  n_heads: int  # query heads
  n_kv_heads: int  # key/value heads (== n_heads unless grouped-query attention)
  d_ff: int  # MLP hidden width
  max_len: int  # longest sequence the positions support
  norm_eps: float = 1e-5  # LayerNorm / RMSNorm epsilon
  rope_theta: float = 10000.0  # RoPE base (llama only)
  tie_embeddings: bool = True  # output projection is the transposed token embedding
  dtype: str = "float32"  # compute dtype ("bfloat16" for speed on accelerators)
  param_dtype: str = "float32"  # storage dtype of the parameters
  remat: bool = False  # rematerialise each block in the backward pass (saves activation memory)
  remat_policy: str = "nothing_saveable"  # what a rematerialised block keeps: a REMAT_POLICIES name

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}")
    if self.arch not in ARCHS:
      raise ValueError(f"ModelConfig.arch={self.arch!r} is not one of {ARCHS}")
    if self.d_model % self.n_heads:
      raise ValueError(f"ModelConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"ModelConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.arch == "gpt2" and (self.n_kv_heads != self.n_heads or not self.tie_embeddings):
      raise ValueError("ModelConfig: gpt2 has n_kv_heads == n_heads and tied embeddings")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def storage_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    """Parameter count (embeddings included once when tied)."""
    d, f, v, hd = self.d_model, self.d_ff, self.vocab_size, self.head_dim
    attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
    if self.arch == "gpt2":
      block = attn + 2 * d * f + (3 * d + d + f + d) + 4 * d  # biases + two LayerNorms
      return v * d + self.max_len * d + self.n_layers * block + 2 * d
    block = attn + 3 * d * f + 2 * d
    return v * d * (1 if self.tie_embeddings else 2) + self.n_layers * block + d
