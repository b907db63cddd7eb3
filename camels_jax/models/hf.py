"""Reading Hugging Face checkpoint folders (config.json + safetensors or pytorch_model.bin).

transformers 5 has no Flax models, so this module reads the raw tensors and maps them onto this
library's names; transformers itself is only needed for tokenizers and (in tests) for reference
PyTorch logits.
"""

import json
import os
import re

import numpy as np

from camels_jax.models import convert
from camels_jax.models.config import ModelConfig
from camels_jax.models.convert import CheckpointError

SUPPORTED = ("gpt2", "llama")
# A block's linear layers: (this library's name, transformers' name) in each family.
GPT2_LINEARS = (("attn/o", "attn.c_proj"), ("mlp/fc", "mlp.c_fc"), ("mlp/proj", "mlp.c_proj"))
LLAMA_LINEARS = (("attn/q", "self_attn.q_proj"), ("attn/k", "self_attn.k_proj"), ("attn/v", "self_attn.v_proj"),
                 ("attn/o", "self_attn.o_proj"), ("mlp/gate", "mlp.gate_proj"), ("mlp/up", "mlp.up_proj"),
                 ("mlp/down", "mlp.down_proj"))


def config_from_dict(hf: dict, source: str) -> ModelConfig:
  """ModelConfig from a parsed config.json; one clear error for anything unsupported."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED:
    raise CheckpointError(
        f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED)})")
  try:
    if model_type == "gpt2":
      act = hf.get("activation_function", "gelu_new")
      if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{source}: activation_function {act!r} is not supported (gelu_new only)")
      d = hf["n_embd"]
      return ModelConfig(arch="gpt2", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"],
                         n_heads=hf["n_head"], n_kv_heads=hf["n_head"], d_ff=hf.get("n_inner") or 4 * d,
                         max_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                         tie_embeddings=True)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
      raise CheckpointError(f"{source}: rope scaling {rope!r} is not supported (default RoPE only)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    heads = hf["num_attention_heads"]
    d = hf["hidden_size"]
    if hf.get("head_dim", d // heads) != d // heads:
      raise CheckpointError(f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
      raise CheckpointError(f"{source}: attention_bias / mlp_bias are not supported")
    return ModelConfig(arch="llama", vocab_size=hf["vocab_size"], d_model=d,
                       n_layers=hf["num_hidden_layers"], n_heads=heads,
                       n_kv_heads=hf.get("num_key_value_heads") or heads, d_ff=hf["intermediate_size"],
                       max_len=hf.get("max_position_embeddings", 2048),
                       norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
  except KeyError as e:
    raise CheckpointError(f"{source}: config.json has no key {e.args[0]!r} needed for {model_type}") from None


def _read_tensors(folder: str) -> dict[str, np.ndarray]:
  """All tensors of a folder as float32 numpy arrays, keyed by their checkpoint names."""
  files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
  if files:
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    out = {}
    for f in files:
      # The "flax" framework reads bfloat16 too (numpy has no bfloat16 of its own).
      with safe_open(os.path.join(folder, f), framework="flax") as st:
        for k in st.keys():
          out[k] = np.asarray(st.get_tensor(k), dtype=np.float32)
    return out
  bins = sorted(f for f in os.listdir(folder) if re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", f))
  if not bins:
    raise CheckpointError(f"{folder}: no *.safetensors or pytorch_model*.bin file")
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(f"{folder}: reading pytorch_model.bin needs torch (pip install torch)") from None
  out = {}
  for f in bins:
    for k, v in torch.load(os.path.join(folder, f), map_location="cpu", weights_only=True).items():
      out[k] = v.float().numpy()
  return out


def _gpt2_names(t: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
  t = {k.removeprefix("transformer."): v for k, v in t.items()}
  d = cfg.d_model
  flat = {"embed/embedding": t.pop("wte.weight"), "pos_embed/embedding": t.pop("wpe.weight"),
          "ln_f/scale": t.pop("ln_f.weight"), "ln_f/bias": t.pop("ln_f.bias")}
  for i in range(cfg.n_layers):
    h, b = f"h.{i}.", f"blocks/{i}/"
    for ours, theirs in (("ln1", "ln_1"), ("ln2", "ln_2")):
      flat[b + ours + "/scale"] = t.pop(h + theirs + ".weight")
      flat[b + ours + "/bias"] = t.pop(h + theirs + ".bias")
    # GPT-2's Conv1D already stores [in, out]; c_attn packs q, k, v along the output axis.
    qkv_w, qkv_b = t.pop(h + "attn.c_attn.weight"), t.pop(h + "attn.c_attn.bias")
    for j, name in enumerate("qkv"):
      flat[b + f"attn/{name}/kernel"] = qkv_w[:, j * d:(j + 1) * d]
      flat[b + f"attn/{name}/bias"] = qkv_b[j * d:(j + 1) * d]
    for ours, theirs in GPT2_LINEARS:
      flat[b + ours + "/kernel"] = t.pop(h + theirs + ".weight")
      flat[b + ours + "/bias"] = t.pop(h + theirs + ".bias")
  t.pop("lm_head.weight", None)  # tied to wte
  return flat | _leftovers(t)


def _llama_names(t: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
  flat = {"embed/embedding": t.pop("model.embed_tokens.weight"), "ln_f/scale": t.pop("model.norm.weight")}
  if cfg.tie_embeddings:
    t.pop("lm_head.weight", None)
  elif "lm_head.weight" in t:
    flat["lm_head/kernel"] = t.pop("lm_head.weight").T
  for i in range(cfg.n_layers):
    h, b = f"model.layers.{i}.", f"blocks/{i}/"
    flat[b + "ln1/scale"] = t.pop(h + "input_layernorm.weight")
    flat[b + "ln2/scale"] = t.pop(h + "post_attention_layernorm.weight")
    for ours, theirs in LLAMA_LINEARS:
      flat[b + ours + "/kernel"] = t.pop(h + theirs + ".weight").T  # torch Linear is [out, in]
  return flat | _leftovers(t)


def _leftovers(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # Non-persistent buffers some old checkpoints carry; anything else is reported as unexpected.
  return {k: v for k, v in t.items()
          if not re.search(r"(attn\.(masked_)?bias|rotary_emb\.inv_freq)$", k)}


def load_folder(folder: str, dtype: str = "float32"):
  """Loads a Hugging Face checkpoint folder.

  Args:
    folder: directory with config.json and model weights (safetensors, possibly sharded, or
      pytorch_model.bin).
    dtype: parameter storage dtype.

  Returns:
    (ModelConfig, params pytree).

  Raises:
    CheckpointError: missing files, unsupported architecture, or tensors that do not fit.
  """
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.isdir(folder):
    raise CheckpointError(f"{folder}: no such checkpoint folder")
  if not os.path.isfile(cfg_path):
    raise CheckpointError(f"{cfg_path}: missing (a Hugging Face checkpoint folder needs config.json)")
  try:
    with open(cfg_path) as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_path}:{e.lineno}: invalid JSON ({e.msg})") from None
  cfg = config_from_dict(hf, cfg_path).replace(param_dtype=dtype)
  tensors = _read_tensors(folder)
  try:
    flat = (_gpt2_names if cfg.arch == "gpt2" else _llama_names)(tensors, cfg)
  except KeyError as e:
    raise CheckpointError(f"{folder}: tensor {e.args[0]!r} is missing") from None
  return cfg, convert.params_from_flat(cfg, flat, folder)


def load_hub(name: str, dtype: str = "float32"):
  """Downloads `name` from the Hugging Face hub (needs a network) and loads it."""
  from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
  folder = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt"])
  return folder, load_folder(folder, dtype)
