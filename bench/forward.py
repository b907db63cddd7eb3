"""Forward and forward+backward throughput of SmolLM2-135M on 512-token sequences.

  python -m bench.forward [--batch 4] [--seq_len 512]

Prints tokens/s and achieved FLOP/s as a fraction of this machine's f32 matmul rate measured in the same
run (goal: >= 50% for forward+backward).
"""

import argparse

import jax
import numpy as np

from bench import common
from camels_jax.adapt import loss
from camels_jax.models import loading, transformer


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--remat", action="store_true")
  args = parser.parse_args()

  mc = loading.model_config("smollm2")
  mc.remat = args.remat
  model = loading.load(mc)
  cfg, graphdef, params = model.cfg, model.graphdef, model.params
  tokens_BxL = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq_len)).astype(np.int32)
  mask_BxL = np.ones_like(tokens_BxL)

  def lm_loss(params, tokens_BxL, mask_BxL):
    nll_BxL = loss.token_nll(transformer.apply(graphdef, params, tokens_BxL, mask_BxL), tokens_BxL)
    weight_BxL = loss.target_mask(mask_BxL)
    return (nll_BxL * weight_BxL).sum() / weight_BxL.sum()

  forward = jax.jit(lm_loss)
  forward_backward = jax.jit(jax.value_and_grad(lm_loss))

  peak = common.matmul_flops_per_s()
  flops = common.decoder_flops(cfg, args.batch, args.seq_len)
  tokens = args.batch * args.seq_len
  print(f"machine f32 matmul rate: {peak / 1e9:.1f} GFLOP/s ({jax.device_count()} {jax.devices()[0].platform} device(s))")
  for name, fn, mult in (("forward", forward, 1), ("forward+backward", forward_backward, 3)):
    sec = common.best_time(fn, params, tokens_BxL, mask_BxL)
    rate = mult * flops / sec
    print(f"{name:>17}: {tokens / sec:8.0f} tokens/s  {rate / 1e9:7.1f} GFLOP/s  "
          f"= {rate / peak:.0%} of the matmul rate  (batch {args.batch} x {args.seq_len}, {sec:.2f} s/step)")


if __name__ == "__main__":
  main()
