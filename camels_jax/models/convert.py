"""Filling the params pytree from a flat {"blocks/0/attn/q/kernel": array} mapping.

Every checkpoint reader (Hugging Face folders, GGUF files) produces such a mapping in this library's
own names and layout (kernels are [in, out]); this module checks it against the model's expected
shapes and builds the params, so no reader has to know about NNX. The flat mapping names each block
separately (`blocks/{i}/...`); the params stack the blocks on a leading layer axis (`blocks/...` of
shape [n_layers, ...]), and this module is the one place that converts between the two.
"""

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from camels_jax import checks
from camels_jax.models import transformer
from camels_jax.models.config import ModelConfig


class CheckpointError(checks.UserError, ValueError):
  """A checkpoint that cannot be turned into this model's params; the message names the file."""


def flat_key(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def _per_layer(abstract_params: transformer.Params, n_layers: int) -> dict[str, tuple[str, int, tuple]]:
  """{flat per-layer key: (stacked key, layer, shape of one layer)} for every expected tensor."""
  out = {}
  for path, var in nnx.to_flat_state(abstract_params):
    key = flat_key(path)
    if path[0] == "blocks":
      for i in range(n_layers):
        out[flat_key(("blocks", i) + tuple(path[1:]))] = (key, i, tuple(var.shape[1:]))
    else:
      out[key] = (key, -1, tuple(var.shape))
  return out


def params_from_flat(cfg: ModelConfig, flat: Mapping[str, np.ndarray], source: str) -> transformer.Params:
  """Params for `cfg` taken from `flat`; one clear error for missing, unexpected or misshapen tensors."""
  _, abstract_params = transformer.abstract(cfg)
  expected = _per_layer(abstract_params, cfg.n_layers)
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  if missing or unexpected:
    raise CheckpointError(
        f"{source}: tensors do not match a {cfg.arch} model with {cfg.n_layers} layers: "
        f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
        f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}")
  layers: dict[str, list] = {}
  values = {}
  for key, (stacked_key, layer, shape) in expected.items():
    value = np.asarray(flat[key])
    if value.shape != shape:
      raise CheckpointError(f"{source}: tensor {key} has shape {value.shape}, the config implies {shape}")
    if layer < 0:
      values[stacked_key] = jnp.asarray(value, dtype=cfg.storage_dtype)
    else:
      layers.setdefault(stacked_key, [None] * cfg.n_layers)[layer] = value
  for stacked_key, per_layer in layers.items():
    values[stacked_key] = jnp.asarray(np.stack(per_layer), dtype=cfg.storage_dtype)
  return _fill(abstract_params, values)


def _fill(abstract_params: transformer.Params, values: Mapping[str, jnp.ndarray]) -> transformer.Params:
  flat_state = nnx.to_flat_state(abstract_params)
  filled = [(path, var.replace(values[flat_key(path)])) for path, var in flat_state]
  return nnx.from_flat_state(filled)


def params_to_flat(params: transformer.Params) -> dict[str, np.ndarray]:
  """The inverse of `params_from_flat`: one entry per block and tensor (used in tests and benches)."""
  out = {}
  for path, var in nnx.to_flat_state(params):
    value = np.asarray(var.get_value())
    if "blocks" in path:  # also inside a wrapper, e.g. the weighting model's backbone/blocks/...
      at = path.index("blocks") + 1
      for i, layer_value in enumerate(value):
        out[flat_key(tuple(path[:at]) + (i,) + tuple(path[at:]))] = layer_value
    else:
      out[flat_key(path)] = value
  return out
