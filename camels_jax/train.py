"""Training jobs: QA-tuning of the base model, then CaMeLS meta-training of the weighting model, MAC's
networks, an FWL head.

  python -m camels_jax.train --config configs/default.py [--workdir DIR] [--config.camels.inner_lr=1e-3]

A rerun with the same workdir resumes: a finished QA-tuning is loaded rather than redone, and
meta-training continues from its latest checkpoint with the data position and RNG it had.
"""

import os

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from camels_jax import checkpoint, cli, io_utils, metrics, qa_tune, sharding
from camels_jax import checks, evaluation
from camels_jax import data as data_lib
from camels_jax.data import config as data_config
from camels_jax.data import text as text_lib
from camels_jax.methods import camels, fwl, mac
from camels_jax.models import loading

JOBS = ("qa_tune", "camels", "mac", "fwl")
QA_JOBS = ("qa_tune", "camels", "mac")  # the jobs that read the QA dataset (`data`)
ON_QA_TUNED = ("camels", "mac")  # the jobs that train on the QA-tuned base model

# Every field of a train / evaluate job config with its valid range (each section's RULES sits beside the
# function that builds it), and the checks between fields: all run before a model or dataset is loaded.
RULES = {
    "workdir": checks.nonempty_string,
    "jobs": checks.subset_of(*JOBS),
    "model": loading.RULES,
    "data": data_config.RULES,
    "qa_tune": qa_tune.RULES,
    "camels": camels.RULES,
    "eval": evaluation.RULES,
    "text": text_lib.RULES,
    "fwl": fwl.RULES,
    "mac": mac.RULES,
    "mesh": sharding.RULES,
}


def _has(c, *sections) -> bool:
  return all(name in c for name in sections)


def _too_long(c, max_len: int, limit: str, at: str = "") -> list[str]:
  if not _has(c, "data"):
    return []
  lengths = {"data.doc_buckets": max(c.data.doc_buckets), "data.qa_len": c.data.qa_len, "data.loc_len": c.data.loc_len}
  return [f"{at}{key} reaches {n} tokens, more than {limit}={max_len}" for key, n in lengths.items() if n > max_len]


def _fits_random_model(c, at=""):
  """Sequences must fit a random model's positions (a loaded model's are checked by `check_model_fits`)."""
  return _too_long(c, c.model.random.max_len, f"{at}model.random.max_len", at) if c.model.source == "random" else []


def check_model_fits(config: ml_collections.ConfigDict, cfg) -> None:
  """Once a model is loaded: every sequence the data section asks for fits its context (one ConfigError)."""
  found = _too_long(config, cfg.max_len, f"the context of {config.model.source}")
  if found:
    raise checks.ConfigError("config: " + "; ".join(found))


def _padded_lens(c, at=""):
  """A "padded" loss divides by padded_len - 1: 0 (the longest bucket) or at least the longest document."""
  if not _has(c, "data", "camels", "eval"):
    return []
  longest = max(c.data.doc_buckets)
  return [f"{at}{key}={n} must be 0 or >= the longest of {at}data.doc_buckets={tuple(c.data.doc_buckets)}"
          for key, n in (("camels.padded_len", c.camels.padded_len),
                         ("eval.online.padded_len", c.eval.online.padded_len)) if 0 < n < longest]


def _qa_tune_splits(c, at=""):
  if not _has(c, "data", "qa_tune"):
    return []
  return [f"{at}qa_tune.{key}={c.qa_tune[key]!r} is not a split; expected one of {', '.join(c.data.split_sizes)}"
          for key in ("train_split", "val_split") if c.qa_tune[key] not in c.data.split_sizes]


def _weighting_layers(c, at=""):
  if not _has(c, "camels"):
    return []
  w = c.camels.weighting
  if c.model.source == "random" and w.backbone == "base" and w.base_layers > c.model.random.n_layers:
    return [f"{at}camels.weighting.base_layers={w.base_layers} exceeds the base model's "
            f"{at}model.random.n_layers={c.model.random.n_layers}"]
  return []


CROSS = (checks.within("model", loading.CROSS) + checks.within("data", data_config.CROSS)
         + checks.within("qa_tune", qa_tune.CROSS) + checks.within("camels", camels.CROSS)
         + checks.within("eval", evaluation.CROSS)
         + [_fits_random_model, _padded_lens, _qa_tune_splits, _weighting_layers])


def finished_qa_tune(model: loading.Loaded, workdir: str):
  """(params, history) of the finished QA-tuning in <workdir>/qa_tune, or None if there is none."""
  if not os.path.isdir(os.path.join(workdir, "qa_tune")):
    return None
  with checkpoint.Checkpointer(os.path.join(workdir, "qa_tune"), max_to_keep=1) as ckpt:
    if ckpt.latest_step() is None:
      return None
    restored = ckpt.restore(None, {"params": model.params})
    logging.info("qa_tune: loaded the QA-tuned model from %s", ckpt.directory)
    return restored.state["params"], restored.meta["history"]


def qa_tuned_params(config, model: loading.Loaded, data, workdir: str, writer, progress: bool = True):
  """The QA-tuned base params: loaded from <workdir>/qa_tune if a finished run is there, else trained."""
  say = cli.phase if progress else logging.info
  found = finished_qa_tune(model, workdir)
  if found is not None:
    say(f"qa_tune: loaded the finished QA-tuning in {os.path.join(workdir, 'qa_tune')}")
    return found
  say(f"qa_tune: QA-tuning the base model, at most {config.qa_tune.max_steps} steps")
  params, history = qa_tune.qa_tune(model, data, config.qa_tune, writer, progress=progress,
                                    mesh=sharding.job_mesh(config))
  with checkpoint.Checkpointer(os.path.join(workdir, "qa_tune"), max_to_keep=1) as ckpt:
    ckpt.save(history[-1]["step"] + 1, {"params": params}, meta={"history": history})
  return params, history


def run(config: ml_collections.ConfigDict, workdir: str, progress: bool = True,
        distributed: bool | None = None) -> dict:
  """Runs the configured jobs in order; returns (and writes to train_results.json) their results."""
  checks.validate(config, RULES, CROSS)  # cli.session has done it for the command line; callers in code too
  jobs = [j.strip() for j in config.jobs.split(",") if j.strip()]
  sharding.initialize_distributed(distributed)
  # One process speaks and writes files; all of them compute: QA-tuning and CaMeLS each on its own rows of
  # every batch, MAC and FWL in lockstep on whole batches (their parameters split when mesh.fsdp spans them).
  progress = progress and jax.process_index() == 0
  say = cli.phase if progress else logging.info
  mesh = sharding.job_mesh(config)
  model = loading.load(config.model, mesh)  # every job's steps follow the base model's shardings
  check_model_fits(config, model.cfg)
  if "mac" in jobs:
    mac.check_fits(config.mac, model.cfg)
  say(f"model: {config.model.source}, {model.cfg.n_layers} blocks, d_model {model.cfg.d_model}")
  data = None
  if set(jobs) & set(QA_JOBS):
    data = data_lib.load(config.data, model.tokenizer, workdir)
    say(f"data: {config.data.dataset}, " + ", ".join(f"{k} {len(v)}" for k, v in data.splits.items())
        + " documents")
  writer = metrics.MetricWriter(os.path.join(workdir, "tb"), enabled=jax.process_index() == 0)
  results = {"manifest": cli.manifest_path(workdir)}
  base_params, base_name = model.params, "raw"
  if "qa_tune" in jobs:
    base_params, history = qa_tuned_params(config, model, data, workdir, writer, progress)
    results["qa_tune"] = {"history": history, "best": min(history, key=lambda h: h["nll"])}
    base_name = "qa_tuned"
  elif set(jobs) & set(ON_QA_TUNED):
    # Meta-training (or MAC) alone continues the experiment in this workdir: it trains on the QA-tuned
    # model the qa_tune job left here, as `jobs=qa_tune,camels` would, never silently the raw base model.
    found = finished_qa_tune(model, workdir)
    if found is not None:
      base_params, base_name = found[0], "qa_tuned"
    else:
      logging.warning("no finished QA-tuning in %s", os.path.join(workdir, "qa_tune"))
      say(f"{'/'.join(j for j in jobs if j in ON_QA_TUNED)}: no finished QA-tuning in "
          f"{os.path.join(workdir, 'qa_tune')}: training on the raw base model (add qa_tune to config.jobs to "
          f"QA-tune it first, as the reference does)")
  if "camels" in jobs:
    say(f"camels: meta-training the weighting model on the {base_name.replace('_', '-')} base model, "
        f"{config.camels.steps} steps")
    _, _, results["camels"] = camels.fit(config, model, base_params, data, workdir, writer, progress)
    results["camels"]["base_model"] = base_name
  if "mac" in jobs:
    c = config.mac
    say(f"mac: training the amortization and aggregation networks on the {base_name.replace('_', '-')} base "
        f"model (frozen), {c.steps} steps of {c.bank_docs}-document banks, {c.questions} questions each")
    _, _, results["mac"] = mac.fit(config, model, base_params, data, workdir, writer, progress)
    results["mac"]["base_model"] = base_name
  if "fwl" in jobs:
    c = config.fwl
    say(f"fwl: training the fast-weight head{' and the body' if c.train_body else ''}, {c.steps} steps of "
        f"{c.batch_size} x {c.seq_len} tokens, text: {config.text.text_file or 'generated documents'}")
    _, _, results["fwl"] = fwl.fit(config, model, workdir, writer, progress)
    b, first = results["fwl"]["best"], results["fwl"]["history"][0]
    say(f"fwl: held-out perplexity {b['val_ppl']:.3f} at step {b['step']} (static {b['val_static_ppl']:.3f}; "
        f"initial head {first['val_ppl']:.3f})")
  writer.close()
  if jax.process_index() == 0:
    io_utils.write_json(os.path.join(workdir, "train_results.json"), results)
  return results


def check_sources(config: ml_collections.ConfigDict, workdir: str = "") -> None:
  """The files the configured jobs read exist and are not empty (before anything is loaded)."""
  del workdir
  jobs = {j.strip() for j in config.jobs.split(",")}
  if jobs & set(QA_JOBS):
    data_lib.check_sources(config.data)
  if "fwl" in jobs and config.text.text_file:
    text_lib.read_text(config.text.text_file)


# Fields a rerun in the same workdir may change (fnmatch patterns): more meta-training steps, how often
# and on what it validates, and anything evaluation-only. The rest would mix two experiments in one workdir.
SAFE_ON_RESUME = ("camels.steps", "camels.val_every", "camels.val_batches", "camels.compare",
                  "camels.compare_batches", "camels.remat", "qa_tune.log_every", "model.remat", "mesh.fsdp",
                  "model.remat_policy", "eval.*", "fwl.steps", "fwl.val_every", "mac.steps", "mac.val_every")


def main(argv):
  del argv
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or config.workdir
  with cli.session("train", config, workdir, RULES, CROSS, SAFE_ON_RESUME,
                   prerequisites=check_sources, distributed=flags.FLAGS.distributed):
    results = run(config, workdir, distributed=flags.FLAGS.distributed)
  if jax.process_index() != 0:  # the processes of one run hold the same results; one prints them
    return
  if "qa_tune" in results:
    b = results["qa_tune"]["best"]
    print(f"qa_tune: best QA-val NLL {b['nll']:.4f} at step {b['step']}")
  if "camels" in results:
    print(camels_summary(results["camels"]))
  if "mac" in results:
    print(mac_summary(results["mac"]))
  print(f"results in {os.path.join(workdir, 'train_results.json')}; log and manifest in {workdir}")


def mac_summary(r: dict) -> str:
  """What MAC's training reached on meta-val: answer NLL with the bank, with another bank, without a prefix."""
  first, best = r["history"][0], r["best"]
  return (f"mac: meta-val answer NLL {first['val_nll']:.4f} at init -> {best['val_nll']:.4f} (best, step "
          f"{r['best_step']}); with another batch's bank {best['val_nll_other_bank']:.4f}; base model alone "
          f"{best['val_nll_base']:.4f}")


def _fmt(x, spec=".4f"):
  return "-" if x is None else format(x, spec)


def _ci(ci) -> str:
  if not ci or ci.get("mean") is None:
    return "-"
  return f"{ci['mean']:+.4f} [{ci['lo']:+.4f}, {ci['hi']:+.4f}]"


def camels_summary(r: dict) -> str:
  """What meta-training reached: meta-val loss, uptake against mean-matched weightings, facts/filler."""
  first, best = r["history"][0], r["best"]
  lines = [f"camels ({r.get('base_model', '?')} base): meta-val loss {first['val_loss']:.4f} at init -> "
           f"{best['val_loss']:.4f} (best, step {r['best_step']}); answer NLL before adaptation "
           f"{best['val_qa_before']:.4f}, after {best['val_qa']:.4f}"]
  compare = r.get("compare")
  if compare:
    lines += [f"uptake on meta-val at the learned weights' step (every weighting mean-matched per document), "
              f"step {r['compare_step']}:",
              f"  {'weighting':<10} {'mean w':>7} {'uptake':>8} {'x uniform':>9} {'KL':>8} {'facts/filler':>12}  "
              f"per-question uptake − uniform [95% CI]"]
    uniform = compare.get("uniform", {}).get("uptake")
    for name, m in compare.items():
      lines.append(f"  {name:<10} {m['weight_mean']:7.4f} {m['uptake']:8.4f} {_fmt(m['x_uniform'], '9.2f'):>9} "
                   f"{m['kl']:8.2e} {_fmt(m['facts_filler'], '12.2f'):>12}  {_ci(m.get('vs_uniform'))}")
    learned, ssm = compare["learned"], compare.get("ssm")
    if uniform is not None and uniform <= 0:
      ratio = f"uniform weights teach nothing at this step (uptake {uniform:+.4f}), learned {learned['uptake']:+.4f}"
    else:
      ratio = f"learned/uniform uptake {_fmt(learned['x_uniform'], '.2f')}"
    verdicts = [f"{ratio} (target >= 2x)", f"facts/filler {_fmt(learned['facts_filler'], '.2f')} (target >= 2)"]
    if ssm is not None:
      d = ssm.get("vs_learned") or {}
      diff = None if d.get("mean") is None else {"mean": -d["mean"], "lo": -d["hi"], "hi": -d["lo"]}
      verdicts.append(f"learned > SSM: {'yes' if learned['uptake'] > ssm['uptake'] else 'no'} "
                      f"(per question {_ci(diff)})")
    lines.append("  " + "; ".join(verdicts))
  return "\n".join(lines)


def define_flags():
  """Flags of this entry point (defined only when it runs, so modules can import each other)."""
  config_flags.DEFINE_config_file("config", None, "Job config (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events, results (default: config.workdir).")
  flags.DEFINE_bool(
      "distributed", None, "Join a multi-process run (jax.distributed); default: detect from the environment.")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
