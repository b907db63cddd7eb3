"""The online-adaptation evaluation: adapt the QA-tuned model on a document stream, then answer questions.

Every method is a `Method` named in `REGISTRY` (what `eval.methods` lists): the weighted-gradient methods
(uniform, SSM, TF-IDF, CaMeLS: one Adam step per document on token-weighted losses, `adapt.online`), uniform
followed by a QA light-tune after the stream, and MAC (no gradient step: a memory bank of amortized
documents). For each, the protocol is the same: the learning rate it sweeps is picked on a validation stream
(meta-val documents; by answer NLL or F1, `eval.select`), with "no adaptation" (lr 0) a candidate and the
grid widened while the pick sits on its edge (a pick still there is flagged); the test stream is read at that
lr with F1 measured at points along it and the retention of its first documents; then the test score (EM,
prefix EM, F1, the official SQuAD EM / F1, answer NLL), compared with no adaptation on every question and
by the position of the question's document in the stream. Each phase is timed apart (`Clock`).

Beside the methods, two references: the open-book ceiling (the QA-tuned model with each question's document in
its prompt) and the meta-objective on the test documents (each document's weighted SGD step from the reset
QA-tuned model, then its own questions, for the learned and fixed weightings at a grid of steps).

`run` collects one frozen `MethodResult` per method; `compare` derives every paired interval (each method
against uniform, MAC against CaMeLS) from them; `camels_jax.report` writes the table, results.md,
results.json, the plots and the answers (eval/predictions/).
"""

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from camels_jax import checks, qa, qa_tune, report, stats
from camels_jax import data as data_lib
from camels_jax.adapt import online, uptake
from camels_jax.data import pipeline
from camels_jax.methods import baselines, camels
from camels_jax.evaluation import methods as _builtin  # noqa: F401  (registers the built-in methods)
from camels_jax.evaluation.method import (CI_METRICS, REGISTRY, Context, Method, generate_kwargs,  # noqa: F401
                                          method_names, pad, register, score, summary)

BASELINE = "uniform"  # every other method gets a paired interval against it
MANIFEST_FILE = "manifest.json"  # the workdir's record of its runs, which results.json points to

# Learning-rate selection rules (`eval.select`) and how the outputs describe them.
SELECT_RULES = {
    "nll": "lowest validation answer NLL (ties: higher F1)",
    "f1": "highest validation F1 (ties: higher prefix EM, then lower answer NLL)",
}
SWEEPS = ("grid", "ascending")  # `eval.sweep`: every lr of the grid, or upward until the score worsens


# ------------------------------------------------------------------------------------------------
# The rules of the `eval` config section (built by `camels_jax.eval_config`).


def _registered(names) -> bool:
  listed = [n.strip() for n in names.split(",") if n.strip()]
  return bool(listed) and all(n in REGISTRY for n in listed)


RULES = {
    # Read at check time, so a method registered after import is accepted.
    "methods": checks.Rule(_registered, f"a comma-separated subset of the registered methods "
                                        f"({', '.join(REGISTRY)})", bad_example="?unknown?"),
    "lrs": checks.each(checks.positive),
    "widen": checks.count_or_zero,
    "no_adaptation_candidate": checks.boolean,
    "sweep": checks.one_of(*SWEEPS),
    "val_docs": checks.count,
    "val_decoding": checks.one_of("", *qa.DECODINGS),
    "decoding": checks.one_of(*qa.DECODINGS),
    "num_beams": checks.count,
    "num_groups": checks.count,
    "diversity_penalty": checks.non_negative,
    "max_new_tokens": checks.count,
    "batch_size": checks.count,
    "curve_points": checks.count,
    "retention_docs": checks.count,
    "heatmap_docs": checks.count,
    "select": checks.one_of(*SELECT_RULES),
    "bootstrap": {"resamples": checks.count, "level": checks.between(0, 1), "seed": checks.seed},
    "tfidf_min_threshold": checks.non_negative,
    "light_tune": {name: qa_tune.RULES[name] for name in ("lr", "patience", "val_every", "max_steps")},
    "online": online.RULES,
    "meta_objective": checks.subset_of(*baselines.DOC_WEIGHTINGS, allow_empty=True),
    "meta_objective_octaves": checks.count_or_zero,
    "meta_objective_docs": checks.count_or_zero,
    "position_parts": checks.count,
    "open_book": checks.boolean,
    "open_book_docs": checks.count_or_zero,
    "retrieval": {"k": checks.count, "max_len": checks.count_or_zero},
    "mac_distractors": checks.either(checks.increasing(checks.count),
                                     checks.Rule(lambda x: isinstance(x, (tuple, list)) and not x, "() (none)")),
}


def _beam_groups(c, at=""):
  if "beam" in (c.decoding, c.val_decoding) and c.num_beams % c.num_groups:
    return [f"{at}num_beams={c.num_beams} must be a multiple of {at}num_groups={c.num_groups} (beams per group)"]
  return []


def _select_decodes(c, at=""):
  if c.select == "f1" and not c.val_decoding:
    return [f"{at}select='f1' needs {at}val_decoding ('greedy' or 'beam'): only decoded answers have an F1"]
  return []


CROSS = [_beam_groups, _select_decodes]


def check_prerequisites(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Fails before anything is loaded (or QA-tuned) when the data or a configured method cannot be had."""
  data_lib.check_sources(config.data)
  for name in method_names(config.eval):
    REGISTRY[name].require(config, workdir)


# ------------------------------------------------------------------------------------------------
# Intervals, the lr rule, weight diagnostics.


def _boot_kwargs(bc) -> dict:
  return dict(n_boot=int(bc["resamples"]), seed=int(bc["seed"]), level=float(bc["level"]))


def with_ci(scores: dict, bc) -> dict:
  """`summary(scores)` plus "ci": {metric: stats.bootstrap_ci} over its questions for `CI_METRICS`."""
  pq = scores["per_question"]
  return summary(scores) | {"ci": {m: stats.bootstrap_ci(pq[m], **_boot_kwargs(bc)) for m in CI_METRICS}}


def paired(a_scores: dict, b_scores: dict, bc, metrics=CI_METRICS) -> dict:
  """{metric: stats.paired_bootstrap_ci} of a - b on the same questions (two `score` results)."""
  a, b = a_scores["per_question"], b_scores["per_question"]
  return {m: stats.paired_bootstrap_ci(a[m], b[m], **_boot_kwargs(bc)) for m in metrics}


def _finite_or(x, default: float) -> float:
  return float(x) if x is not None and math.isfinite(float(x)) else default


def select_lr(sweep, rule: str) -> float:
  """The lr a selection rule picks from validation rows [{"lr", "f1", "prefix_em", "nll", ...}].

  "nll": lowest answer NLL, ties to higher F1; "f1": highest F1, ties to higher prefix EM, then lower NLL.
  A missing (None / NaN) score ranks last; among full ties the first row wins.
  """
  if rule not in SELECT_RULES:
    raise ValueError(f"eval.select={rule!r}: expected one of {sorted(SELECT_RULES)}")
  if not sweep:
    raise ValueError("select_lr: empty sweep")
  nll = lambda r: _finite_or(r.get("nll"), math.inf)
  higher = lambda r, k: -_finite_or(r.get(k), -math.inf)
  if rule == "nll":
    key = lambda r: (nll(r), higher(r, "f1"))
  else:
    key = lambda r: (higher(r, "f1"), higher(r, "prefix_em"), nll(r))
  return min(sweep, key=key)["lr"]


def weight_diagnostics(w_Ns, answer_masks) -> dict:
  """Where a method's weights went over some documents (`adapt.uptake`'s definitions, pooled).

  Args:
    w_Ns: each document's token weights.
    answer_masks: each document's `TokenizedDoc.answer_mask` (True on answer-span tokens).

  Returns:
    {"facts_filler": mean weight on answer tokens / on the others (1 for uniform), "mean_weight": over
    every predicted token, "facts_weight", "filler_weight": the two means, "facts_tokens",
    "filler_tokens": their counts}; None where undefined (no answer tokens, zero filler weight).
  """
  if not w_Ns:
    return dict.fromkeys(("facts_filler", "mean_weight", "facts_weight", "filler_weight"), None) | {
        "facts_tokens": 0, "filler_tokens": 0}
  length = max(len(w) for w in w_Ns)
  w_BxL = np.stack([pad(np.asarray(w, np.float32), length) for w in w_Ns])
  a_BxL = np.stack([pad(np.asarray(a, bool)[:len(w)], length) for a, w in zip(answer_masks, w_Ns)])
  m_BxL = np.stack([pad(np.ones(len(w), bool), length) for w in w_Ns])
  sums = {k: float(v) for k, v in uptake.facts_filler_sums(w_BxL, a_BxL, m_BxL).items()}
  mean = lambda w, n: w / n if n else None
  return {"facts_filler": stats.finite_or_none(uptake.facts_filler_ratio(sums)),
          "mean_weight": mean(sums["facts_w"] + sums["filler_w"], sums["facts_n"] + sums["filler_n"]),
          "facts_weight": mean(sums["facts_w"], sums["facts_n"]),
          "filler_weight": mean(sums["filler_w"], sums["filler_n"]),
          "facts_tokens": int(sums["facts_n"]), "filler_tokens": int(sums["filler_n"])}


# ------------------------------------------------------------------------------------------------
# The protocol: one method's lr sweep, test stream, post-stream step and test score.


class Clock:
  """Wall-clock seconds per phase (`with clock("adapt"):`), to say where an evaluation's time goes.

  Phases nest exclusively: an inner phase pauses the outer one (the curve points scored while a stream is
  read count as "curve", not "adapt"), so every second is charged to one phase.
  """

  def __init__(self, timer: Callable[[], float] = time.perf_counter):
    self.totals: dict[str, float] = {}
    self._timer = timer
    self._start = self._since = timer()
    self._open: list[str] = []  # the phases entered and not left, innermost last

  def _charge(self) -> None:
    """Charges the time since the last change of phase to the innermost open phase."""
    now = self._timer()
    if self._open:
      self.add(self._open[-1], now - self._since)
    self._since = now

  @contextlib.contextmanager
  def __call__(self, name: str):
    self._charge()
    self._open.append(name)
    self.add(name, 0.0)
    try:
      yield
    finally:
      self._charge()
      self._open.pop()

  def add(self, name: str, seconds: float) -> None:
    self.totals[name] = self.totals.get(name, 0.0) + seconds

  def elapsed(self) -> float:
    return self._timer() - self._start


@dataclasses.dataclass(frozen=True)
class CurvePoint:
  docs: int  # documents read
  scores: dict  # the greedy `score` of their questions at that point


@dataclasses.dataclass(frozen=True)
class Stream:
  """A method's test stream, read: its state after the last document and what was scored along it."""

  state: Any
  curve: tuple[CurvePoint, ...]
  right_after: float | None  # greedy F1 on the first `retention_docs` documents' questions right after them


def curve_points(n: int, points: int) -> list[int]:
  """The documents-read counts (of a stream of `n`) where the curve is scored: `points` evenly spaced."""
  return sorted({max(1, round(n * (k + 1) / points)) for k in range(points)})


def read_test_stream(ctx: Context, method: Method, docs, lr: float | None, clock: Clock) -> Stream:
  """`method` adapted on the test stream at `lr`, scored (greedy) at the curve points and right after the
  first documents; the scoring is timed as "curve", apart from "adapt"."""
  points, retention_n = curve_points(len(docs), ctx.ec.curve_points), min(ctx.ec.retention_docs, len(docs))
  curve, right_after = [], []

  def on_doc(i, state):
    seen = i + 1
    with clock("curve"):
      if seen == retention_n:
        right_after.append(method.answer(ctx, state, docs[:seen], "greedy", "retention")["f1"])
      if seen in points:
        curve.append(CurvePoint(seen, method.answer(ctx, state, docs[:seen], "greedy", "curve")))

  lr_s = "" if lr is None else f" lr={lr:g}"
  with clock("adapt"):
    state = method.adapt(ctx, docs, lr, on_doc=on_doc, desc=f"{method.name}{lr_s} (test)")
  return Stream(state, tuple(curve), right_after[0] if right_after else None)


NO_ADAPTATION_LR = 0.0  # the sweep row of "no adaptation": Adam at lr 0 leaves every parameter as it is
WIDEN_FACTOR = 4.0  # the reference grid's ratio between neighbouring lrs


def lr_edge(sweep, lr) -> str | None:
  """"high" / "low" when the chosen `lr` is the largest / smallest positive lr of a sweep of several (the best
  may lie beyond it), else None (bracketed, no sweep, or no adaptation chosen)."""
  tried = sorted(r["lr"] for r in sweep if r["lr"] > 0)
  if lr is None or len(tried) < 2 or lr <= 0:
    return None
  return "high" if lr == tried[-1] else "low" if lr == tried[0] else None


def sweep_lr(ctx: Context, method: Method, val_docs, lrs: Sequence[float], clock: Clock, no_adapt_val=None):
  """(validation rows {"lr"} | `summary`, the lr `select_lr` picks from them); no rows for one lr (or
  none: then the lr is None).

  With `no_adapt_val` (the unadapted model's validation `score`), "no adaptation" is a candidate (row lr 0).
  `eval.sweep="grid"` validates every lr (the reference); "ascending" goes up from the smallest (after no
  adaptation) and stops at the first lr that scores worse than the one below it, so a method that every lr
  harms costs one validation stream, not one per lr. While the pick is the largest (smallest) lr tried, the
  grid widens by `WIDEN_FACTOR` up to `eval.widen` times on that side.
  """
  if len(lrs) <= 1:  # one lr needs no validation
    return (), (lrs[0] if lrs else None)
  rows = [] if no_adapt_val is None else [{"lr": NO_ADAPTATION_LR} | summary(no_adapt_val)]

  def validate(lr):
    with clock("sweep"):
      state = method.adapt(ctx, val_docs, lr, desc=f"{method.name} lr={lr:g} (val)")
      state = method.post_stream(ctx, state)
      m = method.answer(ctx, state, val_docs, ctx.ec.val_decoding or None, f"{method.name} lr={lr:g} val QA")
    rows.append({"lr": lr} | summary(m))
    logging.info("%s lr=%g: val F1 %.4f, answer NLL %.4f", method.name, lr, m["f1"], m["nll"])

  ascending = ctx.ec.sweep == "ascending"
  for lr in sorted(lrs) if ascending else lrs:
    validate(lr)
    # Past the best lr once the step up scores worse than the one below it (or no adaptation): the
    # larger lrs of the grid are not run, which assumes the validation score is unimodal in the lr.
    if ascending and len(rows) >= 2 and select_lr(rows[-2:], ctx.ec.select) == rows[-2]["lr"]:
      break
  for _ in range(ctx.ec.widen):
    edge = lr_edge(rows, select_lr(rows, ctx.ec.select))
    if edge is None:
      break
    tried = sorted(r["lr"] for r in rows if r["lr"] > 0)
    validate(tried[-1] * WIDEN_FACTOR if edge == "high" else tried[0] / WIDEN_FACTOR)
  rows.sort(key=lambda r: -r["lr"])
  return tuple(rows), select_lr(rows, ctx.ec.select)


def final_score(ctx: Context, method: Method, state, stream: Stream, docs, clock: Clock):
  """(the test `score` after the whole stream, the first documents' greedy F1 at the end)."""
  ec = ctx.ec
  retention_n = min(ec.retention_docs, len(docs))
  last = stream.curve[-1] if stream.curve else None
  with clock("test_score"):
    if (method.post_phase is None and last is not None and last.docs == len(docs)
        and ec.decoding == "greedy"):
      test = last.scores  # the last curve point is the test score: same state, same decoding
    else:
      test = method.answer(ctx, state, docs, ec.decoding, f"{method.name} test QA")
    if ec.decoding == "greedy":  # the first documents' questions are the test's first rows
      first = len(pipeline.questions(docs[:retention_n]))
      at_end = float(np.mean(test["per_question"]["f1"][:first])) if first else None
    else:
      at_end = method.answer(ctx, state, docs[:retention_n], "greedy", "retention")["f1"]
  return test, at_end


@dataclasses.dataclass(frozen=True)
class MethodResult:
  """One method's evaluation, as `run` collects it (comparisons: `compare`; results.json: `result_json`)."""

  name: str
  adaptation: str  # `Method.adaptation`: methods sharing it share their token weights
  versus: tuple[str, ...]  # `Method.versus`
  sweep: tuple[dict, ...]  # validation aggregates per lr ({"lr"} | `summary`)
  lr: float | None  # the lr chosen (None: the method has none)
  test: dict  # the test `score`: aggregates, per-question lists, answers
  curve: tuple[CurvePoint, ...]  # along the test stream
  retention: Mapping[str, float | None]  # greedy F1 on the first documents' questions: "right_after", "at_end"
  doc_weights: tuple[np.ndarray, ...] | None  # w_N of each test document (None: it weighs no tokens)
  weights: Mapping[str, Any]  # `weight_diagnostics` of doc_weights ({} when None)
  time_s: Mapping[str, float]  # seconds per `Clock` phase, "adapt_per_doc", "total"
  record: Mapping[str, Any]  # `Method.record`'s fields
  controls: Mapping[str, dict] = dataclasses.field(default_factory=dict)  # `Method.controls`' test scores


def evaluate_method(ctx: Context, method: Method, val_docs, test_docs, chosen: Mapping[str, float],
                    streams: Mapping[tuple, Stream], no_adapt_val: dict | None = None) -> tuple[MethodResult, Stream]:
  """The lr sweep on the validation stream, then the test stream at the chosen lr, the post-stream step and
  the test score.

  Args:
    ctx: the evaluation context.
    method: a prepared `Method`.
    val_docs, test_docs: the validation and test streams (`TokenizedDoc`s, in order).
    chosen: the lr each method evaluated before chose (`Method.lrs`).
    streams: {(adaptation, lr): `Stream`} read by methods before it, reused when its adaptation and lr
      match one (uniform + QA light-tune light-tunes uniform's adapted model).
    no_adapt_val: the unadapted model's validation `score`: "no adaptation" is a candidate of the sweep.

  Returns:
    (its result, its test `Stream`).
  """
  clock = Clock()
  sweep, lr = sweep_lr(ctx, method, val_docs, method.lrs(ctx.ec, chosen), clock, no_adapt_val)
  stream = streams.get((method.adaptation, lr))
  if stream is None:
    stream = read_test_stream(ctx, method, test_docs, lr, clock)
  else:
    clock.add("adapt", 0.0)  # read by the method it shares the adaptation with, and timed there
  state = stream.state
  if method.post_phase is not None:
    with clock(method.post_phase):
      state = method.post_stream(ctx, state)
  test, at_end = final_score(ctx, method, state, stream, test_docs, clock)
  with clock("controls"):
    controls = method.controls(ctx, state, test_docs)
  if not controls:  # no such phase for a method without controls
    del clock.totals["controls"]
  w_Ns = [method.token_weights(ctx, d) for d in test_docs]
  w_Ns = None if any(w is None for w in w_Ns) else tuple(w_Ns)
  weights = {} if w_Ns is None else weight_diagnostics(w_Ns, [d.answer_mask for d in test_docs])
  n = len(test_docs)
  time_s = dict(clock.totals, adapt_per_doc=clock.totals["adapt"] / max(n, 1), total=clock.elapsed())
  result = MethodResult(method.name, method.adaptation, tuple(method.versus), sweep, lr, test, stream.curve,
                        {"right_after": stream.right_after, "at_end": at_end}, w_Ns, weights, time_s,
                        method.record(ctx, state, test_docs), controls)
  return result, stream


# ------------------------------------------------------------------------------------------------
# Comparisons: a pure function of the results.


def _difference(a, b):
  return a - b if a is not None and b is not None and math.isfinite(a - b) else None


def position_parts(docs, parts: int) -> list[tuple[int, int, np.ndarray]]:
  """The stream cut into `parts` runs of documents: (first document, end document, the indices of their
  questions in `pipeline.questions(docs)`) for each non-empty run."""
  doc_of_q = np.repeat(np.arange(len(docs)), [len(d.qas) for d in docs])
  bounds = np.linspace(0, len(docs), parts + 1).round().astype(int)
  return [(int(a), int(b), np.flatnonzero((doc_of_q >= a) & (doc_of_q < b))) for a, b in zip(bounds, bounds[1:])
          if b > a]


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A method against the others, on the same questions."""

  uptake: float | None  # no-adaptation test answer NLL − the method's (> 0: the gold answers became likelier)
  versus: Mapping[str, dict]  # {other method: {metric: paired interval of this − other}}; the baseline first
  curve_versus: Mapping[int, dict]  # {documents read: paired F1 interval against the baseline's same point}
  vs_no_adaptation: Mapping[str, dict]  # {"f1", "nll": paired interval of this − no adaptation}
  # By stream position (`position_parts`): {"docs": [first, end), "questions", "nll": paired interval of the
  # answer-NLL change against no adaptation on those questions}.
  by_position: tuple[dict, ...] = ()


def _by_position(scores: dict, no_adaptation: dict, parts, bc) -> tuple[dict, ...]:
  out = []
  for first, end, rows in parts:
    a = np.asarray(scores["per_question"]["nll"])[rows]
    b = np.asarray(no_adaptation["per_question"]["nll"])[rows]
    out.append({"docs": [first, end], "questions": len(rows),
                "nll": stats.paired_bootstrap_ci(a, b, **_boot_kwargs(bc)) if len(rows) else None})
  return tuple(out)


def compare(no_adaptation: dict, results: Mapping[str, MethodResult], bc,
            baseline_name: str = BASELINE, parts=()) -> dict[str, Comparison]:
  """Every method's `Comparison`: uptake, paired intervals against no adaptation, against the baseline (when
  it ran; test metrics and each curve point's F1) and against its `versus` methods that ran.

  Args:
    no_adaptation: the no-adaptation test `score`.
    results: {method: its result}.
    bc: the `eval.bootstrap` settings.
    baseline_name: the method every other is compared with.
    parts: `position_parts` of the test stream (none: no breakdown by position).
  """
  base = results.get(baseline_name)
  out = {}
  for name, r in results.items():
    others = ((baseline_name,) if base is not None and name != baseline_name else ()) + tuple(
        o for o in r.versus if o in results and o != name)
    curve_versus = {}
    if base is not None and name != baseline_name:
      base_curve = {p.docs: p.scores for p in base.curve}
      curve_versus = {p.docs: paired(p.scores, base_curve[p.docs], bc, ("f1",))["f1"]
                      for p in r.curve if p.docs in base_curve}
    out[name] = Comparison(_difference(no_adaptation["nll"], r.test["nll"]),
                           {o: paired(r.test, results[o].test, bc) for o in others}, curve_versus,
                           paired(r.test, no_adaptation, bc, ("f1", "nll")),
                           _by_position(r.test, no_adaptation, parts, bc))
  return out


def result_json(r: MethodResult, c: Comparison, bc, baseline_name: str = BASELINE) -> dict:
  """A method's entry of results.json: aggregates with intervals, the curve, comparisons (no per-question
  lists: those go to eval/predictions/)."""
  curve = []
  for p in r.curve:
    ci = stats.bootstrap_ci(p.scores["per_question"]["f1"], **_boot_kwargs(bc))
    point = {"docs": p.docs, "f1": p.scores["f1"], "lo": ci["lo"], "hi": ci["hi"]}
    if p.docs in c.curve_versus:
      point[f"vs_{baseline_name}"] = c.curve_versus[p.docs]
    curve.append(point)
  out = {"sweep": list(r.sweep), "lr": r.lr, "lr_edge": lr_edge(r.sweep, r.lr), "test": with_ci(r.test, bc),
         "curve": curve, "retention": dict(r.retention), "weights": dict(r.weights), "time_s": dict(r.time_s),
         "uptake": c.uptake, "vs_no_adaptation": dict(c.vs_no_adaptation), "by_position": list(c.by_position)
         } | dict(r.record)
  if r.controls:  # what the method's own state adds over each control, on the same questions
    out["controls"] = {k: {"test": with_ci(s, bc), "method_minus_control": paired(r.test, s, bc, ("f1", "nll"))}
                       for k, s in r.controls.items()}
  return out | {f"vs_{other}": v for other, v in c.versus.items()}


# ------------------------------------------------------------------------------------------------
# Every method, then the outputs.


def _val_docs(ctx: Context) -> list:
  meta_val = ctx.data.splits["meta_val"]
  return list(pipeline.Stream(meta_val, min(ctx.ec.val_docs, len(meta_val)), ctx.data.config.stream_seed,
                              ctx.data.spec, ctx.data.pad_id).docs)


def evaluate_methods(ctx: Context, names: Sequence[str], val_docs, test_docs, writer,
                     no_adapt_val: dict | None = None) -> dict[str, MethodResult]:
  """{name: `MethodResult`} of the methods `names`, in order; an adapted test stream is kept only while a
  later method shares its adaptation. `no_adapt_val`: see `evaluate_method`."""
  results, streams, chosen = {}, {}, {}
  for k, name in enumerate(names):
    method = REGISTRY[name].prepare(ctx, test_docs)
    r, stream = evaluate_method(ctx, method, val_docs, test_docs, chosen, streams, no_adapt_val)
    results[name] = r
    if r.lr is not None:
      chosen[name] = r.lr
    if any(REGISTRY[later].adaptation == method.adaptation for later in names[k + 1:]):
      streams[(method.adaptation, r.lr)] = stream
    writer.write_scalars(0, {f"eval/{name}/{m}": v for m, v in r.test.items() if m in CI_METRICS})
    at_lr = "" if r.lr is None else f" at lr {r.lr:g}" + (f" (edge of the grid: {lr_edge(r.sweep, r.lr)})"
                                                            if lr_edge(r.sweep, r.lr) else "")
    ctx.say(f"{name}: test F1 {r.test['f1']:.4f}, answer NLL {r.test['nll']:.4f}{at_lr} "
            f"({r.time_s['total']:.0f} s)")
  return results


def heatmaps(ctx: Context, results: Mapping[str, MethodResult], docs) -> dict[str, list]:
  """{method: [(document id, token strings, w_N)]} of `docs`, once per adaptation (methods sharing one
  share their weights) for the methods that weigh tokens (`report.write`'s heatmaps)."""
  tok = ctx.model.tokenizer
  pieces = [[tok.decode([t]) for t in d.tokens] for d in docs]
  drawn, out = set(), {}
  for name, r in results.items():
    if r.doc_weights is None or r.adaptation in drawn:
      continue
    drawn.add(r.adaptation)
    out[name] = [(d.doc.id, p, w) for d, p, w in zip(docs, pieces, r.doc_weights)]
  return out


def meta_objective(ctx: Context, docs) -> dict[str, dict]:
  """The meta-objective on held-out documents: each of `docs` gets the weighted inner step (the learned
  weights', and each `eval.meta_objective` weighting's at the learned mean weight) from the reset QA-tuned
  model, then its own questions are scored (`camels.compare_on` with one document per step), at
  `camels.step_scales(eval.meta_objective_octaves)` times the learned step, on the first
  `eval.meta_objective_docs` of `docs`, preconditioned as meta-training was (`camels.precond_docs`):
  {f"{scale:g}": {weighting: ...}}."""
  wm_graphdef, meta = camels.load_trained(ctx.config, ctx.model, ctx.workdir)
  names = [n.strip() for n in ctx.ec.meta_objective.split(",") if n.strip()]
  docs = docs[:ctx.ec.meta_objective_docs or None]
  return camels.compare_on(ctx.config, ctx.model, ctx.params, ctx.data, wm_graphdef, meta, docs, names,
                           batch_docs=1, scales=camels.step_scales(ctx.ec.meta_objective_octaves),
                           progress=ctx.progress, desc="meta-objective on the test documents",
                           precond=camels.precond_of(ctx.config, ctx.model, ctx.params, ctx.data))


def open_book(ctx: Context, docs) -> dict:
  """The open-book ceiling: the QA-tuned model (no adaptation) answering each question with its document in
  the prompt (`pipeline.open_book`; a document cut from its end where the model's positions run out, counted
  in "documents_cut"), decoded as the test is."""
  tok, ec = ctx.model.tokenizer, ctx.ec
  # Room for the answer the generation may write beyond the gold's tokens.
  limit = ctx.model.cfg.max_len - ec.max_new_tokens
  book_docs, spec, cut = pipeline.open_book(docs, ctx.data.spec, tok.encode("\n\n"), limit)
  batches = list(pipeline.qa_eval_batches(book_docs, spec, ctx.data.pad_id, ec.batch_size))
  scores = qa.evaluate_qa(ctx.model.graphdef, ctx.params, ctx.model.cfg, tok, batches,
                          pipeline.questions(book_docs), ec.decoding, progress=ctx.progress, desc="open book",
                          return_predictions=True, **generate_kwargs(ec, ec.decoding))
  return scores | {"documents_cut": cut}


def first_questions(scores: dict, n: int) -> dict:
  """The per-question scores of a `score` result's first `n` questions: those of the stream's first documents
  (`pipeline.questions` keeps the stream's order)."""
  return {"per_question": {k: v[:n] for k, v in scores["per_question"].items()}}


def _references(ctx: Context, test_docs, val_docs, bc) -> tuple[dict, dict | None, dict]:
  """(the no-adaptation test `score`, its validation `score` when it is an lr candidate, the reference
  entries of results.json: "no_adaptation", "open_book", "meta_objective" and their times)."""
  ec, clock = ctx.ec, Clock()
  with clock("no_adaptation"):
    no_adapt = score(ctx, ctx.params, test_docs, ec.decoding, desc="no adaptation")
  ctx.say(f"no adaptation: test F1 {no_adapt['f1']:.4f}, answer NLL {no_adapt['nll']:.4f} on "
          f"{no_adapt['n']} questions")
  out = {"no_adaptation": with_ci(no_adapt, bc)}
  no_adapt_val = None
  if ec.no_adaptation_candidate:
    with clock("no_adaptation_val"):
      no_adapt_val = score(ctx, ctx.params, val_docs, ec.val_decoding or None, desc="no adaptation (val)")
  if ec.open_book:
    book_docs = test_docs[:ec.open_book_docs or None]
    with clock("open_book"):
      book = open_book(ctx, book_docs)
    closed = first_questions(no_adapt, book["n"])  # the same questions, closed book
    out["open_book"] = with_ci(book, bc) | {"docs": len(book_docs),
                                            "vs_no_adaptation": paired(book, closed, bc, ("f1", "nll"))}
    ctx.say(f"open book (the document in the prompt): test F1 {book['f1']:.4f}, answer NLL {book['nll']:.4f}")
  if ec.meta_objective and "camels" in method_names(ec):
    with clock("meta_objective"):
      by_step = meta_objective(ctx, test_docs)
    out["meta_objective"], out["meta_objective_by_step"] = by_step["1"], by_step
  return no_adapt, no_adapt_val, out | {"time_s": dict(clock.totals)}


def run(ctx: Context, writer) -> dict:
  """Evaluates every configured method; writes <workdir>/eval/ (all files, or none of them) and returns
  results.json's content."""
  ec = ctx.ec
  checks.validate_section("eval", ec, RULES, CROSS)  # before any adaptation, not after the first sweep
  test_docs, val_docs = list(ctx.data.stream().docs), _val_docs(ctx)
  no_adapt, no_adapt_val, references = _references(ctx, test_docs, val_docs, ec.bootstrap)
  methods = evaluate_methods(ctx, method_names(ec), val_docs, test_docs, writer, no_adapt_val)
  comparisons = compare(no_adapt, methods, ec.bootstrap, parts=position_parts(test_docs, ec.position_parts))
  results = references | {
      "methods": {name: result_json(r, comparisons[name], ec.bootstrap) for name, r in methods.items()},
      "test_docs": len(test_docs), "val_docs": len(val_docs), "test_questions": no_adapt["n"],
      "select": ec.select, "select_rule": SELECT_RULES[ec.select], "sweep": ec.sweep,
      "bootstrap": dict(ec.bootstrap),
      "manifest": os.path.join(ctx.workdir, MANIFEST_FILE)}
  if jax.process_index() == 0:  # every process computed the same results; one writes them
    report.write(os.path.join(ctx.workdir, "eval"), results,
                 {"no_adaptation": no_adapt} | {name: r.test for name, r in methods.items()},
                 heatmaps(ctx, methods, test_docs[:ec.heatmap_docs]))
  return results
