"""Variance of the CaMeLS meta-gradient across meta-batches: k=1 inner pass, k=3 passes, k=3 with mixing.

  python -m bench.meta_grad_variance [--seeds 8] [--docs 1] [--base_layers 2] [--doc_len 256] [--inner_lr 5e-4]

Base model: the first `--base_layers` blocks of SmolLM2-135M (its embeddings, final norm and tokenizer);
weighting model: its first block + the MLP head (last layer drawn small and random instead of zero, so
that every meta-parameter has a gradient; at the zero init only the head's last layer has one). Data:
real text documents of the generated dataset (`camels_jax.data`, SmolLM2 tokenizer), `--seeds`
consecutive meta-batches of one meta_train epoch (disjoint documents, each with its own locality text).
Exact (second-order) meta-gradients, no remat.

Prints, for the whole meta-gradient and for the head and the backbone apart, per setting (same
meta-parameters, same batches): mean gradient norm E|g|, norm of the mean gradient |Eg|, total variance
trCov = trace of the covariance across batches (unbiased), trCov / |Eg|^2 (noise-to-signal: roughly how
many batches must be averaged before the mean dominates) and trCov / E|g|^2; then the cosine between
the mean gradients of k=3 mixing and k=3 exact (the bias side: mixing as an estimator of the exact k=3
gradient), their mean same-batch cosine and norm ratio, and the same for k=1 against k=3.

Caveat: a truncated SmolLM2 is a poor LM (document NLL ~19 nats with 2 blocks, vs ~3 for all 30), so
"learn more from every token" dominates its meta-gradient. `--base_layers 30` runs the full model (its
meta step compiles in ~20 s since the blocks are scanned, but each k=3 sample takes ~1 min on 2 cores).
Runtime with 2 blocks: ~5 min on 2 (shared) CPU cores.
"""

import argparse
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.meta_step import truncated
from camels_jax import data
from camels_jax.adapt import inner as inner_lib
from camels_jax.methods import camels
from camels_jax.models import loading


def _vec(tree) -> jax.Array:
  return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", type=int, default=8, help="meta-batches (gradient samples) per setting")
  parser.add_argument("--docs", type=int, default=1, help="documents per meta-batch")
  parser.add_argument("--base_layers", type=int, default=2, help="SmolLM2 blocks of the base model")
  parser.add_argument("--doc_len", type=int, default=256, help="document bucket (longer ones are truncated)")
  parser.add_argument("--inner_lr", type=float, default=5e-4)
  args = parser.parse_args()
  t_start = time.perf_counter()

  full = loading.load(loading.model_config("smollm2"))
  base = truncated(full, args.base_layers)
  del full
  wcfg = camels.weighting_config()
  wcfg.base_layers = 1
  wm_graphdef, wm_params = camels.build_weighting_model(wcfg, base)
  fc2 = wm_params["fc2"]["kernel"]
  fc2.set_value(0.05 * jax.random.normal(jax.random.key(1), fc2.shape, fc2.dtype))

  dc = data.get_data_config("generated")
  dc.split_sizes.update(qa_train=2, qa_val=2, meta_train=args.seeds * args.docs, meta_val=2, test=2)
  dc.generated.loc_docs = args.seeds
  dc.doc_buckets = (args.doc_len,)
  dc.loc_len = 128
  dc.meta_batch_docs = args.docs
  workdir = tempfile.mkdtemp(prefix="meta_grad_variance_")
  try:
    d = data.load(dc, base.tokenizer, workdir)
    loader = d.meta_loader()
    batches = [jax.tree.map(jnp.asarray, next(loader)) for _ in range(args.seeds)]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  real = [int(b["doc_mask_BxL"].sum()) for b in batches]
  print(f"base: SmolLM2-135M first {args.base_layers} blocks ({base.cfg.num_params() / 1e6:.1f}M params); "
        f"weighting model: 1 block + head; {args.seeds} meta-batches of {args.docs} generated documents "
        f"(bucket {args.doc_len}; {min(real)}-{max(real)} real tokens per batch), "
        f"{batches[0]['qa_tokens_BxQxS'].shape[1]} question slots, inner lr {args.inner_lr}")

  settings = {
      "k=1": camels.MetaConfig(inner=inner_lib.InnerConfig(steps=1, padded_len=args.doc_len),
                               inner_lr=args.inner_lr),
      "k=3": camels.MetaConfig(inner=inner_lib.InnerConfig(steps=3, padded_len=args.doc_len),
                               inner_lr=args.inner_lr),
      "k=3 mixing": camels.MetaConfig(inner=inner_lib.InnerConfig(steps=3, padded_len=args.doc_len),
                                      inner_lr=args.inner_lr, mixing=True),
  }
  meta = camels.init_meta_params(wm_params, settings["k=1"])

  def grad_fn(mcfg):
    def f(meta, batch):
      (loss, _), g = jax.value_and_grad(camels.meta_loss, has_aux=True)(
          meta, base.params, batch, graphdef=base.graphdef, wm_graphdef=wm_graphdef, mcfg=mcfg)
      return loss, _vec(g)
    return jax.jit(f)

  # Leaves in the order of _vec; the backbone's come first, then fc1, fc2 (sorted keys): two slices.
  sizes = [(jax.tree_util.keystr(p), x.size) for p, x in jax.tree_util.tree_leaves_with_path(meta)]
  is_backbone = ["'backbone'" in path for path, _ in sizes]
  assert is_backbone == sorted(is_backbone, reverse=True), "backbone leaves are not first"
  n_backbone = sum(size for (_, size), bb in zip(sizes, is_backbone) if bb)
  total = sum(size for _, size in sizes)
  groups = {"all": slice(0, total), "head (fc1, fc2)": slice(n_backbone, total), "backbone": slice(0, n_backbone)}

  fns = {k: grad_fn(m) for k, m in settings.items()}
  pairs = (("k=3 mixing", "k=3"), ("k=1", "k=3"))
  sums = {(k, gname): 0.0 for k in settings for gname in groups}  # running sums of gradients
  sq = {(k, gname): [] for k in settings for gname in groups}  # squared norms per batch
  same_batch_cos = {(a, b, gname): [] for a, b in pairs for gname in groups}
  cos = lambda a, b: float(jnp.vdot(a, b) / jnp.sqrt(jnp.vdot(a, a) * jnp.vdot(b, b)))
  for s, batch in enumerate(batches):
    g, line = {}, []
    for k, fn in fns.items():
      loss, g[k] = fn(meta, batch)
      for gname, sl in groups.items():
        sums[(k, gname)] = sums[(k, gname)] + g[k][sl]
        sq[(k, gname)].append(float(jnp.vdot(g[k][sl], g[k][sl])))
      line.append(f"{k} loss {float(loss):.4f} |g| {np.sqrt(sq[(k, 'all')][-1]):.3e}")
    for a, b in pairs:
      for gname, sl in groups.items():
        same_batch_cos[(a, b, gname)].append(cos(g[a][sl], g[b][sl]))
    print(f"  batch {s}: " + ", ".join(line) + f"  ({time.perf_counter() - t_start:.0f} s)", flush=True)
    del g

  n = args.seeds
  print(f"\n=== meta-gradient over {n} meta-batches ({total / 1e6:.1f}M meta-parameters) ===")
  print("E|g| = mean gradient norm, |Eg| = norm of the mean gradient, trCov = trace of the covariance across "
        "batches (unbiased), trCov/|Eg|^2 = noise-to-signal")
  for gname in groups:
    print(f"[{gname}]")
    print(f"  {'setting':<11} {'E|g|':>10} {'|Eg|':>10} {'trCov':>10} {'trCov/|Eg|^2':>13} {'trCov/E|g|^2':>13}")
    means = {k: sums[(k, gname)] / n for k in settings}
    for k in settings:
      mean_sq = float(jnp.vdot(means[k], means[k]))
      tr_cov = (sum(sq[(k, gname)]) - n * mean_sq) / (n - 1)
      print(f"  {k:<11} {np.mean(np.sqrt(sq[(k, gname)])):10.3e} {np.sqrt(mean_sq):10.3e} {tr_cov:10.3e} "
            f"{tr_cov / mean_sq:13.3f} {tr_cov / np.mean(sq[(k, gname)]):13.3f}")
    for a, b in pairs:
      per = same_batch_cos[(a, b, gname)]
      print(f"  cos(mean {a}, mean {b}) = {cos(means[a], means[b]):.4f};  same-batch cos: mean "
            f"{np.mean(per):.4f}, min {np.min(per):.4f};  |Eg {a}| / |Eg {b}| = "
            f"{float(jnp.linalg.norm(means[a]) / jnp.linalg.norm(means[b])):.3f}")
  print(f"(whole script: {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
  main()
