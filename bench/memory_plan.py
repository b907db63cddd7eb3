"""Memory plan of one exact CaMeLS meta-training step for a base model on a mesh of data x FSDP devices.

  python -m bench.memory_plan [--models smollm2-135m,gpt2-xl,llama2-7b] [--meshes 1x1,8x1,4x2,1x8]
                              [--docs 2] [--doc_len 256]

Every number comes from XLA: the step (`camels.meta_train_step`: the meta-gradient through the inner
update, Adam on the weighting model) is compiled from abstract arrays (ShapeDtypeStructs), so nothing is
allocated and a 7B model plans on a laptop; its per-device memory_analysis gives arguments (base params of
the stream, meta params, Adam's two moments, the batch), outputs (adapted base, new meta params and state)
and temporaries (what the second-order backward pass keeps). Beside it, the analytic floor of the
parameter-sized terms: params 4P / fsdp bytes per device, Adam 8 P_meta / fsdp.

The mesh's `data` axis carries independent document streams (one each); `fsdp` splits every parameter of
the base model, the weighting model and Adam's state by its logical axis names (`sharding.param_shardings`:
vocabulary, MLP width, heads, in that order of preference; parameters without names on their largest
dimension the axis divides), and XLA (GSPMD) gathers what each matmul needs. The meta-gradient under that
sharding equals one device's (tests/methods/test_camels_sharded.py); the jobs run on it with `mesh.fsdp`
(`--config.mesh.fsdp=8` for the fsdp 8 rows). It runs on 8 fake CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set here when absent).

Measured 2026-12-01 with the logical axis names (FSDP_RULES), every row in one run of
`python -m bench.memory_plan --meshes 1x1,4x2,1x8` (defaults: 2 x 256-token documents per stream; peak per
device in GB, from XLA; each step compiles in 10-16 s on 2 CPU cores):

  model (params)          setting       1 device   data 4 x fsdp 2   fsdp 8
  SmolLM2-135M            no remat          9.97         5.21         2.16
                          block remat       6.49         3.35         1.06
  GPT-2 XL (1.56B)        no remat         86.45        44.38        15.16
                          block remat      66.78        34.18         9.48
  Llama-2 7B (6.74B)      no remat        292.76       146.51        36.66
                          block remat     269.08       136.78        34.22

The shape rule alone (each parameter split on its largest dimension the axis divides; measured 2026-11-30)
needed up to 6% more at fsdp 8: SmolLM2 2.28 / 1.11, GPT-2 XL 15.49 / 9.55, Llama 36.67 / 34.22.
Data 4 x fsdp 2 holds 4 streams' adapted copies, each split 2 ways, so it needs about half of one device's
memory, not an eighth.

So the exact meta step of the models the papers use fits an 80 GB accelerator only with the FSDP axis:
GPT-2 XL on 8 devices at 10-15 GB each, Llama-2 7B at 34-37 GB each; replicated, neither fits one device.
XLA shards the second-order pass's parameter-sized temporaries along with the parameters, so the
temporaries shrink about as much as the parameters do (7.5x and 8x at fsdp 8).
"""

import argparse
import os
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top
from flax import nnx  # pylint: disable=g-import-not-at-top
from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top

from camels_jax import sharding  # pylint: disable=g-import-not-at-top
from camels_jax.adapt import inner as inner_lib  # pylint: disable=g-import-not-at-top
from camels_jax.methods import camels  # pylint: disable=g-import-not-at-top
from camels_jax.models import transformer  # pylint: disable=g-import-not-at-top
from camels_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top

GB = 1e9
MODELS = {
    "smollm2-135m": ModelConfig(arch="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                d_ff=1536, max_len=8192, rope_theta=100000.0, tie_embeddings=True),
    "gpt2-xl": ModelConfig(arch="gpt2", vocab_size=50257, d_model=1600, n_layers=48, n_heads=25, n_kv_heads=25,
                           d_ff=6400, max_len=1024, tie_embeddings=True),
    "llama2-7b": ModelConfig(arch="llama", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                             d_ff=11008, max_len=4096, tie_embeddings=False),
}
# name: block remat policy, or None for none (the inner step is never rematerialised: camels.remat's default)
SETTINGS = {"no remat": None, "block remat": "nothing_saveable"}


def abstract(tree, mesh, lead: tuple = ()):
  """ShapeDtypeStructs of `tree` with the library's FSDP shardings (`lead`: mesh axes of leading dims)."""
  def one(x, s):
    if isinstance(x, nnx.Variable):  # keeps the logical axis names with the abstract value
      return x.replace(jax.ShapeDtypeStruct(x.get_value().shape, x.get_value().dtype, sharding=s))
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

  return jax.tree.map(one, tree, sharding.param_shardings(tree, mesh, lead),
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def n_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def plan(cfg: ModelConfig, policy, data: int, fsdp: int, args):
  """(per-device compiled memory of one meta-training step, P_base, P_meta)."""
  mesh = jax.make_mesh((data, fsdp), (sharding.DATA_AXIS, sharding.FSDP_AXIS), axis_types=(AxisType.Auto,) * 2,
                       devices=jax.devices()[:data * fsdp])
  cfg = cfg.replace(remat=policy is not None, remat_policy=policy or "nothing_saveable")
  graphdef, base = transformer.abstract(cfg)
  wm = nnx.eval_shape(lambda: camels.WeightingModel(cfg.replace(n_layers=args.weighting_layers, tie_embeddings=True,
                                                                remat=False), 128, 3.0, rngs=nnx.Rngs(0)))
  wm_graphdef, wm_params = nnx.split(wm)
  mcfg = camels.MetaConfig(inner=inner_lib.InnerConfig(padded_len=args.doc_len))
  meta = camels.init_meta_params(wm_params, mcfg)
  optimizer = optax.adam(1e-5)
  opt_state = jax.eval_shape(optimizer.init, meta)
  base_P = jax.tree.map(lambda x: jax.ShapeDtypeStruct((data, *x.shape), x.dtype), base)
  k, q, s = args.docs, args.qa_slots, args.qa_len
  batch = {"doc_tokens_BxL": ((k, args.doc_len), jnp.int32), "doc_mask_BxL": ((k, args.doc_len), jnp.int32),
           "doc_valid_B": ((k,), jnp.bool_), "qa_tokens_BxQxS": ((k, q, s), jnp.int32),
           "qa_mask_BxQxS": ((k, q, s), jnp.int32), "qa_loss_mask_BxQxS": ((k, q, s), jnp.bool_),
           "qa_valid_BxQ": ((k, q), jnp.bool_), "loc_tokens_KxT": ((1, args.loc_len), jnp.int32),
           "loc_mask_KxT": ((1, args.loc_len), jnp.int32)}
  batch_P = {n: jax.ShapeDtypeStruct((data, *shape), dtype, sharding=sharding.batch_sharded(mesh))
             for n, (shape, dtype) in batch.items()}
  step = jax.jit(lambda m, o, b, x: camels.meta_train_step(m, o, b, x, graphdef=graphdef, wm_graphdef=wm_graphdef,
                                                           mcfg=mcfg, optimizer=optimizer))
  with jax.set_mesh(mesh):
    compiled = step.lower(abstract(meta, mesh), abstract(opt_state, mesh),
                          abstract(base_P, mesh, lead=(sharding.DATA_AXIS,)), batch_P).compile()
  return compiled.memory_analysis(), n_params(base), n_params(meta)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated; of {list(MODELS)}")
  parser.add_argument("--meshes", default="1x1,8x1,4x2,1x8", help="comma-separated data x fsdp shapes")
  parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated; of {list(SETTINGS)}")
  parser.add_argument("--docs", type=int, default=2, help="documents per meta-batch (k)")
  parser.add_argument("--doc_len", type=int, default=256)
  parser.add_argument("--qa_len", type=int, default=32)
  parser.add_argument("--qa_slots", type=int, default=3)
  parser.add_argument("--loc_len", type=int, default=256)
  parser.add_argument("--weighting_layers", type=int, default=2)
  args = parser.parse_args()
  meshes = [tuple(int(v) for v in m.split("x")) for m in args.meshes.split(",")]
  too_big = [m for m in meshes if m[0] * m[1] > jax.device_count()]
  if too_big:
    parser.error(f"--meshes {too_big}: more devices than the {jax.device_count()} here")
  print(f"exact meta-training step (meta-gradient + Adam on the weighting model), {args.docs} x {args.doc_len}-token "
        f"docs per stream, {args.qa_slots} questions x {args.qa_len}, loc text {args.loc_len}, weighting model "
        f"{args.weighting_layers} blocks; per-device memory from XLA's compiled memory analysis (abstract arrays)")
  print(f"{'model':<13} {'setting':<12} {'mesh':>5} {'params/dev':>10} {'Adam/dev':>9} {'args':>8} {'out':>8} "
        f"{'temps':>8} {'peak':>8}  (GB; params and Adam analytic: 4P/fsdp, 8P_meta/fsdp)")
  for name in args.models.split(","):
    for setting in args.settings.split(","):
      policy = SETTINGS[setting]
      for data, fsdp in meshes:
        t0 = time.perf_counter()
        m, p_base, p_meta = plan(MODELS[name], policy, data, fsdp, args)
        peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        print(f"{name:<13} {setting:<12} {data}x{fsdp:<3} {4 * p_base / fsdp / GB:10.2f} {8 * p_meta / fsdp / GB:9.2f} "
              f"{m.argument_size_in_bytes / GB:8.2f} {m.output_size_in_bytes / GB:8.2f} {m.temp_size_in_bytes / GB:8.2f} "
              f"{peak / GB:8.2f}  ({p_base / 1e9:.2f}B + {p_meta / 1e9:.2f}B meta params; "
              f"{time.perf_counter() - t0:.0f} s to compile)", flush=True)


if __name__ == "__main__":
  main()
