"""Filling the params pytree from a flat {"blocks/0/attn/q/kernel": array} mapping.

Every checkpoint reader (Hugging Face folders, GGUF files) produces such a mapping in this library's
own names and layout (kernels are [in, out]); this module checks it against the model's expected
shapes and builds the params, so no reader has to know about NNX.
"""

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from camels_jax.models import transformer
from camels_jax.models.config import ModelConfig


class CheckpointError(ValueError):
  """A checkpoint that cannot be turned into this model's params; the message names the file."""


def flat_key(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def params_from_flat(cfg: ModelConfig, flat: Mapping[str, np.ndarray], source: str) -> transformer.Params:
  """Params for `cfg` taken from `flat`; one clear error for missing, unexpected or misshapen tensors."""
  _, abstract_params = transformer.abstract(cfg)
  expected = {flat_key(path): var for path, var in nnx.to_flat_state(abstract_params)}
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  if missing or unexpected:
    raise CheckpointError(
        f"{source}: tensors do not match a {cfg.arch} model with {cfg.n_layers} layers: "
        f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
        f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
  leaves = []
  for key, var in expected.items():
    value = np.asarray(flat[key])
    if value.shape != var.shape:
      raise CheckpointError(f"{source}: tensor {key} has shape {value.shape}, the config implies {var.shape}")
    leaves.append((key, jnp.asarray(value, dtype=cfg.storage_dtype)))
  values = dict(leaves)
  return jax_tree_fill(abstract_params, values)


def jax_tree_fill(abstract_params: transformer.Params, values: Mapping[str, jnp.ndarray]) -> transformer.Params:
  flat_state = nnx.to_flat_state(abstract_params)
  filled = [(path, var.replace(values[flat_key(path)])) for path, var in flat_state]
  return nnx.from_flat_state(filled)


def params_to_flat(params: transformer.Params) -> dict[str, np.ndarray]:
  """The inverse of `params_from_flat` (used to save converted checkpoints and in tests)."""
  return {flat_key(path): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(params)}
