"""The online-adaptation evaluation: adapt the QA-tuned model on a document stream, then answer questions.

For every method (uniform, SSM, TF-IDF, CaMeLS, uniform + QA light-tune) and every learning rate of the
sweep, the QA-tuned base model is adapted on a validation stream (meta-val documents) and scored by F1 on
its questions; the best lr is then used on the test stream, scored by EM, prefix EM and F1, with F1
measured at points along the stream and the retention of the first documents. Every method goes through
`adapt.online.adapt_stream`; only the token weights differ.
"""

import dataclasses
import functools
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from camels_jax import checkpoint, io_utils, qa, qa_tune
from camels_jax.adapt import online
from camels_jax.data import pipeline
from camels_jax.methods import baselines, camels
from camels_jax.models import loading

METHODS = ("uniform", "ssm", "tfidf", "camels", "uniform+qa_lt")


def eval_config() -> ml_collections.ConfigDict:
  """The `eval` section of a job config."""
  return ml_collections.ConfigDict(dict(
      methods="uniform,ssm,tfidf,camels,uniform+qa_lt",  # comma-separated subset of METHODS
      lrs=(1e-4, 2.5e-5, 6.25e-6, 1.5625e-6),  # Adam lrs swept per method (reference README)
      val_docs=8,  # documents of the validation stream (meta-val split) used to pick each method's lr
      val_decoding="greedy",  # decoding when picking the lr ("greedy" is cheaper; "beam" as the test)
      decoding="beam",  # test decoding: "beam" (reference: 12 beams, 4 groups, penalty 10) or "greedy"
      num_beams=12, num_groups=4, diversity_penalty=10.0,  # diverse beam search (reference)
      max_new_tokens=16,  # answer budget (reference: 16)
      curve_points=4,  # points along the test stream where F1 on the documents seen so far is measured
      retention_docs=4,  # first documents whose questions are scored right after them and at the end
      heatmap_docs=3,  # documents drawn in the token-weight heatmaps
      tfidf_min_threshold=0.0,  # TF-IDF weights below this are set to 0 (reference: 0)
      light_tune=dict(lr=2.5e-5, patience=3, val_every=16, max_steps=200),  # uniform+qa_lt (reference)
      online=online.online_config(),  # adaptation optimiser (lr is swept)
  ))


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


def score(ctx: Context, params, docs, decoding: str, desc: str) -> dict:
  """QA metrics of `params` on every question about `docs`."""
  batches = list(pipeline.qa_eval_batches(docs, ctx.data.spec, ctx.data.pad_id, ctx.data.config.qa_batch_size))
  return qa.evaluate_qa(ctx.model.graphdef, params, ctx.model.cfg, ctx.model.tokenizer, batches,
                        pipeline.questions(docs), decoding, progress=ctx.progress, desc=desc,
                        **_generate_kwargs(ctx.ec, decoding))


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
  tok = ctx.model.tokenizer
  if method in ("uniform", "uniform+qa_lt"):
    return lambda d, length: _pad(np.ones(len(d.tokens), np.float32), length)
  if method in ("ssm", "tfidf"):
    options = {"min_threshold": ctx.ec.tfidf_min_threshold} if method == "tfidf" else {}
    weighter = baselines.make_weighter(method, texts_for_fit, **options)

    def fn(d, length):
      w = baselines.weights_for_tokens(weighter, d.doc.text, tok, len(d.tokens))
      return _pad(w, length)
    return fn
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


def load_weighting_model(ctx: Context):
  """The best (by meta-validation loss) weighting model of the train job in the same workdir."""
  c = ctx.config.camels
  wm_graphdef, wm_params = camels.build_weighting_model(c.weighting, ctx.model)
  mcfg = camels.meta_config(c, ctx.config.data.doc_buckets)
  meta = camels.init_meta_params(wm_params, mcfg)
  directory = os.path.join(ctx.workdir, "camels")
  with checkpoint.Checkpointer(directory, best_metric="val_loss") as ckpt:
    if ckpt.best_step() is None:
      raise FileNotFoundError(f"{directory}: no trained weighting model; run the 'camels' job first "
                              f"(python -m camels_jax.train --config ... with jobs including camels)")
    opt_state = camels.make_optimizer(c).init(meta)
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


def evaluate_method(ctx: Context, method: str, val_docs, test_docs, texts_for_fit, writer,
                    lrs=None) -> dict:
  """The lr sweep on the validation stream, then the test stream at the chosen lr."""
  ec = ctx.ec
  weights = weighting_fn(ctx, method, texts_for_fit)
  sweep = []
  for lr in lrs or ec.lrs:
    params = adapt(ctx, val_docs, weights, lr, desc=f"{method} lr={lr:g} (val)")
    if method == "uniform+qa_lt":
      params = light_tune(ctx, params)
    m = score(ctx, params, val_docs, ec.val_decoding, desc=f"{method} lr={lr:g} val QA")
    sweep.append({"lr": lr} | m)
    logging.info("%s lr=%g: val F1 %.4f", method, lr, m["f1"])
  # F1 first; prefix EM breaks ties (adapted models often say the answer, then keep talking).
  best = max(sweep, key=lambda r: (r["f1"], r["prefix_em"]))
  lr = best["lr"]

  n = len(test_docs)
  points = sorted({max(1, round(n * (k + 1) / ec.curve_points)) for k in range(ec.curve_points)})
  retention_n = min(ec.retention_docs, n)
  curve, retention = [], {}

  def on_doc(i, params):
    seen = i + 1
    if seen == retention_n:
      retention["right_after"] = score(ctx, params, test_docs[:retention_n], "greedy", "retention")["f1"]
    if seen in points:
      curve.append({"docs": seen, "f1": score(ctx, params, test_docs[:seen], "greedy", "curve")["f1"]})

  params = adapt(ctx, test_docs, weights, lr, on_doc=on_doc, desc=f"{method} lr={lr:g} (test)")
  if method == "uniform+qa_lt":
    params = light_tune(ctx, params)
  test = score(ctx, params, test_docs, ec.decoding, desc=f"{method} test QA")
  retention["at_end"] = score(ctx, params, test_docs[:retention_n], "greedy", "retention")["f1"]
  writer.write_scalars(0, {f"eval/{method}/{k}": v for k, v in test.items() if k in ("em", "f1", "prefix_em")})
  return {"sweep": sweep, "lr": lr, "test": test, "curve": curve, "retention": retention}


def run(ctx: Context, writer) -> dict:
  """Evaluates every configured method; writes <workdir>/eval/ (all files, or none of them)."""
  ec = ctx.ec
  methods = [m.strip() for m in ec.methods.split(",") if m.strip()]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise ValueError(f"eval.methods: unknown {unknown}; expected a subset of {METHODS}")
  stream = ctx.data.stream()
  test_docs = list(stream.docs)
  val_docs = list(pipeline.Stream(ctx.data.splits["meta_val"], min(ec.val_docs, len(ctx.data.splits["meta_val"])),
                                  ctx.data.config.stream_seed, ctx.data.spec, ctx.data.pad_id).docs)
  texts_for_fit = [d.doc.text for docs in ctx.data.splits.values() for d in docs]
  no_adapt = score(ctx, ctx.params, test_docs, ec.decoding, desc="no adaptation")
  results = {"no_adaptation": no_adapt, "methods": {}, "test_docs": len(test_docs), "val_docs": len(val_docs),
             "test_questions": no_adapt["n"]}
  heat = []
  for method in methods:
    lrs = None
    if method == "uniform+qa_lt" and "uniform" in results["methods"]:
      # The light-tune follows uniform adaptation at uniform's chosen lr: a sweep would light-tune 4 times.
      lrs = [results["methods"]["uniform"]["lr"]]
    results["methods"][method] = evaluate_method(ctx, method, val_docs, test_docs, texts_for_fit, writer, lrs)
    if method != "uniform+qa_lt":
      heat.append((method, weighting_fn(ctx, method, texts_for_fit)))
  write_outputs(ctx, results, heat, test_docs[:ec.heatmap_docs])
  return results


# ------------------------------------------------------------------------------------------------
# Outputs.


def table(results: dict) -> str:
  """Markdown: method x lr with validation F1, the chosen lr's test EM / prefix EM / F1 (best marked)."""
  lines = ["| method | lr | val F1 | test EM | test prefix EM | test F1 | test answer NLL |",
           "|---|---|---|---|---|---|---|"]
  na = results["no_adaptation"]
  lines.append(f"| no adaptation | - | - | {na['em']:.4f} | {na['prefix_em']:.4f} | {na['f1']:.4f} | "
               f"{na['nll']:.4f} |")
  best = max(results["methods"], key=lambda m: results["methods"][m]["test"]["f1"], default=None)
  for method, r in results["methods"].items():
    for row in r["sweep"]:
      chosen = row["lr"] == r["lr"]
      t = r["test"]
      mark = " **best**" if chosen and method == best else ""
      test_cells = (f"{t['em']:.4f} | {t['prefix_em']:.4f} | {t['f1']:.4f}{mark} | {t['nll']:.4f}" if chosen
                    else " | | | ")
      lines.append(f"| {method} | {row['lr']:g}{' (chosen)' if chosen else ''} | {row['f1']:.4f} | {test_cells} |")
  lines.append("")
  lines.append(f"{results['test_docs']} test documents, {results['test_questions']} questions; lr chosen on "
               f"{results['val_docs']} meta-val documents by F1. Retention (F1 on the first documents' "
               f"questions right after them -> at the end of the stream):")
  for method, r in results["methods"].items():
    ret = r["retention"]
    lines.append(f"- {method}: {ret.get('right_after', float('nan')):.4f} -> {ret['at_end']:.4f}")
  return "\n".join(lines) + "\n"


def write_outputs(ctx: Context, results: dict, heat, heat_docs) -> None:
  """Writes results.json, results.md, f1_curve.png and weight heatmaps into <workdir>/eval atomically:
  everything goes to a temporary folder that is renamed into place, so an interrupted run leaves the
  previous complete folder (or none), never a partial one."""
  final = os.path.join(ctx.workdir, "eval")
  tmp = tempfile.mkdtemp(dir=ctx.workdir, prefix=".eval-tmp-")
  try:
    io_utils.write_json(os.path.join(tmp, "results.json"), results)
    io_utils.write_atomic(os.path.join(tmp, "results.md"), table(results))
    plot_curves(os.path.join(tmp, "f1_curve.png"), results)
    tok = ctx.model.tokenizer
    pieces = [[tok.decode([t]) for t in d.tokens] for d in heat_docs]
    for method, fn in heat:
      docs = [(p, fn(d, len(d.tokens))) for p, d in zip(pieces, heat_docs)]
      baselines.heatmap_png(os.path.join(tmp, f"weights_{method}.png"), docs,
                            [f"{method}: {d.doc.id}" for d in heat_docs])
      html = "\n".join(baselines.heatmap_html(p, w, f"{method}: {d.doc.id}") for (p, w), d in zip(docs, heat_docs))
      io_utils.write_atomic(os.path.join(tmp, f"weights_{method}.html"), html)
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


def plot_curves(path: str, results: dict) -> None:
  """F1 on the questions of the documents seen so far, against documents adapted on."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for method, r in results["methods"].items():
    xs = [p["docs"] for p in r["curve"]]
    ax.plot(xs, [p["f1"] for p in r["curve"]], marker="o", label=f"{method} (lr {r['lr']:g})")
  ax.set_xlabel("documents adapted on")
  ax.set_ylabel("F1 on their questions (greedy)")
  ax.set_title("Online adaptation")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
