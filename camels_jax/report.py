"""Results in words and files: the terminal table, results.md, results.json, predictions, plots.

Everything here reads results (the dicts `evaluation.run` and `train.run` return, as their JSON files hold
them) and computes nothing the results do not already hold; the number and interval formatters every
output shares are defined once, here.
"""

import math
import os
import re
import shutil
import tempfile

from camels_jax import io_utils, plots, qa

# The per-question test metrics with an interval, in the tables' column order.
CI_METRICS = qa.GENERATED_METRICS
BANK_SIZE_PLOT = "mac_bank_size.png"  # <workdir>/eval/: MAC's answer NLL and F1 against its bank's size
BASELINE_KEY = "vs_uniform"  # results.json's paired comparison of a method with the baseline (uniform)


# ------------------------------------------------------------------------------------------------
# Formatters.


def num(x, spec: str = ".4f") -> str:
  """`x` formatted by `spec`, or "-" when it is missing or not finite."""
  return "-" if x is None or not math.isfinite(x) else format(x, spec)


def interval(ci, spec: str = ".3f", signed: bool = False) -> str:
  """A mean with its interval, e.g. 0.123 [0.101, 0.150] (signed: +0.012 [-0.030, +0.050]); - if none."""
  if not ci or ci.get("mean") is None:
    return "-"
  f = ("+" if signed else "") + spec
  return f"{ci['mean']:{f}} [{ci['lo']:{f}}, {ci['hi']:{f}}]"


def _metric_cell(scores: dict, metric: str) -> str:
  ci = scores.get("ci", {}).get(metric)
  return interval(ci) if ci else num(scores.get(metric), ".3f")


def _lr(r: dict) -> str:
  if r.get("lr") == 0:
    return "none"  # no adaptation won the sweep
  if r.get("lr_edge"):
    return f"{r['lr']:g}{'↑' if r['lr_edge'] == 'high' else '↓'}"
  return "-" if r.get("lr") is None else f"{r['lr']:g}"


def _best_method(results: dict):
  def f1(method):
    x = results["methods"][method]["test"].get("f1")
    return x if x is not None and math.isfinite(x) else -math.inf
  return max(results["methods"], key=f1, default=None)


def _aligned(rows) -> list[str]:
  """Rows of cells as left-aligned text columns, the first row underlined."""
  widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
  return lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:]


# ------------------------------------------------------------------------------------------------
# The evaluation: terminal and Markdown.


def cost_lines(results: dict) -> list[str]:
  """Adaptation time per document ("-" where no adaptation was chosen) and memory of each method, and each
  method against the ones it is compared with beside uniform (e.g. MAC against CaMeLS) (Markdown)."""
  methods = results["methods"]
  if not methods:
    return []
  lines = ["| method | adapt s / document | adapt memory (MiB) | memory bank (MiB) |", "|---|---|---|---|"]
  mib = lambda x: num(None if x is None else x / 2**20, ".2f")
  # Where "no adaptation" won the sweep the test stream was not adapted on: its cost is not measured.
  per_doc = lambda m: None if methods[m].get("lr") == 0 else methods[m].get("time_s", {}).get("adapt_per_doc")
  for method, r in methods.items():
    mem = r.get("memory_bytes", {})
    lines.append(f"| {method} | {num(per_doc(method), '.3f')} | {mib(mem.get('adapt'))} | "
                 f"{mib(mem.get('bank'))} |")
  for method, r in methods.items():
    for key, vs in r.items():
      other = key.removeprefix("vs_")
      if key == BASELINE_KEY or other == key or other not in methods:
        continue
      ratio = per_doc(method) / per_doc(other) if per_doc(method) is not None and per_doc(other) else None
      lines += ["", f"{method} / {other} adaptation time per document: {num(ratio, '.3f')}x; {method} − {other} "
                f"F1 {interval(vs.get('f1'), signed=True)} (paired, same questions)."]
  return lines


def table(results: dict) -> str:
  """The compact test table printed at the end of the evaluation (a terminal's width); the full one,
  with official SQuAD scores, the lr sweep and retention, is `markdown` (results.md)."""
  na = results["no_adaptation"]
  rows = [["method", "lr", "F1 [95% CI]", "F1 - uniform [95% CI]", "EM", "prefix EM", "NLL", "uptake",
           "facts/filler"],
          ["no adaptation", "-", _metric_cell(na, "f1"), "-", num(na["em"], ".3f"), num(na["prefix_em"], ".3f"),
           num(na["nll"], ".3f"), "-", "-"]]
  for method, r in results["methods"].items():
    t = r["test"]
    rows.append([method, _lr(r), _metric_cell(t, "f1"), interval(r.get(BASELINE_KEY, {}).get("f1"), signed=True),
                 num(t["em"], ".3f"), num(t["prefix_em"], ".3f"), num(t["nll"], ".3f"),
                 num(r.get("uptake"), "+.3f"), num(r.get("weights", {}).get("facts_filler"), ".2f")])
  notes = [
      f"{results['test_docs']} test documents, {results['test_questions']} questions; [95% CI]: bootstrap over "
      "the questions",
      "(F1 - uniform: paired, same questions). NLL: test answer NLL; uptake: no-adaptation NLL - the method's.",
      "facts/filler: mean token weight on answer spans / on the other tokens (1 for uniform).",
      f"lr chosen per method on {results['val_docs']} meta-val documents by {results['select_rule']}.",
      "none: no adaptation won; ↑/↓: the pick is the grid's largest/smallest lr even after widening it.",
      "Full table (official SQuAD EM/F1, lr sweep, retention): eval/results.md",
  ]
  return "\n".join(_aligned(rows) + [""] + notes) + "\n"


def _test_lines(results: dict) -> list[str]:
  na, best = results["no_adaptation"], _best_method(results)
  lines = [
      f"Test: {results['test_docs']} documents, {results['test_questions']} questions. Every [interval] is a "
      f"{100 * results.get('bootstrap', {}).get('level', 0.95):g}% percentile bootstrap over the questions; "
      "\"F1 − uniform\" resamples the same questions for both (paired).",
      "",
      "| method | lr | EM | prefix EM | F1 | official EM | official F1 | F1 − uniform [95% CI] | answer NLL "
      "| uptake | facts/filler | mean weight |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
      f"| no adaptation | - | {' | '.join(_metric_cell(na, m) for m in CI_METRICS)} | - | {num(na['nll'])} | - | "
      "- | - |",
  ]
  for method, r in results["methods"].items():
    t, w = r["test"], r.get("weights", {})
    cells = [_metric_cell(t, m) + (" **best**" if m == "f1" and method == best else "") for m in CI_METRICS]
    lines.append(f"| {method} | {_lr(r)} | {' | '.join(cells)} | "
                 f"{interval(r.get(BASELINE_KEY, {}).get('f1'), signed=True)} | {num(t['nll'])} | "
                 f"{num(r.get('uptake'), '+.4f')} | {num(w.get('facts_filler'), '.3f')} | "
                 f"{num(w.get('mean_weight'), '.3f')} |")
  return lines + [
      "",
      "EM, prefix EM, F1 compare with the reference's gold (prefix EM is the CaMeLS reference's \"EM\"); official "
      "EM / F1 are SQuAD v1.1's evaluate script (best over every gold answer). Answer NLL: token-weighted, "
      "nats. Uptake: no-adaptation answer NLL − the method's (> 0: the gold answers became likelier). "
      "facts/filler: the method's mean token weight on answer-span tokens / on the other tokens of the test "
      "documents (1 for uniform); mean weight over their predicted tokens.",
  ]


def _book_scope(results: dict) -> str:
  """" (first N documents)" where the open book scored fewer documents than the stream's."""
  docs = results["open_book"].get("docs", results["test_docs"])
  return "" if docs == results["test_docs"] else f" (first {docs} documents, {results['open_book']['n']} questions)"


def _sweep_lines(results: dict) -> list[str]:
  upward = (" (lrs tried upward from the smallest, stopping once the score worsens)"
            if results.get("sweep") == "ascending" else "")
  lines = [f"Learning rate chosen per method on {results['val_docs']} meta-val documents by "
           f"{results['select_rule']}{upward}:", "",
           "| method | lr | val EM | val prefix EM | val F1 | val answer NLL |", "|---|---|---|---|---|---|"]
  for method, r in results["methods"].items():
    for row in r["sweep"]:
      chosen = "" if row["lr"] != r["lr"] else f" (chosen, edge: {r['lr_edge']})" if r.get("lr_edge") else " (chosen)"
      lr = "0 (no adaptation)" if row["lr"] == 0 else f"{row['lr']:g}"
      lines.append(f"| {method} | {lr}{chosen} | {num(row['em'])} | {num(row['prefix_em'])} | "
                   f"{num(row['f1'])} | {num(row['nll'])} |")
  lines += ["", "Retention (greedy F1 on the first documents' questions right after them -> at the end of the "
            "stream):"]
  for method, r in results["methods"].items():
    ret = r["retention"]
    lines.append(f"- {method}: {num(ret.get('right_after'))} -> {num(ret.get('at_end'))}")
  return lines


def _time_lines(results: dict) -> list[str]:
  lines = ["Adaptation cost (adapt: the test stream's updates per document, without the curve points; memory: "
           "XLA's compiled memory of one document's adaptation step, arguments and temporaries; MAC's answers also "
           "aggregate the bank per question batch, in its test QA time):", ""] + cost_lines(results)
  lines += ["", "Where the time went (wall-clock seconds; adapt = the test stream's updates, without the curve "
            "points scored along it):", "",
            "| method | lr sweep | adapt | adapt / document | curve + retention | light-tune | test QA | total |",
            "|---|---|---|---|---|---|---|---|"]
  for method, r in results["methods"].items():
    t = r.get("time_s", {})
    lines.append(f"| {method} | " + " | ".join(num(t.get(k), ".1f") for k in (
        "sweep", "adapt", "adapt_per_doc", "curve", "light_tune", "test_score", "total")) + " |")
  na_s = results.get("time_s", {}).get("no_adaptation")
  lines.append(f"| no adaptation | | | | | | {num(na_s, '.1f')} | {num(na_s, '.1f')} |")
  return lines


def _reference_lines(results: dict) -> list[str]:
  """Answer-NLL change against no adaptation (all questions, and by stream position), the open-book ceiling."""
  na = results["no_adaptation"]
  parts = next((r["by_position"] for r in results["methods"].values() if r.get("by_position")), [])
  heads = [f"docs {p['docs'][0] + 1}-{p['docs'][1]}" for p in parts]
  lines = ["Against no adaptation (paired, same questions; answer NLL: < 0 = the gold answers became likelier; by "
           "position: the questions of the stream's documents in that range):", "",
           "| method | F1 − no adaptation | answer NLL − no adaptation | " + " | ".join(heads) + " |",
           "|---|---|---|" + "---|" * len(heads)]
  rows = [(m, r) for m, r in results["methods"].items()]
  if "open_book" in results:
    rows.append(("open book (ceiling)" + _book_scope(results), results["open_book"]))
  for name, r in rows:
    vs = r.get("vs_no_adaptation", {})
    cells = [interval(p.get("nll"), ".3f", signed=True) for p in r.get("by_position", [])]
    cells += ["-"] * (len(heads) - len(cells))
    lines.append(f"| {name} | {interval(vs.get('f1'), '.3f', signed=True)} | "
                 f"{interval(vs.get('nll'), '.3f', signed=True)} | " + " | ".join(cells) + " |")
  lines.append(f"\nClosed-book floor (no adaptation): F1 {num(na['f1'], '.3f')}, answer NLL {num(na['nll'], '.3f')}" +
               (f"; open book{_book_scope(results)}: F1 {num(results['open_book']['f1'], '.3f')}, answer NLL "
                f"{num(results['open_book']['nll'], '.3f')}" if "open_book" in results else "") + ".")
  if "meta_objective_by_step" in results:
    lines += ["", "The meta-objective on the test documents (each document's own weighted SGD step from the reset "
              "QA-tuned model, then its questions; every weighting mean-matched to the learned weights; uptake "
              "in nats, Δ: − uniform, paired):", ""] + step_table(results["meta_objective_by_step"])
  return lines


def _control_lines(results: dict) -> list[str]:
  """Each method against its controls (`Method.controls`): what its own state adds, per question."""
  rows = [(m, k, c) for m, r in results["methods"].items() for k, c in r.get("controls", {}).items()]
  if not rows:
    return []
  lines = ["Controls (the same questions answered without what the method's own state holds; MAC's other bank: as "
           "many documents, none of the stream's; method − control paired, answer NLL < 0: its own state helps):",
           "", "| method | control | control F1 | control answer NLL | F1: method − control "
           "| answer NLL: method − control |", "|---|---|---|---|---|---|"]
  for method, name, c in rows:
    d = c["method_minus_control"]
    lines.append(f"| {method} | {name.replace('_', ' ')} | {num(c['test']['f1'], '.3f')} | "
                 f"{num(c['test']['nll'], '.3f')} | {interval(d.get('f1'), '.3f', signed=True)} | "
                 f"{interval(d.get('nll'), '.3f', signed=True)} |")
  return lines + [""]


def bank_size_rows(results: dict) -> list[dict]:
  """MAC's test scores against its bank's size: the stream's bank, then each `distractors_*` control, in order
  of size; [] when no method measured distractors."""
  rows = []
  for method, r in results["methods"].items():
    found = sorted((c for k, c in r.get("controls", {}).items() if k.startswith("distractors_")),
                   key=lambda c: c["test"]["distractors"])
    if not found:
      continue
    memory = r.get("memory_bytes", {})
    rows.append({"method": method, "bank_docs": r.get("bank", {}).get("docs"), "distractors": 0, "test": r["test"],
                 "minus_stream": None, "prefix_bytes": memory.get("prefix"), "bank_bytes": memory.get("bank")})
    for c in found:
      t = c["test"]
      minus = c["method_minus_control"]  # stream bank - this bank: flipped to this bank - the stream's
      rows.append({"method": method, "bank_docs": t["bank_docs"], "distractors": t["distractors"], "test": t,
                   "minus_stream": {m: {"mean": -v["mean"], "lo": -v["hi"], "hi": -v["lo"]} for m, v in minus.items()},
                   "amortize_s": t["amortize_s"], "answer_s": t["answer_s"],
                   "prefix_bytes": t["prefix_bytes"], "bank_bytes": t["bank_bytes"]})
  return rows


def _bank_size_lines(results: dict) -> list[str]:
  rows = bank_size_rows(results)
  if not rows:
    return []
  lines = ["MAC against its bank's size (the stream's documents, then distractors mixed in; Δ: this bank − the "
           "stream's alone, paired; prefix memory: XLA's compiled bytes of aggregating one question batch):", "",
           "| method | bank documents | distractors | F1 | answer NLL | Δ F1 | Δ answer NLL | amortize s / doc "
           "| QA s / question | prefix MiB | bank MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    d, t = r["minus_stream"] or {}, r["test"]
    mib = lambda b: num(None if b is None else b / 2**20, ".1f")  # noqa: E731
    lines.append(f"| {r['method']} | {r['bank_docs']} | {r['distractors']} | {_metric_cell(t, 'f1')} | "
                 f"{num(t['nll'], '.3f')} | {interval(d.get('f1'), '.3f', signed=True)} | "
                 f"{interval(d.get('nll'), '.3f', signed=True)} | {num(r.get('amortize_s'), '.3f')} | "
                 f"{num(r.get('answer_s'), '.3f')} | {mib(r['prefix_bytes'])} | {mib(r['bank_bytes'])} |")
  return lines + [""]


def markdown(results: dict) -> str:
  """results.md: test scores with intervals and comparisons, against no adaptation, the methods' controls, the
  meta-objective on the test documents, the lr sweep, retention, costs (Markdown)."""
  return "\n".join(_test_lines(results) + [""] + _reference_lines(results) + [""] + _control_lines(results)
                   + _bank_size_lines(results)
                   + _sweep_lines(results) + [""] + _time_lines(results)) + "\n"


# ------------------------------------------------------------------------------------------------
# The evaluation's files.


def prediction_file_name(name: str) -> str:
  """A method name as a file name ("uniform+qa_lt" stays; anything but letters, digits, . _ + - -> _)."""
  return re.sub(r"[^A-Za-z0-9._+-]+", "_", name)


def answers_by_id(scores: dict) -> dict:
  """{question id: answer} of a `score` result: what the official SQuAD v1.1 script reads."""
  return {p["id"]: p["answer"] for p in scores["predictions"]}


def prediction_details(scores: dict) -> list[dict]:
  """One record per question of a `score` result: its id, question, golds, answer and scores."""
  pq = scores["per_question"]
  keys = CI_METRICS + ("nll",)
  if any(len(pq[k]) != len(scores["predictions"]) for k in keys):
    raise ValueError("prediction_details: per-question scores and predictions differ in length")
  return [{k: p[k] for k in ("id", "question", "golds", "answer")} | {k: pq[k][i] for k in keys}
          for i, p in enumerate(scores["predictions"])]


def _write_files(folder: str, results: dict, test_scores: dict, heatmaps: dict) -> None:
  io_utils.write_json(os.path.join(folder, "results.json"), results)
  io_utils.write_atomic(os.path.join(folder, "results.md"), markdown(results))
  for name, scores in test_scores.items():
    stem = os.path.join(folder, "predictions", prediction_file_name(name))
    io_utils.write_json(stem + ".json", answers_by_id(scores))
    io_utils.write_json(stem + "_detail.json", prediction_details(scores))
  plots.plot_curves(os.path.join(folder, "f1_curve.png"), results)
  if bank_size_rows(results):
    plots.plot_bank_size(os.path.join(folder, BANK_SIZE_PLOT), bank_size_rows(results))
  if "meta_objective_by_step" in results:
    plots.plot_uptake_vs_step(os.path.join(folder, "meta_objective_vs_step.png"), results["meta_objective_by_step"],
                              "The meta-objective on the test documents")
  for method, docs in heatmaps.items():
    ff = results["methods"].get(method, {}).get("weights", {}).get("facts_filler")
    titles = [f"{method} (facts/filler {num(ff, '.2f')} on the test stream): {doc_id}" for doc_id, _, _ in docs]
    pictures = [(pieces, w_N) for _, pieces, w_N in docs]
    plots.heatmap_png(os.path.join(folder, f"weights_{method}.png"), pictures, titles)
    plots.write_heatmap_html(os.path.join(folder, f"weights_{method}.html"), pictures, titles,
                             f"Token weights: {method}")


def write(directory: str, results: dict, test_scores: dict, heatmaps: dict) -> None:
  """Writes results.json, results.md, f1_curve.png, weight heatmaps and predictions/ into `directory`
  atomically: everything goes to a temporary folder beside it that is renamed into place, so an
  interrupted run leaves the previous complete folder (or none), never a partial one.

  Args:
    directory: the folder to (re)place, e.g. <workdir>/eval.
    results: results.json's content (`evaluation.run`'s results).
    test_scores: {"no_adaptation" or method: its test `score`} -> predictions/<name>.json ({id: answer})
      and predictions/<name>_detail.json (per-question answers and scores).
    heatmaps: {method: [(document id, token strings, w_N)]} -> weights_<method>.png and .html.
  """
  parent = os.path.dirname(os.path.abspath(directory))
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}-tmp-")
  try:
    _write_files(tmp, results, test_scores, heatmaps)
    if os.path.exists(directory):
      old = directory + ".old"
      shutil.rmtree(old, ignore_errors=True)
      os.replace(directory, old)
      os.replace(tmp, directory)
      shutil.rmtree(old)
    else:
      os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# ------------------------------------------------------------------------------------------------
# Training summaries.


def mac_summary(r: dict) -> str:
  """What MAC's training reached on meta-val: answer NLL with the bank, with another bank, without a prefix."""
  first, best = r["history"][0], r["best"]
  return (f"mac: meta-val answer NLL {first['val_nll']:.4f} at init -> {best['val_nll']:.4f} (best, step "
          f"{r['best_step']}); with another batch's bank {best['val_nll_other_bank']:.4f}; base model alone "
          f"{best['val_nll_base']:.4f}" + ("" if "val_by_question" not in r else
          f"\n  per question ({r['val_by_question']['questions']}, paired): own bank - other bank "
          f"{interval(r['val_by_question']['own_minus_other_bank'], '.4f', signed=True)}, own bank - none "
          f"{interval(r['val_by_question']['own_minus_base'], '.4f', signed=True)}"))


def _uptake_rows(compare: dict) -> list[str]:
  rows = [f"  {'weighting':<10} {'mean w':>7} {'uptake':>8} {'x uniform':>9} {'KL':>8} {'facts/filler':>12}  "
          f"per-question uptake − uniform [95% CI]"]
  for name, m in compare.items():
    rows.append(f"  {name:<10} {m['weight_mean']:7.4f} {m['uptake']:8.4f} {num(m['x_uniform'], '9.2f'):>9} "
                f"{m['kl']:8.2e} {num(m['facts_filler'], '12.2f'):>12}  "
                f"{interval(m.get('vs_uniform'), '.4f', signed=True)}")
  return rows


def _verdicts(compare: dict) -> str:
  """The learned weights against the targets: uptake over uniform's, facts/filler, and against SSM."""
  learned, ssm = compare["learned"], compare.get("ssm")
  uniform = compare.get("uniform", {}).get("uptake")
  if uniform is not None and uniform <= 0:
    ratio = f"uniform weights teach nothing at this step (uptake {uniform:+.4f}), learned {learned['uptake']:+.4f}"
  else:
    ratio = f"learned/uniform uptake {num(learned['x_uniform'], '.2f')}"
  verdicts = [f"{ratio} (target >= 2x)", f"facts/filler {num(learned['facts_filler'], '.2f')} (target >= 2)"]
  if ssm is not None:
    d = ssm.get("vs_learned") or {}
    diff = None if d.get("mean") is None else {"mean": -d["mean"], "lo": -d["hi"], "hi": -d["lo"]}
    verdicts.append(f"learned > SSM: {'yes' if learned['uptake'] > ssm['uptake'] else 'no'} "
                    f"(per question {interval(diff, '.4f', signed=True)})")
  return "  " + "; ".join(verdicts)


def step_table(by_step: dict) -> list[str]:
  """Uptake of each weighting (rows) at each inner step (columns, × the learned one), with its paired
  difference from uniform's (Δ, on the same questions): `camels.compare_weightings`' result as Markdown rows."""
  scales = sorted(by_step, key=float)
  names = list(by_step[scales[0]])
  rows = ["| weighting | " + " | ".join(f"step × {s}" for s in scales) + " |", "|---" * (len(scales) + 1) + "|"]
  for name in names:
    cells = []
    for s in scales:
      m = by_step[s][name]
      vs = m.get("vs_uniform")
      cells.append(f"{m['question_uptake']['mean']:+.3f}" + (f" (Δ {interval(vs, '.3f', signed=True)})" if vs else ""))
    rows.append(f"| {name} | " + " | ".join(cells) + " |")
  return rows


def camels_summary(r: dict) -> str:
  """What meta-training reached: meta-val loss, uptake against mean-matched weightings, facts/filler."""
  first, best = r["history"][0], r["best"]
  lines = [f"camels ({r.get('base_model', '?')} base): meta-val loss {first['val_loss']:.4f} at init -> "
           f"{best['val_loss']:.4f} (best, step {r['best_step']}); answer NLL before adaptation "
           f"{best['val_qa_before']:.4f}, after {best['val_qa']:.4f}"]
  compare = r.get("compare")
  if compare:
    lines += [f"uptake on meta-val at the learned weights' step (every weighting mean-matched per document), "
              f"step {r['compare_step']}:"] + _uptake_rows(compare) + [_verdicts(compare)]
  if r.get("compare_by_step"):
    lines += ["uptake on meta-val (nats, mean over questions) against the inner step; Δ: − uniform, paired:"]
    lines += ["  " + row for row in step_table(r["compare_by_step"])]
  return "\n".join(lines)
