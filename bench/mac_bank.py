"""How MAC's answer cost grows with its memory bank: hierarchical aggregation in windows against one pass.

  python -m bench.mac_bank [--questions 16] [--docs 8,32,128,512]

For SmolLM2-135M's shapes and the default MAC (T = 8 tokens per document, 2 aggregation blocks), builds
banks of M random documents' modulation tokens and prints, per M: the bank's size, and for the prefix of
one batch of questions (question amortization + aggregation + projection) XLA's compiled memory and the
time, with `window` = 4 documents per pass (hierarchical) and with the whole bank in one pass.

Measured (2 CPU cores, 16 questions; the first column of MiB is about 210 MiB of MAC's own parameters):

    docs  bank MiB |  window 4: MiB       s |  one pass: MiB       s
       8      0.14 |          217.9   0.089 |          217.5   0.070
      32      0.56 |          220.3   0.159 |          219.6   0.073
     128      2.25 |          264.0   0.489 |          226.1   0.116
     512      9.00 |          447.1   1.943 |          271.0   0.190

The bank is shared by the questions (projected once), so one pass grows slowly; windows hold per-question
summaries at every level and cost more at these sizes.
"""

import argparse
import functools

import jax
import numpy as np

from bench import common
from camels_jax.adapt import online
from camels_jax.methods import mac
from camels_jax.models import loading


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--questions", type=int, default=16)
  parser.add_argument("--docs", default="8,32,128,512")
  parser.add_argument("--window", type=int, default=4)
  args = parser.parse_args()

  base = loading.load(loading.model_config("smollm2"))
  c = mac.mac_config()
  graphdef, params = mac.build(c, base)
  rng = np.random.default_rng(0)
  s = 32
  tokens_BxS = rng.integers(0, base.cfg.vocab_size, (args.questions, s)).astype(np.int32)
  mask_BxS = np.ones_like(tokens_BxS)
  loss_mask_BxS = np.zeros((args.questions, s), bool)
  loss_mask_BxS[:, 20:] = True
  print(f"{'docs':>6} {'bank MiB':>9} | {'window ' + str(args.window) + ': MiB':>14} {'s':>7} | "
        f"{'one pass: MiB':>14} {'s':>7}")
  for m in [int(x) for x in args.docs.split(",")]:
    bank_MxTxD = rng.normal(size=(m, c.tokens, base.cfg.d_model)).astype(np.float32)
    valid_M = np.ones(m, bool)
    row = [f"{m:>6} {bank_MxTxD.nbytes / 2**20:9.2f}"]
    for window in (args.window, m):
      fn = jax.jit(functools.partial(mac.prefix, graphdef, window=window))
      call = (params, tokens_BxS, mask_BxS, loss_mask_BxS, bank_MxTxD, valid_M)
      mib = online.compiled_bytes(fn.lower(*call).compile()) / 2**20
      row.append(f"{mib:14.1f} {common.best_time(fn, *call, repeats=2):7.3f}")
    print(" | ".join(row), flush=True)


if __name__ == "__main__":
  main()
