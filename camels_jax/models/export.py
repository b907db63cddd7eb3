"""Writing a model as a Hugging Face checkpoint folder: what `transformers.AutoModelForCausalLM.from_pretrained`
and `AutoTokenizer.from_pretrained` load with no code from this library (the inverse of `hf`).

The folder holds config.json (the base model's own architecture: `GPT2LMHeadModel` or `LlamaForCausalLM`),
model.safetensors, generation_config.json, and the tokenizer as tokenizer.json with tokenizer_config.json.
Parameters leave as float32 unless `dtype` says otherwise; a model read from a quantised GGUF file leaves
dequantised (its float32 values are what this library computes with).
"""

import json
import os
import shutil
import tempfile

import jax.numpy as jnp
import numpy as np

from camels_jax.models import convert, hf
from camels_jax.models.config import ModelConfig
from camels_jax.models.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
DTYPES = ("float32", "bfloat16", "float16")


def hf_config(cfg: ModelConfig, tok: Tokenizer | None = None, dtype: str = "float32") -> dict:
  """config.json of `cfg`'s architecture; the special ids from `tok` when given."""
  ids = {} if tok is None else {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
  common = {"vocab_size": cfg.vocab_size, "torch_dtype": dtype, "dtype": dtype, "use_cache": True} | ids
  if cfg.arch == "gpt2":
    return common | {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "n_positions": cfg.max_len, "n_ctx": cfg.max_len,
        "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new", "tie_word_embeddings": True,
        # Dropout off: what this library computes (a user fine-tuning it further sets their own).
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
  return common | {
      "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_len,
      "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
      "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rope_theta,
      # transformers >= 5 reads RoPE from here; older versions from rope_theta above.
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}


def hf_tensors(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
  """The checkpoint's tensors under transformers' names and layouts (torch Linear weights are [out, in])."""
  flat = convert.params_to_flat(params)
  if cfg.arch == "gpt2":
    d, out = cfg.d_model, {"transformer.wte.weight": flat.pop("embed/embedding"),
                           "transformer.wpe.weight": flat.pop("pos_embed/embedding"),
                           "transformer.ln_f.weight": flat.pop("ln_f/scale"),
                           "transformer.ln_f.bias": flat.pop("ln_f/bias")}
    for i in range(cfg.n_layers):
      h, b = f"transformer.h.{i}.", f"blocks/{i}/"
      for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
        out[h + theirs + ".weight"] = flat.pop(b + ours + "/scale")
        out[h + theirs + ".bias"] = flat.pop(b + ours + "/bias")
      # GPT-2's Conv1D stores [in, out], as this library does; c_attn packs q, k, v along the output axis.
      out[h + "attn.c_attn.weight"] = np.concatenate([flat.pop(b + f"attn/{n}/kernel") for n in "qkv"], axis=1)
      out[h + "attn.c_attn.bias"] = np.concatenate([flat.pop(b + f"attn/{n}/bias") for n in "qkv"])
      for ours, theirs in hf.GPT2_LINEARS:
        out[h + theirs + ".weight"] = flat.pop(b + ours + "/kernel")
        out[h + theirs + ".bias"] = flat.pop(b + ours + "/bias")
  else:
    out = {"model.embed_tokens.weight": flat.pop("embed/embedding"), "model.norm.weight": flat.pop("ln_f/scale")}
    if not cfg.tie_embeddings:
      out["lm_head.weight"] = flat.pop("lm_head/kernel").T
    for i in range(cfg.n_layers):
      h, b = f"model.layers.{i}.", f"blocks/{i}/"
      out[h + "input_layernorm.weight"] = flat.pop(b + "ln1/scale")
      out[h + "post_attention_layernorm.weight"] = flat.pop(b + "ln2/scale")
      for ours, theirs in hf.LLAMA_LINEARS:
        out[h + theirs + ".weight"] = flat.pop(b + ours + "/kernel").T
  if flat:  # a parameter with no place in the architecture would be lost silently
    raise ValueError(f"hf_tensors: no Hugging Face name for {sorted(flat)[:6]}")
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def tokenizer_files(tok: Tokenizer) -> dict[str, str]:
  """{file name: text} of the tokenizer: the `tokenizers` JSON and the special tokens transformers reads."""
  special = {name: tok.backend.id_to_token(i) for name, i in
             (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id)) if i is not None}
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000} | special
  return {"tokenizer.json": tok.backend.to_str(), "tokenizer_config.json": json.dumps(config, indent=2),
          "special_tokens_map.json": json.dumps(special, indent=2)}


def save_pretrained(folder: str, cfg: ModelConfig, params, tok: Tokenizer | None = None,
                    dtype: str = "float32", extra: dict[str, str] | None = None) -> str:
  """Writes `params` as a Hugging Face checkpoint folder, whole or not at all (a sibling temporary folder
  renamed into place; an existing folder is replaced).

  Args:
    folder: the checkpoint folder to write.
    cfg: the model's config (GPT-2 or Llama family).
    params: its parameters (any float dtype; float32 numbers are written unless `dtype` says otherwise).
    tok: the tokenizer to ship beside it, or None.
    dtype: one of `DTYPES`.
    extra: more {file name: text} to write into the folder (e.g. a note of where the model came from).

  Returns:
    `folder`.
  """
  if dtype not in DTYPES:
    raise ValueError(f"save_pretrained: dtype={dtype!r} is not one of {DTYPES}")
  # safetensors' flax writer: jax has bfloat16 where numpy has none, and no torch is needed to write.
  from safetensors.flax import save_file  # pylint: disable=g-import-not-at-top
  tensors = {k: jnp.asarray(v, dtype) for k, v in hf_tensors(cfg, params).items()}
  folder = os.path.abspath(folder)
  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
  try:
    save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
    files = {"config.json": json.dumps(hf_config(cfg, tok, dtype), indent=2),
             "generation_config.json": json.dumps(
                 {} if tok is None else {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                                         "pad_token_id": tok.pad_id}, indent=2)}
    files |= tokenizer_files(tok) if tok is not None else {}
    for name, text in (files | (extra or {})).items():
      with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
        f.write(text)
    if os.path.isdir(folder):
      shutil.rmtree(folder)
    os.replace(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return folder
