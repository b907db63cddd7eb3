"""Static evaluation, dynamic evaluation at its selected settings, Transformer-XL context with attention sinks, and
Fast Weight Layers on held-out WikiText-2 test articles with SmolLM2-135M-Instruct, in one run.

  python -m camels_jax.perplexity --config configs/ppl_smollm2.py --workdir runs/ppl_sweep_overlap \
      --config.method=dynamic --config.sweep.enabled=true --config.text_file=../shared/data/wikitext2_raw_test.txt
  python -m camels_jax.perplexity ... --workdir runs/ppl_sweep_xl --config.dynamic.context=xl \
      --config.dynamic.chunk=256 --config.dynamic.memory=256 --config.dynamic.sinks=4 \
      --config.sweep.optimizers=adam --config.sweep.val_tokens=0   (XL: Adam on all validation tokens)
  python -m bench.fwl_vs_dynamic --overlap_sweep runs/ppl_sweep_overlap --xl_sweep runs/ppl_sweep_xl \
      [--overlap_extra runs/ppl_sweep_more] [--tokens 16384] [--fwl_workdir runs/fwl_smollm2_wikitext] \
      [--json F] [--nll_out F.npz]

The two perplexity jobs select dynamic evaluation's optimizer, learning rate and decay on validation articles
(camels_jax/methods/dynamic_sweep.py); `--overlap_extra` pools more sweeps of the overlap setting (a wider
grid) with the first. This bench reads their selections, splits the text the same way and scores the first
`--tokens` tokens of the test articles with every variant, each at the settings its sweep selected. Per
variant: perplexity, NLL minus static overlap's paired over tokens with a bootstrap interval, and warm wall time
(each variant is compiled on a prefix first) against static overlap's. Wall times on a shared machine drift
by up to half between runs, so every variant is timed again in `--time_rounds` interleaved rounds on the first
`--time_tokens` tokens, and the time targets are read from the median of the per-round ratios. FWL needs a
head trained on the training articles: `--fwl_workdir` names a finished fwl train job's workdir; without one
the bench trains a head for `--fwl_steps` steps first (into a temporary workdir) and also reports FWL's
training throughput against a plain fine-tune step. The context table (static and tuned dynamic evaluation
at context 64..1024) also pairs dynamic evaluation at each length with static at every longer one. Nothing is
asserted; the targets are printed met or missed.

FWL is scored on the static windows' own tokens and contexts (`fwl.token_scores`), so it pairs with them and
with dynamic evaluation on those windows; its time is the FWL model's scoring (body and head, without also computing
the static NLLs), one window at a time as static's.

Measured (2 CPU cores, 16,384 test tokens, `--fwl_workdir` the head of configs/fwl_smollm2.py's docstring,
2026-12-05; README has the tables): static overlap 19.47; XL 256+256 with 4 sinks 19.78 (+1.6%) at 0.59x its
time (median of 3 rounds), without sinks 37.58; dynamic overlap at Adam 1e-4 (selected) 15.22; dynamic XL + sinks
at Adam 1e-4 (selected) 15.34 (+0.8%) at 0.41x dynamic overlap's time; on 512-token windows static 24.95, FWL
19.02 (0.85x static's time), dynamic 18.28 (FWL − dynamic +0.040 nats [+0.025, +0.055]). Context 64 / 128 / 256 /
512 / 1024: static 39.19 / 28.36 / 22.70 / 19.47 / 17.38, dynamic 18.75 / 16.92 / 15.88 / 15.22 / 14.73.
"""

import argparse
import dataclasses
import functools
import os
import statistics
import tempfile
import time

import jax
import ml_collections
import numpy as np

from bench import common
from camels_jax import io_utils, perplexity, plots, stats
from camels_jax.adapt import inner, online
from camels_jax.data import text as text_lib
from camels_jax.methods import dynamic_eval, dynamic_sweep, fwl
from camels_jax.models import loading

@dataclasses.dataclass
class Variant:
  name: str
  dynamic: bool
  overrides: dict
  sweep: str = ""  # "overlap" / "xl": the sweep whose selection sets optimizer, lr and decay


OVERLAP = dict(context="overlap", window=512, stride=256)
XL = dict(context="xl", chunk=256, memory=256)
SINKS = 4

STATIC_OVERLAP, STATIC_WINDOWS = "static, overlap 512/256", "static, windows 512 (no overlap)"
STATIC_XL_SINKS = f"static, xl 256 + memory 256 + {SINKS} sinks"
DYNAMIC_OVERLAP, DYNAMIC_WINDOWS = "dynamic, overlap 512/256", "dynamic, windows 512 (no overlap)"
DYNAMIC_XL_SINKS = f"dynamic, xl 256 + memory 256 + {SINKS} sinks"
FWL_WINDOWS = "FWL, windows 512 (no overlap)"

VARIANTS = [
    Variant(STATIC_OVERLAP, False, OVERLAP),
    Variant(STATIC_WINDOWS, False, dict(context="overlap", window=512, stride=512)),
    Variant("static, xl 256 + memory 256", False, XL),
    Variant(STATIC_XL_SINKS, False, XL | dict(sinks=SINKS)),
    Variant(DYNAMIC_OVERLAP, True, OVERLAP, sweep="overlap"),
    # FWL's windows: the comparison the FWL paper makes (at the overlap sweep's selection).
    Variant(DYNAMIC_WINDOWS, True, dict(context="overlap", window=512, stride=512), sweep="overlap"),
    Variant(DYNAMIC_XL_SINKS, True, XL | dict(sinks=SINKS), sweep="xl"),
]


def section(overrides: dict, selected: dict | None = None) -> ml_collections.ConfigDict:
  """A `dynamic` section with `overrides`, at a sweep's selected optimizer, lr and decay when given."""
  c = dynamic_eval.dynamic_config()
  c.update(overrides)
  return dynamic_sweep.Candidate(**selected).section(c) if selected else c


def timed_score(model, ids, c, dynamic: bool, rms) -> tuple[np.ndarray, float]:
  """Per-token NLLs and the wall seconds of scoring `ids`, compiled first on a prefix."""
  warm = ids[:min(len(ids), 2 * max(c.window, c.sinks + c.chunk + c.memory) + 1)]
  score_with(model, c, dynamic, rms, warm)
  start = time.perf_counter()
  nll_T = score_with(model, c, dynamic, rms, ids, progress=True)
  return nll_T, time.perf_counter() - start


def read_sweep(workdir: str) -> tuple[dict, ml_collections.ConfigDict]:
  """(perplexity.json, config) of a finished perplexity job run with sweep.enabled."""
  result = io_utils.read_workdir_json(workdir, "perplexity.json", "a finished perplexity job with sweep.enabled")
  if "sweep" not in result:
    raise SystemExit(f"{workdir}/perplexity.json: that run had no sweep (run it with --config.sweep.enabled=true)")
  return result, io_utils.workdir_config(workdir, "a perplexity job's workdir")


SELECTED_FIELDS = ("optimizer", "lr", "decay")


def merge_sweeps(base: tuple, extras: dict) -> tuple[dict, ml_collections.ConfigDict]:
  """One sweep from `base` and sweeps that extend its grid (more lrs or optimizers) on the same validation tokens
  and segmentation ({workdir: (result, config)}): candidates pooled, the grids' values united, the winner and
  its edges taken again."""
  result, config = base
  result = dict(result, sweep=dict(result["sweep"]))
  grid = ml_collections.ConfigDict(config.sweep.to_dict())
  candidates = list(result["sweep"]["candidates"])

  def setting(r, c):
    # A field added since a run (absent from its config) counts at its default; sink placement without sinks
    # is no setting at all.
    d = dynamic_eval.dynamic_config().to_dict() | c.dynamic.to_dict()
    ignored = SELECTED_FIELDS + (("sink_positions",) if not d["sinks"] else ())
    return {k: v for k, v in d.items() if k not in ignored}, c.text_file, r["split"], r["sweep"]["val_tokens"]

  for workdir, (r, c) in extras.items():
    if setting(r, c) != setting(result, config):
      raise SystemExit(f"--overlap_extra {workdir}: its segmentation, text, split or validation tokens differ from "
                       "the overlap sweep's; only sweeps of the same setting can be pooled")
    for opt in c.sweep.optimizers.split(","):
      if opt not in grid.optimizers.split(","):
        grid.optimizers += f",{opt}"
      for field in ([f"{opt}_lrs"] + (["rms_decays"] if opt == "rms" else [])):
        grid[field] = tuple(sorted(set(grid[field]) | set(c.sweep[field])))
    candidates += r["sweep"]["candidates"]
  # One row per candidate (a value both grids hold was scored twice, identically), in the pooled grid's order.
  scored = {tuple(r[k] for k in SELECTED_FIELDS): r for r in reversed(candidates)}
  candidates = [scored[(c.optimizer, c.lr, c.decay)] for c in dynamic_sweep.candidates(grid)
                if (c.optimizer, c.lr, c.decay) in scored]
  best = min((r for r in candidates if r["val_nll"] is not None), key=lambda r: r["val_nll"])
  winner = dynamic_sweep.Candidate(**{k: best[k] for k in SELECTED_FIELDS})
  result["sweep"].update(candidates=candidates, selected=dataclasses.asdict(winner),
                         edge=dynamic_sweep.edges(winner, grid),
                         optimizer_bests=dynamic_sweep.optimizer_bests(candidates, grid))
  config = ml_collections.ConfigDict(config.to_dict())
  config.sweep = grid
  return result, config


def print_selection(name: str, result: dict, grid: ml_collections.ConfigDict) -> None:
  sw = result["sweep"]
  print(f"\n{name} sweep: {len(sw['candidates'])} candidates on {result['split']['val_articles']} validation "
        f"articles ({sw['val_tokens']} tokens; static ppl {sw['static_val_ppl']:.3f}):\n")
  print("| optimizer | lr | decay | val ppl |\n|---|---|---|---|")
  for r in sw["candidates"]:
    mark = "**" if all(r[k] == sw["selected"][k] for k in ("optimizer", "lr", "decay")) else ""
    ppl = "diverged" if r["val_ppl"] is None else f"{mark}{r['val_ppl']:.{'3f' if r['val_ppl'] < 1e4 else '2g'}}{mark}"
    print(f"| {r['optimizer']} | {r['lr']:g} | {r['decay']:g} | {ppl} |")
  print(f"selected: {sw['selected']}" + (f"; EDGE: {'; '.join(sw['edge'])}" if sw["edge"] else "; inside the grid"))
  for b in dynamic_sweep.optimizer_bests(sw["candidates"], grid):
    if b["edge"]:
      print(f"  {b['optimizer']}'s own best is on its grid's edge: {'; '.join(b['edge'])}")


def fwl_config(args, text_file: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = ""
  c.jobs = "fwl"
  c.model = loading.model_config("smollm2")
  c.text = text_lib.text_config()
  c.text.text_file = text_file
  c.fwl = fwl.fwl_config()
  c.fwl.update(chunk=64, steps=args.fwl_steps, val_every=max(1, args.fwl_steps // 2), val_windows=8,
               seq_len=256, batch_size=4)
  return c


def train_throughput(model, config, head_graphdef, trainable, windows_NxL, masks_NxL, repeats: int = 3):
  """Tokens/s of an FWL training step and of a plain fine-tune step (full params, SGD) on the same windows."""
  c = config.fwl
  batch, mask = windows_NxL[:c.batch_size], masks_NxL[:c.batch_size]
  optimizer = fwl.make_optimizer(float(c.lr), float(c.body_lr), float(c.grad_clip), bool(c.train_body))
  tr = jax.tree.map(lambda x: x.copy(), trainable)
  opt_state = optimizer.init(tr)

  def fwl_step():
    nonlocal tr, opt_state
    tr, opt_state, v = fwl.train_step(model.graphdef, tr, opt_state, model.params, batch, mask,
                                      head_graphdef=head_graphdef, chunk=c.chunk, optimizer=optimizer)
    v.block_until_ready()

  icfg = inner.InnerConfig(padded_len=batch.shape[1])
  params = jax.tree.map(lambda x: x.copy(), model.params)
  direction = online.adam_direction(1e9)
  adam_state = direction.init(params)

  def plain_step():
    nonlocal params, adam_state
    params, adam_state, v = online.adapt_step(model.graphdef, params, adam_state, batch, mask,
                                              np.ones(batch.shape, np.float32), 1e-5, direction=direction, icfg=icfg)
    v.block_until_ready()

  out = {}
  for name, step in (("fwl", fwl_step), ("plain fine-tune", plain_step)):
    step()  # compile
    start = time.perf_counter()
    for _ in range(repeats):
      step()
    out[name] = batch.size * repeats / (time.perf_counter() - start)
  return out


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--overlap_sweep", required=True, help="workdir of the overlap 512/256 perplexity sweep")
  parser.add_argument("--overlap_extra", default="",
                      help="comma-separated workdirs of sweeps that extend the overlap sweep's grid (same setting)")
  parser.add_argument("--xl_sweep", required=True, help="workdir of the xl 256+256+sinks perplexity sweep")
  parser.add_argument("--tokens", type=int, default=16384)
  parser.add_argument("--fwl_workdir", default="")
  parser.add_argument("--fwl_steps", type=int, default=60)
  parser.add_argument("--contexts", default="64,128,256,512,1024",
                      help="context lengths of the static-vs-dynamic table (overlap windows moved by half); '' = none")
  parser.add_argument("--context_selected", default="",
                      help="a previous run's --json: take each context length's selected lr from it instead of "
                           "selecting again (the selection is deterministic; it saves ~7 min a length)")
  parser.add_argument("--plot", default="runs/bench/context_length.png", help="where the context-length plot goes")
  parser.add_argument("--no_fwl", action="store_true", help="leave FWL out (no head to train or load)")
  parser.add_argument("--json", default="", help="also write the rows here (strict JSON)")
  parser.add_argument("--nll_out", default="", help="also write every variant's per-token NLLs here (.npz)")
  parser.add_argument("--time_rounds", type=int, default=3,
                      help="rounds of interleaved timing of every variant (0 = only the one timed full pass)")
  parser.add_argument("--time_tokens", type=int, default=4096, help="tokens each variant scores per round")
  return parser.parse_args()


def main():
  args = parse_args()

  sweeps = {name: read_sweep(w) for name, w in (("overlap", args.overlap_sweep), ("xl", args.xl_sweep))}
  if args.overlap_extra:
    sweeps["overlap"] = merge_sweeps(sweeps["overlap"], {w: read_sweep(w) for w in args.overlap_extra.split(",")})
  job = sweeps["overlap"][1]
  for name, (result, config) in sweeps.items():
    print_selection(name, result, config.sweep)
  model = loading.load(loading.model_config("smollm2"))
  train, val, test = text_lib.split_three(perplexity.load_articles(job), job.sweep.val_fraction,
                                          job.sweep.heldout_fraction)
  ids = text_lib.token_stream(model.tokenizer, test)[:args.tokens]
  train_ids = text_lib.token_stream(model.tokenizer, train)
  print(f"\ntest text: {len(test)} WikiText-2 test articles (validation {len(val)}, training {len(train)}), "
        f"first {len(ids)} tokens")

  rows, nll, runners = [], {}, {}
  for v in VARIANTS:
    selected = sweeps[v.sweep][0]["sweep"]["selected"] if v.sweep else None
    c = section(v.overrides, selected)
    rms = None
    if v.dynamic and c.optimizer == "rms":
      rms = dynamic_eval.gradient_rms(model.graphdef, model.params, model.cfg, train_ids, c)
    nll_T, secs = timed_score(model, ids, c, v.dynamic, rms)
    runners[v.name] = functools.partial(score_with, model, c, v.dynamic, rms)
    nll[v.name] = nll_T
    rows.append({"variant": v.name, "settings": selected, "ppl": float(np.exp(nll_T.mean())), "seconds": secs})
    print(f"{v.name}: ppl {rows[-1]['ppl']:.3f} in {secs:.1f} s", flush=True)

  throughput = None if args.no_fwl else score_fwl(args, job.text_file, model, ids, rows, nll, runners)
  ratios = None
  if args.time_rounds:
    prefix = ids[:args.time_tokens]
    print(f"\ntiming every variant again on the first {len(prefix)} tokens, {args.time_rounds} interleaved rounds",
          flush=True)
    ratios = common.round_ratios(common.interleaved_seconds(
        {n: functools.partial(f, prefix) for n, f in runners.items()}, args.time_rounds), STATIC_OVERLAP)
  report(args, ids, test, rows, nll, throughput, ratios)
  if args.contexts:
    val_ids = text_lib.token_stream(model.tokenizer, val)
    contexts = [int(x) for x in args.contexts.split(",")]
    # Overlap 512/256 is the overlap sweep's own setting: its selection and the main table's scores stand.
    known = {OVERLAP["window"]: (nll[STATIC_OVERLAP], by_name(rows, STATIC_OVERLAP)["seconds"],
                                 nll[DYNAMIC_OVERLAP], by_name(rows, DYNAMIC_OVERLAP)["seconds"])}
    previous = read_context_selection(args.context_selected, contexts) if args.context_selected else {}
    ctx, ctx_nll = context_rows(model, sweeps["overlap"], train_ids, val_ids, ids, contexts, known, previous)
    cross = cross_length_rows(ctx_nll)
    print_cross_length(cross)
    plots.plot_context_length(args.plot, ctx)
    print(f"plot: {args.plot}")
    nll |= {f"{kind}, overlap {n}/{max(1, n // 2)}": t for n, pair in ctx_nll.items()
            for kind, t in zip(("static", "dynamic"), pair)}
    if args.json:
      io_utils.write_json(args.json, {"tokens": len(ids), "test_articles": len(test), "rows": rows,
                                      "time_rounds": ratios, "contexts": ctx, "cross_length": cross})
  if args.nll_out:
    write_nll(args.nll_out, nll)


def score_with(model, c, dynamic: bool, rms, token_ids, progress: bool = False):
  return dynamic_eval.score(model.graphdef, model.params, model.cfg, token_ids, c, dynamic=dynamic, rms=rms,
                            progress=progress).nll_T


def write_nll(path: str, nll: dict) -> None:
  """Every variant's per-token NLLs, all on the same tokens: `names` and `nll_VxT` (row v is names[v]'s), written
  whole or not at all."""
  lengths = {n: len(t) for n, t in nll.items()}
  if len(set(lengths.values())) != 1:
    raise SystemExit(f"--nll_out: the variants scored different numbers of tokens: {lengths}")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, names=np.array(list(nll)), nll_VxT=np.stack([np.asarray(t, np.float32) for t in nll.values()]))
  os.replace(tmp, path)
  print(f"per-token NLLs: {path}")


def by_name(rows: list, name: str) -> dict:
  return next(r for r in rows if r["variant"] == name)


def read_context_selection(path: str, contexts: list[int]) -> dict:
  """{length: {"selected", "edge"}} of a previous run's --json, for every length in `contexts` but overlap's."""
  rows = {r["context"]: r for r in io_utils.read_workdir_json(os.path.dirname(path) or ".", os.path.basename(path),
                                                        "a previous bench run (its --json)").get("contexts", [])}
  missing = [n for n in contexts if n not in rows and n != OVERLAP["window"]]
  if missing:
    raise SystemExit(f"{path}: no context rows for lengths {missing} (it has {sorted(rows)})")
  return {n: {"selected": rows[n]["selected"], "edge": rows[n]["edge"]} for n in contexts if n in rows}


def context_rows(model, overlap_sweep, train_ids, val_ids, ids, contexts, known: dict,
                 previous: dict) -> tuple[list[dict], dict]:
  """Static and dynamic evaluation with overlapping windows of each context length (moved by half a window).
  Dynamic evaluation's lr is selected again on the validation articles for every length, over the overlap
  sweep's grid of the optimizer (and decay) that sweep selected. `known`: {length: (static nll_T, seconds,
  dynamic nll_T, seconds)} already scored at the overlap sweep's own setting and selection; `previous`:
  {length: {"selected", "edge"}} selections taken from an earlier run instead of selecting again. Returns the
  rows and {length: (static nll_T, dynamic nll_T)}."""
  result, job = overlap_sweep
  won = result["sweep"]["selected"]
  grid = ml_collections.ConfigDict(job.sweep.to_dict())
  grid.update(optimizers=won["optimizer"], rms_decays=(won["decay"],))
  rows, ctx_nll = [], {}
  print(f"\ncontext lengths {contexts}: {won['optimizer']} lrs {list(grid[won['optimizer'] + '_lrs'])} selected "
        f"again on validation for each\n")
  print("| context | static ppl | static s | selected lr | dynamic ppl | dynamic − static NLL | dynamic s |")
  print("|---|---|---|---|---|---|---|")
  for n in contexts:
    c = section(dict(context="overlap", window=n, stride=max(1, n // 2)))
    if n in known and n // 2 == OVERLAP["stride"]:
      report = result["sweep"]
      static_T, static_s, dynamic_T, dynamic_s = known[n]
    else:
      if n in previous:
        report, rms = previous[n], None
        if report["selected"]["optimizer"] == "rms":
          rms = dynamic_eval.gradient_rms(model.graphdef, model.params, model.cfg, train_ids, c)
      else:
        report, rms = dynamic_sweep.select(model.graphdef, model.params, model.cfg, c, grid, train_ids, val_ids,
                                           progress=False)
      chosen = dynamic_sweep.Candidate(**report["selected"]).section(c)
      static_T, static_s = timed_score(model, ids, c, False, None)
      dynamic_T, dynamic_s = timed_score(model, ids, chosen, True, rms)
    ctx_nll[n] = (static_T, dynamic_T)
    d = stats.paired_bootstrap_ci(dynamic_T, static_T)
    base = float(static_T.mean())
    rows.append({"context": n, "selected": report["selected"], "edge": report["edge"],
                 "static": {"ppl": float(np.exp(base)), "seconds": static_s},
                 "dynamic": {"ppl": float(np.exp(dynamic_T.mean())), "seconds": dynamic_s,
                             "ppl_lo": float(np.exp(base + d["lo"])), "ppl_hi": float(np.exp(base + d["hi"])),
                             "nll_minus_static": d}})
    edge = " (EDGE)" if report["edge"] else ""
    print(f"| {n} | {rows[-1]['static']['ppl']:.3f} | {static_s:.1f} | {report['selected']['lr']:g}{edge} | "
          f"{rows[-1]['dynamic']['ppl']:.3f} | {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] | "
          f"{dynamic_s:.1f} |", flush=True)
  return rows, ctx_nll


def cross_length_rows(ctx_nll: dict) -> list[dict]:
  """Dynamic evaluation at each context length against static evaluation at every longer one, paired over
  the same tokens: does online learning let a shorter context stand in for a longer one?"""
  out = []
  for n, (_, dynamic_T) in sorted(ctx_nll.items()):
    for m, (static_T, _) in sorted(ctx_nll.items()):
      if m > n:
        d = stats.paired_bootstrap_ci(dynamic_T, static_T)
        out.append({"dynamic_context": n, "static_context": m, "dynamic_ppl": float(np.exp(dynamic_T.mean())),
                    "static_ppl": float(np.exp(static_T.mean())), "nll_dynamic_minus_static": d})
  return out


def print_cross_length(cross: list[dict]) -> None:
  if not cross:
    return
  print("\ndynamic at a shorter context against static at a longer one, NLL paired over tokens (95% bootstrap):\n")
  print("| dynamic context | static context | dynamic ppl | static ppl | NLL dynamic − static | shorter better |")
  print("|---|---|---|---|---|---|")
  for r in cross:
    d = r["nll_dynamic_minus_static"]
    verdict = "yes" if d["hi"] < 0 else ("no" if d["lo"] > 0 else "tie")
    print(f"| {r['dynamic_context']} | {r['static_context']} | {r['dynamic_ppl']:.3f} | {r['static_ppl']:.3f} | "
          f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] | {verdict} |")


def score_fwl(args, text_file: str, model, ids, rows: list, nll: dict, runners: dict) -> dict | None:
  """Appends FWL's row and per-token NLLs (on the tokens and contexts of the non-overlapping 512-token windows),
  training a head first without `--fwl_workdir`; FWL's training throughput when the bench trained it."""
  fwl_workdir = args.fwl_workdir
  if fwl_workdir:
    config = io_utils.workdir_config(fwl_workdir, "a finished fwl train job")
  else:
    config = fwl_config(args, text_file)
    fwl_workdir = tempfile.mkdtemp(prefix="fwl_bench_")
    start = time.perf_counter()
    _, _, res = fwl.fit(config, model, fwl_workdir, _NullWriter(), progress=True)
    print(f"FWL head trained for {config.fwl.steps} steps in {time.perf_counter() - start:.0f} s: validation "
          f"ppl {res['best']['val_ppl']:.3f} (static {res['best']['val_static_ppl']:.3f})")
  head_graphdef, trainable = fwl.load_trained(config, model, fwl_workdir)
  body = trainable.get("body", model.params)

  # The static windows' tokens and contexts, so they pair up; one window at a time, as dynamic_eval scores them.
  def scores(token_ids, progress=False, with_static=False):
    return fwl.token_scores(model.graphdef, body, head_graphdef, trainable["head"], token_ids, 512, 1,
                            config.fwl.chunk, progress, with_static)

  scores(ids[:2 * 512 + 1])  # compile
  start = time.perf_counter()
  fast_T, _ = scores(ids, progress=True)  # timed: FWL alone
  secs = time.perf_counter() - start
  _, static_T = scores(ids[:4 * 512 + 1], with_static=True)  # a check of the pairing
  gap = float(np.abs(static_T - nll[STATIC_WINDOWS][:len(static_T)]).max())
  print(f"FWL: ppl {np.exp(fast_T.mean()):.3f} in {secs:.1f} s (on its first windows its static NLLs differ from "
        f"the static windows' by at most {gap:.1e} per token)", flush=True)
  nll[FWL_WINDOWS] = fast_T
  runners[FWL_WINDOWS] = lambda token_ids: scores(token_ids)[0]
  rows.append({"variant": FWL_WINDOWS, "settings": None, "ppl": float(np.exp(fast_T.mean())), "seconds": secs,
               "fwl_workdir": fwl_workdir})
  if args.fwl_workdir:
    return None
  train_windows, train_masks = text_lib.windows(ids, config.fwl.seq_len, model.tokenizer.pad_id)
  return train_throughput(model, config, head_graphdef, trainable, train_windows, train_masks)


def report(args, ids, test, rows: list, nll: dict, throughput: dict | None, ratios: dict | None) -> None:
  ref = STATIC_OVERLAP
  by = {r["variant"]: r for r in rows}
  print(f"\n{len(ids)} test tokens; times exclude compilation; relative to static overlap 512/256; "
        f"NLL − static overlap paired over tokens, 95% bootstrap interval:\n")
  head = "" if not ratios else f" | time vs static, {len(ratios[ref]['ratios'])} rounds: median [min, max]"
  print(f"| variant | selected on validation | perplexity | NLL − static overlap | wall s | time vs static{head} |")
  print("|---|---|---|---|---|---|" + ("---|" if ratios else ""))
  for r in rows:
    if r["variant"] in nll and r["variant"] != ref:
      d = stats.paired_bootstrap_ci(nll[r["variant"]], nll[ref])
      r["nll_minus_static_overlap"] = d
      diff = f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"
    else:
      diff = "-"
    sel = r["settings"]
    sel = "-" if not sel else f"{sel['optimizer']} lr {sel['lr']:g}" + (
        f" decay {sel['decay']:g}" if sel["optimizer"] == "rms" else "")
    rounds = ""
    if ratios:
      q = r["time_rounds"] = ratios[r["variant"]]
      rounds = f" {q['median']:.2f}x [{q['lo']:.2f}, {q['hi']:.2f}] |"
    print(f"| {r['variant']} | {sel} | {r['ppl']:.3f} | {diff} | {r['seconds']:.1f} | "
          f"{r['seconds'] / by[ref]['seconds']:.2f}x |{rounds}")

  def time_ratio(name, other):
    """The median over the interleaved rounds when there were any, else the one full pass's ratio."""
    if not ratios:
      return by[name]["seconds"] / by[other]["seconds"], ""
    t = statistics.median(a / b for a, b in zip(ratios[name]["ratios"], ratios[other]["ratios"]))
    return t, f" (median of {len(ratios[name]['ratios'])} interleaved rounds)"

  def target(name, other, what):
    a, b = by[name], by[other]
    ratio, (t, how) = a["ppl"] / b["ppl"], time_ratio(name, other)
    met = "met" if ratio <= 1.03 and t <= 0.6 else "missed"
    print(f"{what}: ppl {a['ppl']:.3f} vs {b['ppl']:.3f} ({(ratio - 1) * 100:+.1f}%, target within +3%) at "
          f"{t:.2f}x the time{how} (target <= 0.6x): {met}")

  print()
  target(STATIC_XL_SINKS, ref, "static XL with sinks against static overlap")
  target(DYNAMIC_XL_SINKS, DYNAMIC_OVERLAP, "dynamic XL with sinks against dynamic overlap")
  window = by[STATIC_WINDOWS]
  gains = {}
  for name in (DYNAMIC_WINDOWS, FWL_WINDOWS):
    if name in by:
      d = gains[name] = stats.paired_bootstrap_ci(nll[name], nll[STATIC_WINDOWS])
      print(f"{name} against static on the same windows: ppl {by[name]['ppl']:.3f} vs {window['ppl']:.3f} "
            f"({(by[name]['ppl'] / window['ppl'] - 1) * 100:+.1f}%; NLL {d['mean']:+.4f} [{d['lo']:+.4f}, "
            f"{d['hi']:+.4f}]), time {'{:.2f}x{}'.format(*time_ratio(name, STATIC_WINDOWS))}")
  if FWL_WINDOWS in gains:
    f, dyn = gains[FWL_WINDOWS], gains[DYNAMIC_WINDOWS]
    d = stats.paired_bootstrap_ci(nll[FWL_WINDOWS], nll[DYNAMIC_WINDOWS])
    t, how = time_ratio(FWL_WINDOWS, STATIC_WINDOWS)
    met = "met" if f["mean"] <= dyn["mean"] and t <= 1.5 else "missed"
    print(f"FWL's gain against tuned dynamic evaluation's on those windows: NLL {f['mean']:+.4f} vs {dyn['mean']:+.4f} "
          f"(FWL − dynamic {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]; target <= 0) at {t:.2f}x static's "
          f"time{how} (target <= 1.5x): {met}")
    by[FWL_WINDOWS]["nll_minus_dynamic_windows"] = d
  if throughput:
    print(f"training throughput: FWL step {throughput['fwl']:.0f} tokens/s, plain fine-tune step "
          f"{throughput['plain fine-tune']:.0f} tokens/s ({throughput['fwl'] / throughput['plain fine-tune']:.2f}x)")
  if args.json:
    io_utils.write_json(args.json, {"tokens": len(ids), "test_articles": len(test), "rows": rows,
                                    "time_rounds": ratios})


class _NullWriter:
  def write_scalars(self, step, scalars):
    del step, scalars


if __name__ == "__main__":
  main()
