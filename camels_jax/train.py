"""Training jobs: QA-tuning of the base model, then CaMeLS meta-training of the weighting model.

  python -m camels_jax.train --config configs/default.py [--workdir DIR] [--config.camels.inner_lr=1e-3]

A rerun with the same workdir resumes: a finished QA-tuning is loaded rather than redone, and
meta-training continues from its latest checkpoint with the data position and RNG it had.
"""

import os

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from camels_jax import checkpoint, io_utils, metrics, qa_tune, sharding
from camels_jax import data as data_lib
from camels_jax.methods import camels
from camels_jax.models import loading

JOBS = ("qa_tune", "camels")


def finished_qa_tune(model: loading.Loaded, workdir: str):
  """(params, history) of the finished QA-tuning in <workdir>/qa_tune, or None if there is none."""
  with checkpoint.Checkpointer(os.path.join(workdir, "qa_tune"), max_to_keep=1) as ckpt:
    if ckpt.latest_step() is None:
      return None
    restored = ckpt.restore(None, {"params": model.params})
    logging.info("qa_tune: loaded the QA-tuned model from %s", ckpt.directory)
    return restored.state["params"], restored.meta["history"]


def qa_tuned_params(config, model: loading.Loaded, data, workdir: str, writer, progress: bool = True):
  """The QA-tuned base params: loaded from <workdir>/qa_tune if a finished run is there, else trained."""
  found = finished_qa_tune(model, workdir)
  if found is not None:
    return found
  params, history = qa_tune.qa_tune(model, data, config.qa_tune, writer, progress=progress)
  with checkpoint.Checkpointer(os.path.join(workdir, "qa_tune"), max_to_keep=1) as ckpt:
    ckpt.save(history[-1]["step"] + 1, {"params": params}, meta={"history": history})
  return params, history


def run(config: ml_collections.ConfigDict, workdir: str, progress: bool = True,
        distributed: bool | None = None) -> dict:
  """Runs the configured jobs in order; returns (and writes to train_results.json) their results."""
  jobs = [j.strip() for j in config.jobs.split(",") if j.strip()]
  unknown = sorted(set(jobs) - set(JOBS))
  if unknown:
    raise ValueError(f"config.jobs: unknown job(s) {unknown}; expected a comma-separated subset of {JOBS}")
  sharding.initialize_distributed(distributed)
  model = loading.load(config.model)
  data = data_lib.load(config.data, model.tokenizer, workdir)
  writer = metrics.MetricWriter(os.path.join(workdir, "tb"), enabled=jax.process_index() == 0)
  results = {}
  base_params, base_name = model.params, "raw"
  if "qa_tune" in jobs:
    base_params, history = qa_tuned_params(config, model, data, workdir, writer, progress)
    results["qa_tune"] = {"history": history, "best": min(history, key=lambda h: h["nll"])}
    base_name = "qa_tuned"
  elif "camels" in jobs:
    # Meta-training alone continues the experiment in this workdir: it adapts the QA-tuned model the
    # qa_tune job left here, as `jobs=qa_tune,camels` would, never silently the raw base model.
    found = finished_qa_tune(model, workdir)
    if found is not None:
      base_params, base_name = found[0], "qa_tuned"
    else:
      logging.warning("camels: no finished QA-tuning in %s: meta-training the raw base model (add "
                      "qa_tune to config.jobs to QA-tune it first, as the reference does)",
                      os.path.join(workdir, "qa_tune"))
  if "camels" in jobs:
    _, _, results["camels"] = camels.fit(config, model, base_params, data, workdir, writer, progress)
    results["camels"]["base_model"] = base_name
  writer.close()
  io_utils.write_json(os.path.join(workdir, "train_results.json"), results)
  return results


def main(argv):
  del argv
  checkpoint.quiet_orbax_logs()
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or config.workdir
  results = run(config, workdir, distributed=flags.FLAGS.distributed)
  if "qa_tune" in results:
    b = results["qa_tune"]["best"]
    print(f"qa_tune: best QA-val NLL {b['nll']:.4f} at step {b['step']}")
  if "camels" in results:
    print(camels_summary(results["camels"]))
  print(f"results in {os.path.join(workdir, 'train_results.json')}")


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
  app.run(main)
