"""LoRA adapters (Hu et al. 2021) on the stacked block projections of `camels_jax.models.transformer`.

A targeted projection W (kernel d_in x d_out, stored with a leading layer axis: N x d_in x d_out) becomes
W + scale * A @ B with A: N x d_in x r, B: N x r x d_out and scale = alpha / r. A is random (std
1/sqrt(d_in), so x @ A keeps the scale of x), B is zero: the adapted model starts as the base model,
bit for bit. Everything is functional: `merge` returns new params and never touches the base ones, so
`jax.grad` with respect to the adapters alone trains only them (biases, norms, embeddings and the
untargeted projections stay frozen).

Adapters are a plain pytree {target: {"a": A, "b": B}} (float32 by default, whatever the base's dtype).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from camels_jax.checks import ConfigError
from camels_jax.models.config import ModelConfig

Adapters = dict[str, dict[str, jax.Array]]

# Target name -> the module path of its nnx.Linear inside the stacked `blocks`.
TARGETS = {
    "q": ("attn", "q"),
    "k": ("attn", "k"),
    "v": ("attn", "v"),
    "o": ("attn", "o"),
    "gate": ("mlp", "gate"),  # llama
    "up": ("mlp", "up"),  # llama
    "down": ("mlp", "down"),  # llama
    "fc": ("mlp", "fc"),  # gpt2
    "proj": ("mlp", "proj"),  # gpt2
}
ARCH_TARGETS = {"llama": ("q", "k", "v", "o", "gate", "up", "down"), "gpt2": ("q", "k", "v", "o", "fc", "proj")}


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
  """("q", "v") from "q,v" or a sequence of names; order kept, duplicates dropped."""
  names = targets.split(",") if isinstance(targets, str) else list(targets)
  out = []
  for n in (n.strip() for n in names):
    if n and n not in out:
      out.append(n)
  return tuple(out)


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
  """(d_in, d_out) of every projection LoRA can target in a model of `cfg`."""
  d, f, q, kv = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
  shapes = {"q": (d, q), "k": (d, kv), "v": (d, kv), "o": (q, d)}
  if cfg.arch == "llama":
    return shapes | {"gate": (d, f), "up": (d, f), "down": (f, d)}
  return shapes | {"fc": (d, f), "proj": (f, d)}


def violations(cfg: ModelConfig, targets: str | Sequence[str], rank: int, at: str = "",
               targets_key: str = "lora_targets", rank_key: str = "lora_rank") -> list[str]:
  """What is wrong with adapters of `rank` on `targets` for a model of `cfg` (messages name the config
  keys as f"{at}{targets_key}" and f"{at}{rank_key}")."""
  names = parse_targets(targets)
  shapes = projection_shapes(cfg)
  found = []
  missing = [n for n in names if n not in shapes]
  if not names or missing:
    found.append(f"{at}{targets_key}={targets!r}: a {cfg.arch} model has no projection(s) "
                 f"{', '.join(missing) or '(none given)'}; choose among {', '.join(shapes)}")
  widths = {n: min(shapes[n]) for n in names if n in shapes}
  too_narrow = {n: w for n, w in widths.items() if rank > w}
  if too_narrow:
    found.append(f"{at}{rank_key}={rank} exceeds the width of projection(s) "
                 + ", ".join(f"{n} ({shapes[n][0]}x{shapes[n][1]})" for n in too_narrow)
                 + f": a rank-{rank} update of a d_in x d_out matrix needs rank <= min(d_in, d_out) = "
                 f"{min(too_narrow.values())}")
  return found


def scale(alpha: float, rank: int) -> float:
  """The LoRA update's multiplier alpha / rank (so changing the rank does not change the lr to use)."""
  return alpha / rank


def _kernel_path(target: str) -> tuple[str, ...]:
  return ("blocks", *TARGETS[target], "kernel")


def lora_init(params: nnx.State, targets: str | Sequence[str], rank: int, seed: int,
              dtype=jnp.float32) -> Adapters:
  """Adapters of `rank` on every block's `targets` projections: A ~ N(0, 1/d_in), B = 0.

  Raises ConfigError for a target the model lacks or a rank above a targeted projection's width.
  """
  names = parse_targets(targets)
  kernels = {path: var.get_value() for path, var in nnx.to_flat_state(params)}
  bad = [n for n in names if n not in TARGETS or _kernel_path(n) not in kernels]
  if not names or bad:
    have = [n for n in TARGETS if _kernel_path(n) in kernels]
    raise ConfigError(f"lora targets {targets!r}: the model has no projection(s) {', '.join(bad) or '(none)'}; "
                      f"choose among {', '.join(have)}")
  if not isinstance(rank, int) or rank < 1:
    raise ConfigError(f"lora rank={rank!r}: expected an integer >= 1")
  narrow = {n: kernels[_kernel_path(n)].shape[1:] for n in names
            if rank > min(kernels[_kernel_path(n)].shape[1:])}
  if narrow:
    raise ConfigError(f"lora rank={rank} exceeds the width of projection(s) "
                      + ", ".join(f"{n} ({s[0]}x{s[1]})" for n, s in narrow.items())
                      + f": rank <= {min(min(s) for s in narrow.values())}")
  key = jax.random.key(seed)
  adapters = {}
  for i, n in enumerate(names):
    n_layers, d_in, d_out = kernels[_kernel_path(n)].shape
    a = jax.random.normal(jax.random.fold_in(key, i), (n_layers, d_in, rank), dtype) / jnp.sqrt(d_in)
    adapters[n] = {"a": a.astype(dtype), "b": jnp.zeros((n_layers, rank, d_out), dtype)}
  return adapters


def delta(adapter: dict[str, jax.Array], scale_: float) -> jax.Array:
  """scale * A @ B per layer: N x d_in x d_out."""
  return scale_ * jnp.einsum("nir,nro->nio", adapter["a"], adapter["b"])


def merge(params: nnx.State, adapters: Adapters, scale_: float) -> nnx.State:
  """New params with W + scale * A @ B (cast to W's dtype) in place of every targeted kernel.

  Pure: `params` is not modified. Differentiable in both arguments; with B = 0 the result equals
  `params` exactly. The adapters accumulate small updates in their own (float32) precision, but a
  bfloat16 kernel shows the forward pass only the part of the update its 8-bit mantissa can hold.
  """
  paths = {_kernel_path(n): n for n in adapters}
  flat = []
  for path, var in nnx.to_flat_state(params):
    if path in paths:
      w = var.get_value()
      # Summed in at least float32, rounded once to the kernel's dtype.
      var = var.replace((w + delta(adapters[paths[path]], scale_)).astype(w.dtype))
    flat.append((path, var))
  return nnx.from_flat_state(flat)


def num_params(adapters: Adapters) -> int:
  return sum(x.size for x in jax.tree.leaves(adapters))
