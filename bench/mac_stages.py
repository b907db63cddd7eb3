"""Where a document's identity is lost on its way to MAC's prefix: trained networks against untrained ones.

  python -m bench.mac_stages --workdir runs/mac_default [--docs 16]

Reads the first `--docs` meta-val documents of the workdir's data, amortizes each alone, and prints for every
stage of the path a question reads a document by (encoder features, the amortizer's attention, the modulation
tokens, their aggregation by a zero query, the prefix's keys and values) how far the documents lie from their
mean, relative to the mean's norm: 0 means that every document gives the same thing. With the trained
networks (the workdir's best mac checkpoint) and with freshly initialised ones (same seed).

Measured (2 CPU cores, 16 meta-val documents, 2026-12-05), `configs/mac_default.py` with
`--config.mac.bank_docs=1 --config.mac.reconstruct=1` (best of 300 steps) and with
`--config.mac.backprop_fraction=1 --config.mac.reconstruct=10` (8-document banks, best of 100 steps):

    stage                                  untrained   bank 1, x1   bank 8, x10
    encoder features, mean over tokens        0.107       0.101        0.107
    encoder features, one token               0.863       0.823        0.874
    amortizer output                          0.137       0.070        0.095
    modulation tokens                         0.140       0.019        0.044
    aggregated by a zero query                0.101       0.0027       0.0106
    prefix keys                               0.100       0.0027       0.0105
    prefix values                               -         0.0002       0.0006   (untrained: all zero)
    amortizer attention: entropy / ln(tokens) 0.949       0.934        0.935    (near uniform: a mean)

Training shrinks what differs between documents and grows what they share (the aggregated tokens' mean norm
tripled by step 100 of the first run): the answer loss, and the reconstruction loss too, is met by a prior, and the
prefix's LayerNorm scales the documents' differences down with the growing mean.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from camels_jax import data as data_lib
from camels_jax import io_utils, sharding
from camels_jax.data import pipeline
from camels_jax.methods import mac
from camels_jax.models import loading, transformer


def spread(x_NxF) -> float:
  """Mean distance of the N rows from their mean, over the mean's norm (nan when the mean is 0)."""
  x = np.asarray(x_NxF, np.float64).reshape(len(x_NxF), -1)
  mu = x.mean(0)
  norm = np.linalg.norm(mu)
  return float(np.linalg.norm(x - mu, axis=1).mean() / norm) if norm > 0 else float("nan")


def stages(graphdef, params, tokens_NxL, mask_NxL) -> dict:
  """{stage: `spread` across the N documents} along amortize -> aggregate (zero query) -> prefix, and the
  amortizer's attention entropy over ln(document length)."""
  model = nnx.merge(graphdef, params)
  h_NxLxC, _ = model.encoder.features(tokens_NxL, transformer.positions(mask_NxL), mask_NxL)
  h_NxLxC = transformer.upcast(h_NxLxC)
  w_NxLx1 = (mask_NxL[..., None] > 0).astype(jnp.float32)
  queries_NxTxD = jnp.broadcast_to(model.queries.get_value(), (tokens_NxL.shape[0],) + model.queries.shape)
  scores_NxHxTxL, _ = model.amortizer[0].scores(queries_NxTxD, h_NxLxC)
  probs = jax.nn.softmax(scores_NxHxTxL + jnp.where(mask_NxL > 0, 0.0, -1e30)[:, None, None, :], -1)
  entropy = -(probs * jnp.log(jnp.maximum(probs, 1e-30))).sum(-1).mean((1, 2))
  m_NxTxD = model.amortize(tokens_NxL, mask_NxL)
  n, t, _ = m_NxTxD.shape
  a_NxTxD = model.aggregate(jnp.zeros_like(m_NxTxD), m_NxTxD, jnp.ones((n, t), jnp.int32))
  pfx = model.prefix(a_NxTxD)
  per_doc = lambda x: jnp.moveaxis(x, 1, 0)  # the prefix's arrays are layer-major
  return {"encoder features, mean over tokens": spread((h_NxLxC * w_NxLx1).sum(1) / w_NxLx1.sum(1)),
          "encoder features, one token": spread(h_NxLxC[:, 1]),
          "amortizer output": spread(model.amortizer[0](queries_NxTxD, h_NxLxC, mask_NxL)),
          "modulation tokens": spread(m_NxTxD),
          "aggregated by a zero query": spread(a_NxTxD),
          "prefix keys": spread(per_doc(pfx.k_NxBxPxKxE)),
          "prefix values": spread(per_doc(pfx.v_NxBxPxKxE)),
          "amortizer attention entropy / ln(tokens)": float((entropy / jnp.log(mask_NxL.sum(-1))).mean())}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a workdir whose mac job has trained")
  parser.add_argument("--docs", type=int, default=16, help="meta-val documents")
  args = parser.parse_args()
  config = io_utils.workdir_config(args.workdir, "a mac training run")
  model = loading.load(config.model, sharding.job_mesh(config))
  data = data_lib.load(config.data, model.tokenizer, args.workdir)
  batch = pipeline.doc_batch(data.splits["meta_val"][:args.docs], data.spec, data.pad_id)
  tokens, mask = batch["doc_tokens_BxL"], batch["doc_mask_BxL"]
  trained = stages(*mac.load_trained(config, model, args.workdir), tokens, mask)
  untrained = stages(*mac.build(config.mac, model), tokens, mask)
  print(f"{'stage':42s} {'untrained':>10} {'trained':>10}")
  for k in trained:
    print(f"{k:42s} {untrained[k]:10.4f} {trained[k]:10.4f}")


if __name__ == "__main__":
  main()
