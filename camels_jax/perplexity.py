"""Perplexity of a language model on a text: static, with dynamic evaluation, or with a Fast Weight Layer head.

  python -m camels_jax.perplexity --config configs/ppl_smollm2.py [--config.text_file=PATH]
      [--config.method=static|dynamic|fwl] [--config.dynamic.context=overlap|xl] [--config.dynamic.lr=1e-4]
      [--config.method=dynamic --config.sweep.enabled=true]

Every token but the first is scored. `dynamic` (camels_jax/methods/dynamic_eval.py) says how the text is
segmented: "overlap" windows (each token scored with up to a full window of context) or "xl" chunks attending
to cached keys and values of the tokens before them; method "dynamic" also takes a gradient step on each
segment after scoring it. Method "fwl" scores non-overlapping windows of `dynamic.window` tokens with the FWL
head of the `fwl` train job in `fwl_workdir` (the head adapts within each window) and reports the same
windows' static perplexity beside it.

With `sweep.enabled` (method "dynamic") the text's articles are split into training, validation and test
articles; the optimizer, learning rate and decay are selected on the validation articles
(camels_jax/methods/dynamic_sweep.py) and the test articles alone are scored, static and with the selected
settings, with a paired bootstrap interval over tokens on the difference. `max_tokens` then cuts the test
articles' tokens.

Launched as several processes (launch/*.sh with ENTRY=camels_jax.perplexity, or `--distributed`), the processes
run the job as one program with the model replicated on every device (the reading is sequential, so there is
nothing to split) and process 0 alone prints and writes.
"""

import os
import time

import jax
import ml_collections

from camels_jax import checks, cli, io_utils, job, metrics, sharding, stats
from camels_jax.data import generated
from camels_jax.data import text as text_lib
from camels_jax.data.sources import DataError, read_text
from camels_jax.methods import dynamic_eval, dynamic_sweep, fwl
from camels_jax.models import loading

METHODS = ("static", "dynamic", "fwl")

# The job's fields (configs/ppl_smollm2.py), checked before anything is loaded.
RULES = {
    "workdir": checks.nonempty_string,
    "model": loading.RULES,
    "method": checks.one_of(*METHODS),
    "dynamic": dynamic_eval.RULES,
    "sweep": dynamic_sweep.RULES,
    "fwl_workdir": checks.string,  # method fwl: the workdir of a finished `fwl` train job
    "text_file": checks.string,  # "" = generated documents
    "generated_seed": checks.seed,
    "generated_docs": checks.count,
    "max_tokens": checks.count_or_zero,  # 0 = all
    "batch_size": checks.count,  # method fwl: windows per forward pass
    "add_bos": checks.boolean,
}


def _fwl_needs_its_workdir(c, at=""):
  if c.method == "fwl" and not c.fwl_workdir:
    return [f"{at}method='fwl' needs {at}fwl_workdir (the workdir of `python -m camels_jax.train` with an fwl "
            f"config)"]
  return []


def _sweep_is_for_dynamic(c, at=""):
  found = []
  if c.sweep.enabled and c.method != "dynamic":
    found.append(f"{at}sweep.enabled=True selects dynamic evaluation's settings: it needs {at}method='dynamic' "
                 f"(not {c.method!r})")
  if c.method == "dynamic" and c.dynamic.optimizer == "rms" and not c.sweep.enabled:
    found.append(f"{at}dynamic.optimizer='rms' needs {at}sweep.enabled=True: its gradient statistics come from "
                 f"the training articles of the sweep's split (a one-value grid fixes its lr and decay)")
  return found


CROSS = (checks.within("model", loading.CROSS) + checks.within("dynamic", dynamic_eval.CROSS)
         + checks.within("sweep", dynamic_sweep.CROSS) + [_fwl_needs_its_workdir, _sweep_is_for_dynamic])

# Fields a rerun in the same workdir may change: they do not change what the workdir holds.
SAFE_ON_RESUME = ("batch_size", "method", "dynamic.*", "sweep.*", "fwl_workdir", "text_file", "max_tokens",
                  "generated_*", "add_bos")


def load_text(config: ml_collections.ConfigDict) -> str:
  """The configured text file, or (by default) documents of the generated dataset."""
  if config.text_file:
    return read_text(config.text_file)
  docs = generated.generate(config.generated_seed, "test", config.generated_docs)
  return "\n\n".join(d.text for d in docs)


def load_articles(config: ml_collections.ConfigDict) -> list[str]:
  """The articles of the configured text file (WikiText headings or paragraph blocks), or generated documents."""
  if config.text_file:
    return text_lib.articles(read_text(config.text_file))
  return [d.text for d in generated.generate(config.generated_seed, "test", config.generated_docs)]


def fwl_job_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of the fwl train job in `config.fwl_workdir` (its config.json); its model must be ours."""
  path = os.path.join(config.fwl_workdir, cli.CONFIG_FILE)
  job = io_utils.workdir_config(config.fwl_workdir, "a finished `python -m camels_jax.train` run with an fwl config")
  if "fwl" not in job:
    raise checks.UserError(f"{path}: that workdir's job has no fwl section (jobs={job.get('jobs')!r})")
  diffs = cli.config_differences(job.model.to_dict(), config.model.to_dict())
  if diffs:
    listed = "; ".join(f"model.{k}: {a!r} there, {b!r} here" for k, (a, b) in diffs.items())
    raise checks.ConfigError(f"the FWL head in {config.fwl_workdir} was trained on another model ({listed})")
  return job


def check_prerequisites(config: ml_collections.ConfigDict, workdir: str = "") -> None:
  """The text is readable and, for method fwl, the train job's workdir holds its config and a trained head (in
  seconds)."""
  del workdir
  if config.text_file:
    job.expect_file(config.text_file, "text_file")
    read_text(config.text_file)
  if config.method == "fwl":
    job.expect_dir(config.fwl_workdir, "fwl_workdir")
    fwl_job_config(config)
    fwl.require_trained(config.fwl_workdir)  # before the model loads, not when the head is restored


def run(config: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict:
  """Loads the model, measures perplexity and writes `perplexity.json` and TensorBoard scalars (on process 0)."""
  first = jax.process_index() == 0
  progress = progress and first
  # The text before the model: a bad file (or too few articles to split) fails in a second.
  split = None
  if config.sweep.enabled:
    split = text_lib.split_three(load_articles(config), config.sweep.val_fraction, config.sweep.heldout_fraction)
  else:
    text = load_text(config)
  # Replicated on all devices: with several processes, every step is one program over all of them, and a
  # trained FWL head (whatever mesh it was trained on) is restored onto this mesh.
  model = loading.load(config.model, sharding.job_mesh(config))
  c = config.dynamic
  if split is not None:
    dynamic_eval.check_model(c, model.cfg)
    result = run_sweep(config, model, *split, progress=progress)
  else:
    ids = model.tokenizer.encode(text, add_bos=config.add_bos)
    if config.max_tokens:
      ids = ids[:config.max_tokens]
    if len(ids) < 2:
      raise DataError(f"{config.text_file or 'generated text'}: {len(ids)} token(s); at least 2 are needed")
    if config.method == "fwl":
      result = _score_fwl(config, model, ids, progress)
    else:
      dynamic_eval.check_model(c, model.cfg)
      result = dynamic_eval.evaluate(model.graphdef, model.params, model.cfg, ids, c,
                                     dynamic=config.method == "dynamic", progress=progress)
  result |= {"method": config.method, "source": config.model.source, "text": config.text_file or "generated",
             "manifest": cli.manifest_path(workdir)}
  with metrics.MetricWriter(os.path.join(workdir, "tb"), enabled=first) as writer:
    writer.write_scalars(0, {f"perplexity/{config.method}": result["ppl"], f"nll/{config.method}": result["nll"]})
  if first:
    io_utils.write_json(os.path.join(workdir, "perplexity.json"), result)
  return result


def _score_fwl(config: ml_collections.ConfigDict, model, ids, progress: bool) -> dict:
  """Non-overlapping windows scored with the trained FWL head, and without it."""
  job = fwl_job_config(config)
  head_graphdef, trainable = fwl.load_trained(job, model, config.fwl_workdir)
  window = min(config.dynamic.window, model.cfg.max_len)
  tokens_NxL, mask_NxL = text_lib.windows(ids, window, model.tokenizer.pad_id)
  start = time.perf_counter()
  m = fwl.score_windows(model.graphdef, trainable.get("body", model.params), head_graphdef, trainable["head"],
                        tokens_NxL, mask_NxL, config.batch_size, job.fwl.chunk, progress,
                        fast_weights=job.fwl.get("fast_weights", True))  # absent: a workdir from before the field
  return {"nll": m["nll"], "ppl": m["ppl"], "tokens": m["tokens"], "time_s": time.perf_counter() - start,
          "updates": 0, "static_same_windows": {"nll": m["static_nll"], "ppl": m["static_ppl"]}}


def _first_line(article: str) -> str:
  return article.strip().split("\n")[0][:80]


def run_sweep(config: ml_collections.ConfigDict, model, train, val, test, progress: bool = True) -> dict:
  """Selects dynamic evaluation's settings on the validation articles (`train` feeds optimizer rms's statistics),
  then scores the test articles static and dynamic at the selection (module docstring)."""
  s = config.sweep
  tok = model.tokenizer
  train_ids, val_ids = (text_lib.token_stream(tok, a, config.add_bos) for a in (train, val))
  test_ids = text_lib.token_stream(tok, test, config.add_bos)[:config.max_tokens or None]
  report, rms = dynamic_sweep.select(model.graphdef, model.params, model.cfg, config.dynamic, s, train_ids,
                                     val_ids, progress)
  chosen = dynamic_sweep.Candidate(**report["selected"]).section(config.dynamic)
  start = time.perf_counter()
  static = dynamic_eval.score(model.graphdef, model.params, model.cfg, test_ids, chosen, dynamic=False,
                              progress=progress)
  static_s = time.perf_counter() - start
  start = time.perf_counter()
  dynamic = dynamic_eval.score(model.graphdef, model.params, model.cfg, test_ids, chosen, dynamic=True,
                               progress=progress, rms=rms)
  seconds = time.perf_counter() - start
  nll, static_nll = float(dynamic.nll_T.mean()), float(static.nll_T.mean())
  return {"nll": nll, "ppl": dynamic_eval.perplexity(nll), "tokens": int(dynamic.nll_T.size), "time_s": seconds,
          "updates": dynamic.updates,
          "static": {"nll": static_nll, "ppl": dynamic_eval.perplexity(static_nll), "time_s": static_s},
          "dynamic_minus_static_nll": stats.paired_bootstrap_ci(dynamic.nll_T, static.nll_T),
          "sweep": report,
          "split": {"train_articles": len(train), "val_articles": len(val), "test_articles": len(test),
                    "train_tokens": len(train_ids), "val_tokens": len(val_ids), "test_tokens": len(test_ids),
                    "val_first_lines": [_first_line(a) for a in val],
                    "test_first_lines": [_first_line(a) for a in test]}}


def main(argv):
  del argv
  config, workdir, distributed = cli.flag_values()
  with cli.session("perplexity", config, workdir, RULES, CROSS, SAFE_ON_RESUME, prerequisites=check_prerequisites,
                   distributed=distributed):
    result = run(config, workdir)
  if jax.process_index():
    return
  extra = ""
  if "sweep" in result:
    sel, d = result["sweep"]["selected"], result["dynamic_minus_static_nll"]
    extra = (f"; selected on {result['split']['val_articles']} validation articles: {sel['optimizer']} lr "
             f"{sel['lr']:g}" + (f" decay {sel['decay']:g}" if sel["optimizer"] == "rms" else "")
             + (f" (EDGE: {'; '.join(result['sweep']['edge'])})" if result["sweep"]["edge"] else "")
             + f"; static {result['static']['ppl']:.3f} on the same {result['split']['test_articles']} test "
             f"articles, NLL difference {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]")
  if "static_same_windows" in result:
    extra = f"; static on the same windows {result['static_same_windows']['ppl']:.3f}"
  print(f"{config.method} perplexity {result['ppl']:.3f} (nll {result['nll']:.4f}) over {result['tokens']} "
        f"predicted tokens in {result['time_s']:.1f} s{extra}; results in {os.path.join(workdir, 'perplexity.json')}")


if __name__ == "__main__":
  cli.define_flags(workdir_help="Where results and TensorBoard events go")
  cli.run(main)
