"""Pool finished evaluations of the same config on different data splits into one table.

One SQuAD article split is an anecdote: the test stream is a few articles, and which method wins moves with
them. Run the same config with several `data.split_seed`s, then

  python -m camels_jax.pool --workdirs runs/sq0,runs/sq1,runs/sq2 --out runs/squad_pooled.json

reads each workdir's eval/results.json and eval/predictions/*_detail.json (the per-question scores) and
prints, per method, each split's and the pooled F1 and answer NLL with paired 95% intervals against
uniform and against no adaptation. Pooled intervals resample the questions of all splits together (each
question one unit, as within a split), so a split with more questions weighs more; they say nothing about
articles no split holds.

A split's per-question scores can be kept without its workdir (and without the dataset's text that the
predictions hold): `--export FILE` with one workdir writes them as strict JSON, and such a file stands for the
workdir in `--workdirs` (configs/expected/squad_cpu_scores/ holds those of the README's SQuAD table).

Strict JSON with --out. A workdir without a finished evaluation, or whose questions differ between methods,
is one line on stderr and exit 2.
"""

import argparse
import json
import os
import sys

import numpy as np

from camels_jax import io_utils, stats
from camels_jax.report import interval, prediction_file_name

NO_ADAPTATION = "no_adaptation"
METRICS = ("f1", "nll")


class PoolError(Exception):
  pass


def _read(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise PoolError(f"{path}: missing (is the evaluation of that workdir finished?)") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise PoolError(f"{path}: unreadable ({e})") from None


SCORES_FORMAT = "camels_jax.pool scores v1"


def load_split(workdir: str) -> dict:
  """One finished evaluation: {"label", "methods": {name: {"lr", "ids", "f1", "nll"}}} (no adaptation
  included), every method's per-question arrays in the order of no adaptation's question ids. `workdir` may
  also be a file written by `export`."""
  if workdir.endswith(".json") and not os.path.isdir(workdir):
    return _load_scores(workdir)
  eval_dir = os.path.join(workdir, "eval")
  results = _read(os.path.join(eval_dir, "results.json"))
  config_path = os.path.join(workdir, "config.json")
  seed = _read(config_path).get("data", {}).get("split_seed") if os.path.exists(config_path) else None
  names = [NO_ADAPTATION] + list(results.get("methods", {}))
  methods = {}
  for name in names:
    path = os.path.join(eval_dir, "predictions", prediction_file_name(name) + "_detail.json")
    rows = _read(path)
    try:
      by_id = {r["id"]: r for r in rows}
      ids = [r["id"] for r in rows]
      lr = None if name == NO_ADAPTATION else results["methods"][name].get("lr")
    except (TypeError, KeyError) as e:
      raise PoolError(f"{path}: not a list of per-question records ({e!r} missing)") from None
    if name != NO_ADAPTATION and sorted(ids) != sorted(methods[NO_ADAPTATION]["ids"]):
      raise PoolError(f"{path}: its questions differ from no adaptation's in {eval_dir}; pairs need the "
                      "same questions")
    order = methods[NO_ADAPTATION]["ids"] if methods else ids
    methods[name] = {"lr": lr, "ids": order,
                     **{m: np.array([float(by_id[i][m]) for i in order], np.float64) for m in METRICS}}
  label = os.path.basename(os.path.normpath(workdir)) + ("" if seed is None else f" (split_seed {seed})")
  return {"label": label, "workdir": workdir, "methods": methods}


def export(split: dict) -> dict:
  """`split` (from load_split) as a strict-JSON object that `load_split` reads back."""
  return {"format": SCORES_FORMAT, "label": split["label"],
          "methods": {n: {"lr": m["lr"], "ids": list(m["ids"]), **{k: m[k].tolist() for k in METRICS}}
                      for n, m in split["methods"].items()}}


def _load_scores(path: str) -> dict:
  obj = _read(path)
  if not isinstance(obj, dict) or obj.get("format") != SCORES_FORMAT:
    raise PoolError(f"{path}: not a scores file of `pool --export` (its \"format\" is not {SCORES_FORMAT!r})")
  methods = {}
  try:
    for name, m in obj["methods"].items():
      arrays = {k: np.asarray(m[k], np.float64) for k in METRICS}
      if any(a.shape != (len(m["ids"]),) for a in arrays.values()):
        raise PoolError(f"{path}: methods.{name}: ids, f1 and nll differ in length")
      if sorted(m["ids"]) != sorted(obj["methods"][NO_ADAPTATION]["ids"]):
        raise PoolError(f"{path}: methods.{name}: its questions differ from no adaptation's; pairs need the "
                        "same questions")
      methods[name] = {"lr": m["lr"], "ids": list(m["ids"]), **arrays}
  except (TypeError, KeyError, ValueError) as e:
    raise PoolError(f"{path}: malformed scores file ({e!r})") from None
  # Pairs are by position below (pool concatenates arrays): every method in no adaptation's order.
  order = methods[NO_ADAPTATION]["ids"]
  for m in methods.values():
    index = {q: i for i, q in enumerate(m["ids"])}
    for k in METRICS:
      m[k] = m[k][[index[q] for q in order]]
    m["ids"] = list(order)
  return {"label": obj["label"], "workdir": path, "methods": methods}


def _summary(split_arrays: list[dict], name: str, boot: dict) -> dict:
  """Scores of `name` over the given splits' questions together, with paired intervals."""
  cat = lambda n, m: np.concatenate([s[n][m] for s in split_arrays])
  out = {"n": int(sum(len(s[name]["f1"]) for s in split_arrays)),
         **{m: stats.bootstrap_ci(cat(name, m), **boot) for m in METRICS}}
  if name != NO_ADAPTATION:
    out["vs_no_adaptation"] = {m: stats.paired_bootstrap_ci(cat(name, m), cat(NO_ADAPTATION, m), **boot)
                               for m in METRICS}
  if name not in (NO_ADAPTATION, "uniform") and all("uniform" in s for s in split_arrays):
    out["vs_uniform"] = {m: stats.paired_bootstrap_ci(cat(name, m), cat("uniform", m), **boot)
                         for m in METRICS}
  return out


def pool(splits: list[dict], resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
  """Each split's and the pooled scores of every method that all splits evaluated."""
  if not splits:
    raise PoolError("no workdirs to pool")
  names = [n for n in splits[0]["methods"] if all(n in s["methods"] for s in splits)]
  boot = dict(n_boot=resamples, seed=seed, level=level)
  arrays = [s["methods"] for s in splits]
  return {
      "splits": [{"label": s["label"], "workdir": s["workdir"],
                  "lr": {n: s["methods"][n]["lr"] for n in names if n != NO_ADAPTATION},
                  "methods": {n: _summary([a], n, boot) for n in names}} for s, a in zip(splits, arrays)],
      "pooled": {n: _summary(arrays, n, boot) for n in names},
      "bootstrap": {"resamples": resamples, "seed": seed, "level": level},
  }


def markdown(pooled: dict) -> str:
  """One table: a row per method and split (then pooled): F1, NLL, and the paired differences."""
  head = ("| method | split | lr | n | F1 | F1 − uniform | answer NLL (question mean) "
          "| NLL − no adaptation | NLL − uniform |\n|---|---|---|---|---|---|---|---|---|")
  lines = [head]
  blocks = [(s["label"], s["methods"], s["lr"]) for s in pooled["splits"]] + [("pooled", pooled["pooled"], {})]
  for name in pooled["pooled"]:
    for label, methods, lrs in blocks:
      r, lr = methods[name], lrs.get(name)
      vs_uniform, vs_none = r.get("vs_uniform", {}), r.get("vs_no_adaptation", {})
      lines.append("| " + " | ".join([
          name, label, "-" if lr is None else f"{lr:g}", str(r["n"]), interval(r["f1"]),
          interval(vs_uniform.get("f1"), signed=True), interval(r["nll"]),
          interval(vs_none.get("nll"), signed=True), interval(vs_uniform.get("nll"), signed=True)]) + " |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdirs", required=True, help="comma-separated workdirs of finished evaluations")
  parser.add_argument("--out", default="", help="write the pooled results here as strict JSON")
  parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (>= 1)")
  parser.add_argument("--export", default="", help="with one workdir: write its per-question scores here "
                      "(strict JSON, usable in --workdirs) instead of pooling")
  args = parser.parse_args(argv)
  try:
    workdirs = [w.strip() for w in args.workdirs.split(",") if w.strip()]
    if args.export:
      if len(workdirs) != 1:
        raise PoolError(f"--export takes one workdir, got {len(workdirs)}")
      io_utils.write_json(args.export, export(load_split(workdirs[0])))
      return 0
    if args.resamples < 1:
      raise PoolError(f"--resamples={args.resamples} must be >= 1")
    result = pool([load_split(w) for w in workdirs], resamples=args.resamples)
  except PoolError as e:
    print(f"pool: {e}", file=sys.stderr)
    return 2
  print(markdown(result), end="")
  if args.out:
    io_utils.write_json(args.out, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
