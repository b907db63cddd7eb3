"""The FWL paper's from-scratch comparison: a small decoder trained with the FWL head against the same decoder
trained without it, for the same steps on the same windows, scored on the test articles.

  python -m camels_jax.train --config configs/fwl_small.py --workdir runs/fwl_small \
      --config.text.text_file=../shared/data/wikitext2_raw_test.txt
  python -m camels_jax.train --config configs/fwl_small.py --workdir runs/fwl_small_baseline \
      --config.text.text_file=../shared/data/wikitext2_raw_test.txt --config.fwl.fast_weights=false
  python -m bench.fwl_from_scratch --fwl runs/fwl_small --baseline runs/fwl_small_baseline [--json F]

Both runs start from the same random body (same seed) and read the same windows in the same order; only the
training loss differs (`fwl.fast_weights`). Each selected its checkpoint on the validation articles; this
scores the test articles (never read in training) in windows of the training length, each model on the same
tokens and contexts: the FWL model, its own body without the head, and the baseline. Differences are paired
over tokens with a 95% bootstrap interval. It also prints both validation curves. Nothing is asserted; the
time comparison is bench.fwl_vs_dynamic's.
"""

import argparse

import numpy as np

from camels_jax import checks, io_utils, stats
from camels_jax.data import text as text_lib
from camels_jax.methods import fwl
from camels_jax.models import loading

# Fields that may differ between the two runs: where they ran, and the one switch being compared.
_MAY_DIFFER = {"workdir", "fwl.fast_weights"}


def check_pair(fwl_config, baseline_config) -> None:
  a, b = checks.leaves(fwl_config), checks.leaves(baseline_config)
  a.setdefault("fwl.fast_weights", True)  # a workdir from before the field
  if a["fwl.fast_weights"] is not True or b.get("fwl.fast_weights") is not False:
    raise SystemExit("--fwl must be a run with fwl.fast_weights=True and --baseline one with fwl.fast_weights=False")
  diffs = sorted(k for k in set(a) | set(b) if k not in _MAY_DIFFER and a.get(k) != b.get(k))
  if diffs:
    raise SystemExit("the two runs differ in more than the head: " + "; ".join(
        f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in diffs))


def scores(model, config, workdir: str, ids, targets: int, batch_size: int):
  """(fast nll_T, static nll_T) of the best checkpoint of the run in `workdir` on `ids`."""
  head_graphdef, trainable = fwl.load_trained(config, model, workdir)
  body = trainable.get("body", model.params)

  return fwl.token_scores(model.graphdef, body, head_graphdef, trainable["head"], ids, targets, batch_size,
                          config.fwl.chunk, progress=True)


def print_curves(runs: dict) -> None:
  histories = {name: {h["step"]: h for h in io_utils.read_workdir_json(w, "train_results.json",
                                                                       "a finished fwl train job")["fwl"]["history"]}
               for name, w in runs.items()}
  steps = sorted(set().union(*histories.values()))
  print("\nvalidation perplexity against the training step:\n")
  print("| step | " + " | ".join(histories) + " |\n|---|" + "---|" * len(histories))
  for s in steps:
    cells = [f"{h[s]['val_ppl']:.3f}" + ("*" if h[s].get("is_best") else "") if s in h else "-"
             for h in histories.values()]
    print(f"| {s} | " + " | ".join(cells) + " |")
  print("(* a new best: the checkpoint scored below is the last one marked)")


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--fwl", required=True, help="workdir of the run trained with the FWL head")
  parser.add_argument("--baseline", required=True, help="workdir of the same run with fwl.fast_weights=false")
  parser.add_argument("--tokens", type=int, default=0, help="first test tokens scored (0 = all)")
  parser.add_argument("--json", default="", help="also write the results here (strict JSON)")
  args = parser.parse_args()

  configs = {w: io_utils.workdir_config(w, "a finished fwl train job") for w in (args.fwl, args.baseline)}
  config = configs[args.fwl]
  check_pair(config, configs[args.baseline])
  print_curves({"FWL": args.fwl, "without FWL": args.baseline})
  model = loading.load(config.model)
  train, val, test = text_lib.load_articles(config.text)
  ids = np.asarray(text_lib.token_stream(model.tokenizer, test), np.int32)[:args.tokens or None]
  targets = min(config.fwl.seq_len, model.cfg.max_len - 1)
  print(f"\ntest text: {len(test)} articles (validation {len(val)}, training {len(train)}), {len(ids)} tokens, "
        f"windows of {targets} predictions\n")

  fast_T, own_static_T = scores(model, config, args.fwl, ids, targets, config.fwl.batch_size)
  _, base_T = scores(model, configs[args.baseline], args.baseline, ids, targets, config.fwl.batch_size)
  rows = [("FWL (trained with the head)", fast_T), ("its body without the head", own_static_T),
          ("trained without FWL", base_T)]
  print("| model | test perplexity | NLL − trained without FWL |\n|---|---|---|")
  out = {"tokens": len(ids), "test_articles": len(test), "targets_per_window": targets, "rows": []}
  for name, nll_T in rows:
    d = stats.paired_bootstrap_ci(nll_T, base_T) if nll_T is not base_T else None
    diff = "-" if d is None else f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"
    print(f"| {name} | {np.exp(nll_T.mean()):.3f} | {diff} |")
    out["rows"].append({"model": name, "ppl": float(np.exp(nll_T.mean())), "nll_minus_baseline": d})
  if args.json:
    io_utils.write_json(args.json, out)


if __name__ == "__main__":
  main()
