"""The online-adaptation evaluation: adapt the QA-tuned model on a document stream, then answer questions.

For every method (uniform, SSM, TF-IDF, CaMeLS, uniform + QA light-tune) and every learning rate of the
sweep, the QA-tuned base model is adapted on a validation stream (meta-val documents) and scored on its
questions (the lr is picked by answer NLL or F1, `eval.select`); the chosen lr is then used on the test
stream, scored by EM, prefix EM, F1 and the official SQuAD EM / F1, with F1 measured at points along the
stream and the retention of the first documents. Each method's phases are timed (results.md says where the
time went). Every gradient method goes through `adapt.online.adapt_stream`; only the token weights differ.

MAC (`evaluate_mac`) takes no gradient step: each test document is amortized into its memory bank as it
arrives, and each question is answered by the frozen QA-tuned model with the prefix aggregated for it from
the bank; the same curve points, retention, test score and intervals, and a paired interval against CaMeLS.
Beside every method's scores: its adaptation time per document and XLA's compiled memory of its
per-document adaptation step (`cost_lines`).

Every test score comes with its 95% bootstrap interval over questions, and every method's difference from
uniform with a paired interval on the same questions (`camels_jax.stats`); the answers themselves, with
their per-question scores, are written next to the results (eval/predictions/).
"""

import contextlib
import dataclasses
import functools
import math
import os
import re
import shutil
import tempfile
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from camels_jax import checkpoint, checks, cli, io_utils, plots, qa, qa_tune, sharding, stats
from camels_jax import data as data_lib
from camels_jax.adapt import online, uptake
from camels_jax.data import pipeline
from camels_jax.methods import baselines, camels, mac
from camels_jax.models import loading

METHODS = ("uniform", "ssm", "tfidf", "camels", "uniform+qa_lt", "mac")
GRADIENT_METHODS = ("uniform", "ssm", "tfidf", "camels", "uniform+qa_lt")  # adapt by Adam steps on weighted losses

# Learning-rate selection rules (`eval.select`) and how the outputs describe them.
SELECT_RULES = {
    "nll": "lowest validation answer NLL (ties: higher F1)",
    "f1": "highest validation F1 (ties: higher prefix EM, then lower answer NLL)",
}

# Test metrics that get a bootstrap interval and a paired comparison with uniform: one value per question.
CI_METRICS = qa.GENERATED_METRICS


def eval_config() -> ml_collections.ConfigDict:
  """The `eval` section of a job config."""
  return ml_collections.ConfigDict(dict(
      methods="uniform,ssm,tfidf,camels,uniform+qa_lt",  # comma-separated subset of METHODS
      lrs=(1e-4, 2.5e-5, 6.25e-6, 1.5625e-6),  # Adam lrs (each > 0) swept per method (reference README)
      val_docs=8,  # documents (>= 1) of the validation stream (meta-val split) used to pick each method's lr
      val_decoding="greedy",  # decoding when picking the lr ("greedy" is cheaper; "beam" as the test)
      decoding="beam",  # test decoding: "beam" (reference: 12 beams, 4 groups, penalty 10) or "greedy"
      # Diverse beam search (reference); num_beams a multiple of num_groups, diversity_penalty >= 0.
      num_beams=12, num_groups=4, diversity_penalty=10.0,
      max_new_tokens=16,  # answer budget (reference: 16)
      batch_size=16,  # questions per scoring / generation batch (one shape; larger did not help on 2 cores)
      curve_points=4,  # points (>= 1) along the test stream where F1 on the documents seen so far is measured
      retention_docs=4,  # first documents (>= 1) whose questions are scored right after them and at the end
      heatmap_docs=3,  # documents (>= 1) drawn in the token-weight heatmaps
      # How each method's lr is picked on the validation stream (SELECT_RULES). "nll": lowest answer NLL,
      # smooth and fed by every answer token, so it still ranks the lrs when a few validation questions (the
      # CPU default has 9) leave their F1 tied; "f1": highest F1, ties to prefix EM (the earlier rule).
      select="nll",
      # Intervals over questions (camels_jax.stats): resamples >= 1, level in (0, 1).
      bootstrap=dict(resamples=2000, level=0.95, seed=0),
      tfidf_min_threshold=0.0,  # TF-IDF weights below this (>= 0) are set to 0 (reference: 0)
      # uniform+qa_lt (reference): lr > 0, the others >= 1 (as qa_tune's fields of the same names).
      light_tune=dict(lr=2.5e-5, patience=3, val_every=16, max_steps=200),
      online=online.online_config(),  # adaptation optimiser (lr is swept)
  ))


RULES = {
    "methods": checks.subset_of(*METHODS),
    "lrs": checks.each(checks.positive),
    "val_docs": checks.count,
    "val_decoding": checks.one_of(*qa.DECODINGS),
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
}


def _beam_groups(c, at=""):
  if "beam" in (c.decoding, c.val_decoding) and c.num_beams % c.num_groups:
    return [f"{at}num_beams={c.num_beams} must be a multiple of {at}num_groups={c.num_groups} (beams per group)"]
  return []


CROSS = [_beam_groups]


@dataclasses.dataclass
class Context:
  """What every method's evaluation needs: the model, the QA-tuned params, the data, the settings."""

  config: ml_collections.ConfigDict  # the whole job config
  model: loading.Loaded
  params: object  # QA-tuned base params
  data: object  # camels_jax.data.Data
  workdir: str
  progress: bool = True

  @property
  def ec(self):
    return self.config.eval


def _generate_kwargs(ec, decoding):
  kw = dict(max_new_tokens=ec.max_new_tokens)
  if decoding == "beam":
    kw |= dict(num_beams=ec.num_beams, num_groups=ec.num_groups, diversity_penalty=ec.diversity_penalty)
  return kw


def score(ctx: Context, params, docs, decoding: str, desc: str, prefix_fn=None) -> dict:
  """QA metrics of `params` (conditioned by `prefix_fn`, see `qa.evaluate_qa`) on every question about
  `docs`, with the per-question scores and answers.

  `qa.evaluate_qa`'s result with `return_predictions`: the aggregates plus "per_question" and
  "predictions" (see `summary` for the aggregates alone).
  """
  batches = list(pipeline.qa_eval_batches(docs, ctx.data.spec, ctx.data.pad_id, ctx.ec.batch_size))
  return qa.evaluate_qa(ctx.model.graphdef, params, ctx.model.cfg, ctx.model.tokenizer, batches,
                        pipeline.questions(docs), decoding, progress=ctx.progress, desc=desc,
                        return_predictions=True, prefix_fn=prefix_fn, **_generate_kwargs(ctx.ec, decoding))


def summary(scores: dict) -> dict:
  """The aggregate metrics of a `score` result (what results.json keeps; the per-question lists go to
  eval/predictions/)."""
  return {k: v for k, v in scores.items() if k not in ("per_question", "predictions")}


# ------------------------------------------------------------------------------------------------
# Intervals, comparisons, the lr rule.


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


# ------------------------------------------------------------------------------------------------
# Token weights of each method.


def weighting_fn(ctx: Context, method: str, texts_for_fit):
  """weights(TokenizedDoc, L) -> w_L (numpy, 0 on padding) for `method`, computed once per document."""
  fn = _weighting_fn(ctx, method, texts_for_fit)
  cache = {}

  def cached(d, length):
    if (d.doc.id, length) not in cache:
      cache[(d.doc.id, length)] = np.asarray(fn(d, length), np.float32)
    return cache[(d.doc.id, length)]
  return cached


def _weighting_fn(ctx: Context, method: str, texts_for_fit):
  if method in ("uniform", "uniform+qa_lt", "ssm", "tfidf"):
    options = {"min_threshold": ctx.ec.tfidf_min_threshold} if method == "tfidf" else {}
    name = "uniform" if method == "uniform+qa_lt" else method
    return baselines.doc_weighting(name, ctx.model.tokenizer, texts_for_fit, add_bos=ctx.data.spec.add_bos,
                                   **options)
  if method == "camels":
    wm_graphdef, meta = load_weighting_model(ctx)
    wfn = jax.jit(functools.partial(camels.token_weights, wm_graphdef))

    def fn(d, length):
      tokens_1xL = _pad(d.tokens, length)[None].astype(np.int32)
      mask_1xL = _pad(np.ones(len(d.tokens), np.int32), length)[None]
      return np.asarray(wfn(meta["wm"], tokens_1xL, mask_1xL))[0]
    return fn
  raise ValueError(f"eval.methods: unknown method {method!r}; expected one of {METHODS}")


def _pad(x, length):
  return np.pad(np.asarray(x)[:length], (0, max(0, length - len(x))))


def doc_weights(ctx: Context, weights, d) -> np.ndarray:
  """w_N of document `d`'s tokens, computed at its bucket length as the adaptation does (so CaMeLS's
  jitted weighting compiles once per bucket and the cache of `weighting_fn` is hit)."""
  n = len(d.tokens)
  return np.asarray(weights(d, pipeline.bucket(n, ctx.data.spec.doc_buckets)))[:n]


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
  w_BxL = np.stack([_pad(np.asarray(w, np.float32), length) for w in w_Ns])
  a_BxL = np.stack([_pad(np.asarray(a, bool)[:len(w)], length) for a, w in zip(answer_masks, w_Ns)])
  m_BxL = np.stack([_pad(np.ones(len(w), bool), length) for w in w_Ns])
  sums = {k: float(v) for k, v in uptake.facts_filler_sums(w_BxL, a_BxL, m_BxL).items()}
  mean = lambda w, n: w / n if n else None
  return {"facts_filler": stats.finite_or_none(uptake.facts_filler_ratio(sums)),
          "mean_weight": mean(sums["facts_w"] + sums["filler_w"], sums["facts_n"] + sums["filler_n"]),
          "facts_weight": mean(sums["facts_w"], sums["facts_n"]),
          "filler_weight": mean(sums["filler_w"], sums["filler_n"]),
          "facts_tokens": int(sums["facts_n"]), "filler_tokens": int(sums["filler_n"])}


def _no_weighting_model(directory: str) -> checks.UserError:
  return checks.UserError(f"{directory}: no trained weighting model, which eval.methods=camels needs; run "
                          f"`python -m camels_jax.train` with this config and workdir first (jobs qa_tune,camels), "
                          f"or drop camels from eval.methods")


def check_prerequisites(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Fails before anything is loaded (or QA-tuned) when the data or a configured method cannot be had."""
  data_lib.check_sources(config.data)
  if "mac" in _methods(config.eval):
    if "mac" not in config:
      raise checks.ConfigError("config: eval.methods has mac but the config has no mac section (configs/mac_default.py)")
    directory = os.path.join(workdir, "mac")
    if not os.path.isdir(directory):
      raise mac.no_trained_mac(directory)
    with checkpoint.Checkpointer(directory, best_metric="val_nll") as ckpt:
      if ckpt.best_step() is None:
        raise mac.no_trained_mac(directory)
  if "camels" in _methods(config.eval):
    directory = os.path.join(workdir, "camels")
    if not os.path.isdir(directory):
      raise _no_weighting_model(directory)
    with checkpoint.Checkpointer(directory, best_metric="val_loss") as ckpt:
      if ckpt.best_step() is None:
        raise _no_weighting_model(directory)


def _methods(ec) -> list[str]:
  return [m.strip() for m in ec.methods.split(",") if m.strip()]


def load_weighting_model(ctx: Context):
  """The best (by meta-validation loss) weighting model of the train job in the same workdir."""
  c = ctx.config.camels
  wm_graphdef, wm_params = camels.build_weighting_model(c.weighting, ctx.model)
  mcfg = camels.meta_config(c, ctx.config.data.doc_buckets)
  # On the base model's mesh, as meta-training placed it: the restore follows these shardings, and the
  # backbone shares the base model's devices (all processes' in a multi-process run).
  mesh = sharding.mesh_of(ctx.params)
  meta = sharding.place_params(camels.init_meta_params(wm_params, mcfg), mesh)
  directory = os.path.join(ctx.workdir, "camels")
  with checkpoint.Checkpointer(directory, best_metric="val_loss") as ckpt:
    if ckpt.best_step() is None:
      raise _no_weighting_model(directory)
    opt_state = sharding.place_params(camels.make_optimizer(c).init(meta), mesh)
    restored = ckpt.restore_best({"meta": meta, "opt": opt_state})
  return wm_graphdef, restored.state["meta"]


# ------------------------------------------------------------------------------------------------
# The protocol.


def adapt(ctx: Context, docs, weights, lr: float, on_doc=None, desc="adapt"):
  """The QA-tuned model adapted on `docs` in order with `weights` at learning rate `lr`."""
  oc = ctx.ec.online.copy_and_resolve_references()
  oc.lr = lr
  icfg = online.inner_config(oc, ctx.data.spec.doc_buckets)
  batches = [pipeline.doc_batch([d], ctx.data.spec, ctx.data.pad_id) for d in docs]
  weight_fn = lambda i, b: weights(docs[i], b["doc_tokens_BxL"].shape[1])[None]
  params, _ = online.adapt_stream(ctx.model.graphdef, ctx.params, batches, weight_fn, oc, icfg,
                                  on_doc=on_doc, progress=ctx.progress, desc=desc)
  return params


def light_tune(ctx: Context, params):
  """QA light-tune after adaptation (reference baseline): QA-train, early stop on QA-val F1."""
  lt = ctx.ec.light_tune
  c = qa_tune.qa_tune_config()
  c.update(lr=lt.lr, patience=lt.patience, val_every=lt.val_every, max_steps=lt.max_steps,
           stop_metric="f1", val_decoding="greedy", max_new_tokens=ctx.ec.max_new_tokens)
  model = dataclasses.replace(ctx.model, params=params)
  best, _ = qa_tune.qa_tune(model, ctx.data, c, _NullWriter(), progress=ctx.progress)
  return best


class _NullWriter:
  def write_scalars(self, step, scalars):
    del step, scalars


def evaluate_method(ctx: Context, method: str, val_docs, test_docs, weights, writer, lrs=None, stream=None):
  """The lr sweep on the validation stream, then the test stream at the chosen lr.

  Args:
    ctx: the evaluation context.
    method: one of `METHODS`.
    val_docs, test_docs: the validation and test streams (`TokenizedDoc`s, in order).
    weights: the method's `weighting_fn`.
    writer: TensorBoard scalars of the test scores.
    lrs: the lrs to sweep (default `eval.lrs`).
    stream: another method's raw "stream" (see Returns) at the same weights and lr, reused instead of
      adapting on the test stream again (uniform + QA light-tune starts from uniform's adapted model).

  Returns:
    (result, raw). result, as results.json keeps it: {"sweep": validation aggregates per lr, "lr": the
    one `select_lr` chose, "test": test aggregates with "ci", "curve": [{"docs", "f1", "lo", "hi"}],
    "retention", "weights": `weight_diagnostics` on the test documents}. raw: {"test": the test `score`
    with per-question lists and answers, "curve": [(docs, that point's `score`)], "stream": what
    `stream=` takes}, for the paired comparisons and the prediction files.
  """
  ec = ctx.ec
  clock = _Clock()
  sweep = []
  lrs = list(lrs or ec.lrs)
  for lr in lrs if len(lrs) > 1 else []:  # one lr needs no validation
    with clock("sweep"):
      params = adapt(ctx, val_docs, weights, lr, desc=f"{method} lr={lr:g} (val)")
      if method == "uniform+qa_lt":
        params = light_tune(ctx, params)
      m = score(ctx, params, val_docs, ec.val_decoding, desc=f"{method} lr={lr:g} val QA")
    sweep.append({"lr": lr} | summary(m))
    logging.info("%s lr=%g: val F1 %.4f, answer NLL %.4f", method, lr, m["f1"], m["nll"])
  lr = select_lr(sweep, ec.select) if sweep else lrs[0]

  along = _StreamScoring(ctx, test_docs, clock, lambda params, docs, decoding, desc: score(ctx, params, docs,
                                                                                         decoding, desc))
  if stream is not None and stream["lr"] == lr:
    params = stream["params"]
    along.curve, along.curve_scores = [dict(p) for p in stream["curve"]], list(stream["curve_scores"])
    along.retention = dict(stream["retention"])
    clock.totals["adapt"] = 0.0
  else:
    with clock("adapt"):
      params = adapt(ctx, test_docs, weights, lr, on_doc=along.on_doc, desc=f"{method} lr={lr:g} (test)")
    clock.totals["adapt"] -= clock.totals.get("curve", 0.0)  # the curve is scored inside the adaptation
  stream_out = {"lr": lr, "params": params, "curve": list(along.curve), "curve_scores": list(along.curve_scores),
                "retention": dict(along.retention)}
  if method == "uniform+qa_lt":
    with clock("light_tune"):
      params = light_tune(ctx, params)
  test = along.test_score(params, reuse_curve=method != "uniform+qa_lt", desc=f"{method} test QA")
  curve, retention, n = along.curve, along.retention, len(test_docs)
  writer.write_scalars(0, {f"eval/{method}/{k}": v for k, v in test.items() if k in CI_METRICS})
  diagnostics = weight_diagnostics([doc_weights(ctx, weights, d) for d in test_docs],
                                   [d.answer_mask for d in test_docs])
  time_s = dict(clock.totals, adapt_per_doc=clock.totals["adapt"] / max(n, 1), total=clock.elapsed())
  result = {"sweep": sweep, "lr": lr, "test": with_ci(test, ec.bootstrap), "curve": curve,
            "retention": retention, "weights": diagnostics, "time_s": time_s}
  return result, {"test": test, "curve": along.curve_scores, "stream": stream_out}


class _StreamScoring:
  """F1 at points along a test stream, retention of its first documents, and its final test score.

  `score_at(state, docs, decoding, desc)` scores the questions of `docs` with a method's state after some
  documents (adapted params, or MAC's bank); `on_doc(i, state)` is called after document i.
  """

  def __init__(self, ctx: Context, test_docs, clock: "_Clock", score_at):
    ec = ctx.ec
    n = len(test_docs)
    self.ctx, self.docs, self.clock, self.score_at = ctx, test_docs, clock, score_at
    self.points = sorted({max(1, round(n * (k + 1) / ec.curve_points)) for k in range(ec.curve_points)})
    self.retention_n = min(ec.retention_docs, n)
    self.curve, self.curve_scores, self.retention = [], [], {}

  def on_doc(self, i: int, state) -> None:
    seen, ec = i + 1, self.ctx.ec
    with self.clock("curve"):
      if seen == self.retention_n:
        self.retention["right_after"] = self.score_at(state, self.docs[:seen], "greedy", "retention")["f1"]
      if seen in self.points:
        m = self.score_at(state, self.docs[:seen], "greedy", "curve")
        ci = stats.bootstrap_ci(m["per_question"]["f1"], **_boot_kwargs(ec.bootstrap))
        self.curve.append({"docs": seen, "f1": m["f1"], "lo": ci["lo"], "hi": ci["hi"]})
        self.curve_scores.append((seen, m))

  def test_score(self, state, reuse_curve: bool, desc: str) -> dict:
    """The test score after the whole stream (the last curve point's when it is the same computation), and
    the retention at the end."""
    ec, n = self.ctx.ec, len(self.docs)
    with self.clock("test_score"):
      if reuse_curve and self.curve_scores and self.curve_scores[-1][0] == n and ec.decoding == "greedy":
        test = self.curve_scores[-1][1]  # the last curve point is the test score: same state, same decoding
      else:
        test = self.score_at(state, self.docs, ec.decoding, desc)
      if ec.decoding == "greedy":  # the first documents' questions are the test's first rows
        first = len(pipeline.questions(self.docs[:self.retention_n]))
        self.retention["at_end"] = float(np.mean(test["per_question"]["f1"][:first])) if first else None
      else:
        self.retention["at_end"] = self.score_at(state, self.docs[:self.retention_n], "greedy", "retention")["f1"]
    return test


def evaluate_mac(ctx: Context, test_docs, writer):
  """MAC on the test stream: each document amortized into the bank as it arrives (no gradient step), every
  question answered by the frozen QA-tuned model with the prefix aggregated from the bank for it.

  Returns (result, raw) shaped as `evaluate_method`'s (no lr sweep: MAC has no test-time lr), with "bank"
  (documents, tokens, bytes) and the bank saved with orbax in <workdir>/eval_mac_bank.
  """
  c = ctx.config.mac
  graphdef, params = mac.load_trained(ctx.config, ctx.model, ctx.workdir)
  clock, n = _Clock(), len(test_docs)

  def score_at(bank, docs, decoding, desc):
    return score(ctx, ctx.params, docs, decoding, desc, prefix_fn=mac.prefix_fn(graphdef, params, bank, n, c.window))

  along = _StreamScoring(ctx, test_docs, clock, score_at)
  first = pipeline.doc_batch([test_docs[0]], ctx.data.spec, ctx.data.pad_id)
  # Compiled before the clock starts, as the gradient methods' steps are by their lr sweep.
  jax.block_until_ready(mac.amortize_jit(graphdef, params, first["doc_tokens_BxL"], first["doc_mask_BxL"]))
  with clock("adapt"):
    bank = mac.stream_bank(graphdef, params, test_docs, ctx.data.spec, ctx.data.pad_id, c.tokens,
                           ctx.model.cfg.d_model, on_doc=along.on_doc, progress=ctx.progress, desc="mac (test)")
  clock.totals["adapt"] -= clock.totals.get("curve", 0.0)
  bank.save(os.path.join(ctx.workdir, "eval_mac_bank"))
  test = along.test_score(bank, reuse_curve=True, desc="mac test QA")
  writer.write_scalars(0, {f"eval/mac/{k}": v for k, v in test.items() if k in CI_METRICS})
  time_s = dict(clock.totals, adapt_per_doc=clock.totals["adapt"] / max(n, 1), total=clock.elapsed())
  result = {"sweep": [], "lr": None, "test": with_ci(test, ctx.ec.bootstrap), "curve": along.curve,
            "retention": along.retention, "weights": {}, "time_s": time_s,
            "bank": {"docs": bank.docs, "tokens": bank.size_tokens, "bytes": bank.nbytes}}
  result["memory_bytes"] = mac_memory(ctx, graphdef, params, first, bank)
  return result, {"test": test, "curve": along.curve_scores}


def mac_memory(ctx: Context, graphdef, params, doc_batch, bank) -> dict:
  """XLA's compiled memory of MAC's per-document amortization and of one batch's prefix, and the bank's."""
  amortize = mac.amortize_jit.lower(graphdef, params, doc_batch["doc_tokens_BxL"], doc_batch["doc_mask_BxL"])
  batch = next(iter(pipeline.qa_eval_batches(ctx.data.splits["meta_val"][:1], ctx.data.spec, ctx.data.pad_id,
                                             ctx.ec.batch_size)))
  bank_MxTxD, valid_M = bank.padded(bank.docs)
  answer = mac._prefix_jit.lower(graphdef, params, {k: batch[k] for k in ("qa_tokens_BxS", "qa_mask_BxS",
                                                                        "qa_loss_mask_BxS")},
                                 bank_MxTxD, valid_M, window=ctx.config.mac.window)
  return {"adapt": online.compiled_bytes(amortize.compile()), "prefix": online.compiled_bytes(answer.compile()),
          "bank": bank.nbytes}


class _Clock:
  """Wall-clock seconds per phase (`with clock("name"):`), to say where an evaluation's time goes."""

  def __init__(self):
    self.totals, self._start = {}, time.perf_counter()

  @contextlib.contextmanager
  def __call__(self, name: str):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

  def elapsed(self) -> float:
    return time.perf_counter() - self._start


def _difference(a, b):
  return a - b if a is not None and b is not None and math.isfinite(a - b) else None


def add_comparisons(results: dict, raw: dict, bc) -> None:
  """Adds, per method of `results`, "uptake" (no-adaptation test answer NLL − the method's) and, when
  uniform was run, "vs_uniform" ({metric: paired interval of method − uniform} on the test questions)
  and each curve point's "vs_uniform" (F1, same documents' questions); MAC also gets "vs_camels".

  Args:
    results: `run`'s results, updated in place.
    raw: {"no_adaptation": its test `score`, method: `evaluate_method`'s raw}.
    bc: the `eval.bootstrap` settings.
  """
  na_nll = results["no_adaptation"]["nll"]
  uniform = raw.get("uniform")
  for method, r in results["methods"].items():
    r["uptake"] = _difference(na_nll, r["test"]["nll"])
    if method == "mac" and "camels" in raw:  # the paper's comparison: amortization against learned weights
      r["vs_camels"] = paired(raw["mac"]["test"], raw["camels"]["test"], bc)
    if uniform is None or method == "uniform":
      continue
    r["vs_uniform"] = paired(raw[method]["test"], uniform["test"], bc)
    uniform_curve = dict(uniform["curve"])
    for point, (docs, m) in zip(r["curve"], raw[method]["curve"]):
      if docs in uniform_curve:
        point["vs_uniform"] = paired(m, uniform_curve[docs], bc, ("f1",))["f1"]


def run(ctx: Context, writer) -> dict:
  """Evaluates every configured method; writes <workdir>/eval/ (all files, or none of them)."""
  ec = ctx.ec
  checks.validate_section("eval", ec, RULES, CROSS)  # before any adaptation, not after the first sweep
  methods = _methods(ec)
  stream = ctx.data.stream()
  test_docs = list(stream.docs)
  val_docs = list(pipeline.Stream(ctx.data.splits["meta_val"], min(ec.val_docs, len(ctx.data.splits["meta_val"])),
                                  ctx.data.config.stream_seed, ctx.data.spec, ctx.data.pad_id).docs)
  texts_for_fit = [d.doc.text for docs in ctx.data.splits.values() for d in docs]
  start = time.perf_counter()
  no_adapt = score(ctx, ctx.params, test_docs, ec.decoding, desc="no adaptation")
  no_adapt_s = time.perf_counter() - start
  results = {"no_adaptation": with_ci(no_adapt, ec.bootstrap), "methods": {}, "test_docs": len(test_docs),
             "val_docs": len(val_docs), "test_questions": no_adapt["n"], "select": ec.select,
             "bootstrap": dict(ec.bootstrap), "time_s": {"no_adaptation": no_adapt_s},
             "manifest": cli.manifest_path(ctx.workdir)}
  say = cli.phase if ctx.progress else logging.info
  say(f"no adaptation: test F1 {no_adapt['f1']:.4f}, answer NLL {no_adapt['nll']:.4f} on {no_adapt['n']} questions")
  raw = {"no_adaptation": {"test": no_adapt}}
  heat = []
  for method in methods:
    if method == "mac":
      results["methods"]["mac"], raw["mac"] = evaluate_mac(ctx, test_docs, writer)
      r = results["methods"]["mac"]
      say(f"mac: test F1 {r['test']['f1']:.4f}, answer NLL {r['test']['nll']:.4f}; bank of {r['bank']['docs']} "
          f"documents, {r['bank']['tokens']} tokens, {r['bank']['bytes'] / 2**20:.2f} MiB "
          f"({r['time_s']['total']:.0f} s)")
      continue
    lrs = None
    if method == "uniform+qa_lt" and "uniform" in results["methods"]:
      # The light-tune follows uniform adaptation at uniform's chosen lr: a sweep would light-tune 4 times.
      lrs = [results["methods"]["uniform"]["lr"]]
    weights = weighting_fn(ctx, method, texts_for_fit)
    stream = raw["uniform"]["stream"] if method == "uniform+qa_lt" and "uniform" in raw else None
    results["methods"][method], raw[method] = evaluate_method(ctx, method, val_docs, test_docs, weights,
                                                              writer, lrs, stream)
    r = results["methods"][method]
    say(f"{method}: test F1 {r['test']['f1']:.4f}, answer NLL {r['test']['nll']:.4f} at lr {r['lr']:g} "
        f"({r['time_s']['total']:.0f} s)")
    if method != "uniform":  # only uniform's adapted model is reused (by the light-tune); free the rest
      raw[method].pop("stream")
    if method != "uniform+qa_lt":
      heat.append((method, weights))
  for r in raw.values():
    r.pop("stream", None)
  if set(methods) & set(GRADIENT_METHODS):
    # One step shape serves every gradient method (their weights are inputs), so one analysis covers them.
    oc = ec.online.copy_and_resolve_references()
    length = max(ctx.data.spec.doc_buckets)
    icfg = online.inner_config(oc, ctx.data.spec.doc_buckets)
    step = online.step_bytes(ctx.model.graphdef, ctx.params, length, oc, icfg)
    for method in methods:
      if method in GRADIENT_METHODS:
        results["methods"][method]["memory_bytes"] = {"adapt": step}
  add_comparisons(results, raw, ec.bootstrap)
  if jax.process_index() == 0:  # every process computed the same results; one writes them
    write_outputs(ctx, results, {name: r["test"] for name, r in raw.items()}, heat, test_docs[:ec.heatmap_docs])
  return results


# ------------------------------------------------------------------------------------------------
# Outputs.


def _num(x, spec: str = ".4f") -> str:
  return "-" if x is None or not math.isfinite(x) else format(x, spec)


def _ci_cell(ci, signed: bool = False) -> str:
  """A mean with its interval, e.g. 0.123 [0.101, 0.150] (signed: +0.012 [-0.030, +0.050]); - if none."""
  if not ci or ci.get("mean") is None:
    return "-"
  f = "+.3f" if signed else ".3f"
  return f"{ci['mean']:{f}} [{ci['lo']:{f}}, {ci['hi']:{f}}]"


def _metric_cell(scores: dict, metric: str) -> str:
  ci = scores.get("ci", {}).get(metric)
  return _ci_cell(ci) if ci else _num(scores.get(metric), ".3f")


def _best_method(results: dict):
  f1 = lambda m: _finite_or(results["methods"][m]["test"].get("f1"), -math.inf)
  return max(results["methods"], key=f1, default=None)


def _lr(r: dict) -> str:
  return "-" if r.get("lr") is None else f"{r['lr']:g}"


def cost_lines(results: dict) -> list[str]:
  """Adaptation time per document and memory of each method, and MAC against CaMeLS (Markdown table)."""
  methods = results["methods"]
  if not methods:
    return []
  lines = ["| method | adapt s / document | adapt memory (MiB) | memory bank (MiB) |", "|---|---|---|---|"]
  mib = lambda x: _num(None if x is None else x / 2**20, ".2f")
  for method, r in methods.items():
    mem = r.get("memory_bytes", {})
    lines.append(f"| {method} | {_num(r.get('time_s', {}).get('adapt_per_doc'), '.3f')} | {mib(mem.get('adapt'))} | "
                 f"{mib(mem.get('bank'))} |")
  if "mac" in methods and "camels" in methods:
    t = lambda m: methods[m].get("time_s", {}).get("adapt_per_doc")
    ratio = t("mac") / t("camels") if t("mac") is not None and t("camels") else None
    vs = methods["mac"].get("vs_camels", {}).get("f1")
    lines += ["", f"MAC / CaMeLS adaptation time per document: {_num(ratio, '.3f')}x (goal <= 0.15x); MAC - CaMeLS "
              f"F1 {_ci_cell(vs, True)} (paired, same questions)."]
  return lines


def _rule(results: dict) -> str:
  return SELECT_RULES.get(results.get("select"), str(results.get("select")))


def _aligned(rows) -> list[str]:
  """Rows of cells as left-aligned text columns, the first row underlined."""
  widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
  return lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:]


def table(results: dict) -> str:
  """The compact test table printed at the end of the evaluation (a terminal's width); the full one,
  with official SQuAD scores, the lr sweep and retention, is `report` (results.md)."""
  na = results["no_adaptation"]
  rows = [["method", "lr", "F1 [95% CI]", "F1 - uniform [95% CI]", "EM", "prefix EM", "NLL", "uptake",
           "facts/filler"],
          ["no adaptation", "-", _metric_cell(na, "f1"), "-", _num(na["em"], ".3f"), _num(na["prefix_em"], ".3f"),
           _num(na["nll"], ".3f"), "-", "-"]]
  for method, r in results["methods"].items():
    t = r["test"]
    rows.append([method, _lr(r), _metric_cell(t, "f1"), _ci_cell(r.get("vs_uniform", {}).get("f1"), True),
                 _num(t["em"], ".3f"), _num(t["prefix_em"], ".3f"), _num(t["nll"], ".3f"),
                 _num(r.get("uptake"), "+.3f"), _num(r.get("weights", {}).get("facts_filler"), ".2f")])
  notes = [
      f"{results['test_docs']} test documents, {results['test_questions']} questions; [95% CI]: bootstrap over "
      "the questions",
      "(F1 - uniform: paired, same questions). NLL: test answer NLL; uptake: no-adaptation NLL - the method's.",
      "facts/filler: mean token weight on answer spans / on the other tokens (1 for uniform).",
      f"lr chosen per method on {results['val_docs']} meta-val documents by {_rule(results)}.",
      "Full table (official SQuAD EM/F1, lr sweep, retention): eval/results.md",
  ]
  return "\n".join(_aligned(rows) + [""] + notes) + "\n"


def report(results: dict) -> str:
  """results.md: test scores with intervals and comparisons, the lr sweep, retention (Markdown)."""
  na = results["no_adaptation"]
  best = _best_method(results)
  lines = [
      f"Test: {results['test_docs']} documents, {results['test_questions']} questions. Every [interval] is a "
      f"{100 * results.get('bootstrap', {}).get('level', 0.95):g}% percentile bootstrap over the questions; "
      "\"F1 − uniform\" resamples the same questions for both (paired).",
      "",
      "| method | lr | EM | prefix EM | F1 | official EM | official F1 | F1 − uniform [95% CI] | answer NLL "
      "| uptake | facts/filler | mean weight |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
      f"| no adaptation | - | {' | '.join(_metric_cell(na, m) for m in CI_METRICS)} | - | {_num(na['nll'])} | - | "
      "- | - |",
  ]
  for method, r in results["methods"].items():
    t, w = r["test"], r.get("weights", {})
    cells = [_metric_cell(t, m) + (" **best**" if m == "f1" and method == best else "") for m in CI_METRICS]
    lines.append(f"| {method} | {_lr(r)} | {' | '.join(cells)} | "
                 f"{_ci_cell(r.get('vs_uniform', {}).get('f1'), True)} | {_num(t['nll'])} | "
                 f"{_num(r.get('uptake'), '+.4f')} | {_num(w.get('facts_filler'), '.3f')} | "
                 f"{_num(w.get('mean_weight'), '.3f')} |")
  lines += [
      "",
      "EM, prefix EM, F1 compare with the reference's gold (prefix EM is the CaMeLS reference's \"EM\"); official "
      "EM / F1 are SQuAD v1.1's evaluate script (best over every gold answer). Answer NLL: token-weighted, "
      "nats. Uptake: no-adaptation answer NLL − the method's (> 0: the gold answers became likelier). "
      "facts/filler: the method's mean token weight on answer-span tokens / on the other tokens of the test "
      "documents (1 for uniform); mean weight over their predicted tokens.",
      "",
      f"Learning rate chosen per method on {results['val_docs']} meta-val documents by {_rule(results)}:",
      "",
      "| method | lr | val EM | val prefix EM | val F1 | val answer NLL |",
      "|---|---|---|---|---|---|",
  ]
  for method, r in results["methods"].items():
    for row in r["sweep"]:
      chosen = " (chosen)" if row["lr"] == r["lr"] else ""
      lines.append(f"| {method} | {row['lr']:g}{chosen} | {_num(row['em'])} | {_num(row['prefix_em'])} | "
                   f"{_num(row['f1'])} | {_num(row['nll'])} |")
  lines += ["", "Retention (greedy F1 on the first documents' questions right after them -> at the end of the "
            "stream):"]
  for method, r in results["methods"].items():
    ret = r["retention"]
    lines.append(f"- {method}: {_num(ret.get('right_after'))} -> {_num(ret.get('at_end'))}")
  lines += ["", "Adaptation cost (adapt: the test stream's updates per document, without the curve points; memory: "
            "XLA's compiled memory of one document's adaptation step, arguments and temporaries; MAC's answers also "
            "aggregate the bank per question batch, in its test QA time):", ""] + cost_lines(results)
  lines += ["", "Where the time went (wall-clock seconds; adapt = the test stream's updates, without the curve "
            "points scored along it):", "",
            "| method | lr sweep | adapt | adapt / document | curve + retention | light-tune | test QA | total |",
            "|---|---|---|---|---|---|---|---|"]
  for method, r in results["methods"].items():
    t = r.get("time_s", {})
    lines.append(f"| {method} | " + " | ".join(_num(t.get(k), ".1f") for k in (
        "sweep", "adapt", "adapt_per_doc", "curve", "light_tune", "test_score", "total")) + " |")
  na_s = results.get("time_s", {}).get("no_adaptation")
  lines.append(f"| no adaptation | | | | | | {_num(na_s, '.1f')} | {_num(na_s, '.1f')} |")
  return "\n".join(lines) + "\n"


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


def write_outputs(ctx: Context, results: dict, test_scores: dict, heat, heat_docs) -> None:
  """Writes results.json, results.md, f1_curve.png, weight heatmaps and predictions/ into <workdir>/eval
  atomically: everything goes to a temporary folder that is renamed into place, so an interrupted run
  leaves the previous complete folder (or none), never a partial one.

  Args:
    ctx: the evaluation context.
    results: `run`'s results.
    test_scores: {"no_adaptation" or method: its test `score`} -> predictions/<name>.json ({id: answer})
      and predictions/<name>_detail.json (per-question answers and scores).
    heat: (method, weighting_fn) pairs to draw.
    heat_docs: the documents drawn.
  """
  final = os.path.join(ctx.workdir, "eval")
  tmp = tempfile.mkdtemp(dir=ctx.workdir, prefix=".eval-tmp-")
  try:
    io_utils.write_json(os.path.join(tmp, "results.json"), results)
    io_utils.write_atomic(os.path.join(tmp, "results.md"), report(results))
    for name, scores in test_scores.items():
      stem = os.path.join(tmp, "predictions", prediction_file_name(name))
      io_utils.write_json(stem + ".json", answers_by_id(scores))
      io_utils.write_json(stem + "_detail.json", prediction_details(scores))
    plots.plot_curves(os.path.join(tmp, "f1_curve.png"), results)
    tok = ctx.model.tokenizer
    pieces = [[tok.decode([t]) for t in d.tokens] for d in heat_docs]
    for method, fn in heat:
      docs = [(p, doc_weights(ctx, fn, d)) for p, d in zip(pieces, heat_docs)]
      ff = results["methods"].get(method, {}).get("weights", {}).get("facts_filler")
      label = f"{method} (facts/filler {_num(ff, '.2f')} on the test stream)"
      titles = [f"{label}: {d.doc.id}" for d in heat_docs]
      plots.heatmap_png(os.path.join(tmp, f"weights_{method}.png"), docs, titles)
      plots.write_heatmap_html(os.path.join(tmp, f"weights_{method}.html"), docs, titles,
                               f"Token weights: {method}")
    if os.path.exists(final):
      old = final + ".old"
      shutil.rmtree(old, ignore_errors=True)
      os.replace(final, old)
      os.replace(tmp, final)
      shutil.rmtree(old)
    else:
      os.replace(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
