"""Training jobs: QA-tuning of the base model, then CaMeLS meta-training of the weighting model, MAC's
networks, an FWL head.

  python -m camels_jax.train --config configs/default.py [--workdir DIR] [--config.camels.inner_lr=1e-3]

A rerun with the same workdir resumes: a finished QA-tuning is loaded rather than redone, and
meta-training continues from its latest checkpoint with the data position and RNG it had.
"""

import os

import jax
import ml_collections
from absl import logging

from camels_jax import checks, cli, io_utils, job, metrics, plots, report, sharding
from camels_jax import data as data_lib
from camels_jax.methods import camels, fwl, mac
from camels_jax.models import loading

UPTAKE_PLOT = "camels_uptake_vs_step.png"  # <workdir>/: meta-val uptake against the inner step, per weighting
FWL_PLOT = "fwl_training.png"  # <workdir>/: validation perplexity and learned step sizes against steps


def run(config: ml_collections.ConfigDict, workdir: str, progress: bool = True,
        distributed: bool | None = None) -> dict:
  """Runs the configured jobs in order; returns (and writes to train_results.json) their results."""
  checks.validate(config, job.RULES, job.CROSS)  # cli.session did it for the command line; callers in code too
  jobs = job.jobs_of(config)
  sharding.initialize_distributed(distributed)
  # One process speaks and writes files; all of them compute: QA-tuning and CaMeLS each on its own rows of
  # every batch, MAC and FWL in lockstep on whole batches (their parameters split when mesh.fsdp spans them).
  progress = progress and jax.process_index() == 0
  say = cli.phase if progress else logging.info
  model, data = _load(config, jobs, workdir, say)
  results = {"manifest": cli.manifest_path(workdir)}
  with metrics.MetricWriter(os.path.join(workdir, "tb"), enabled=jax.process_index() == 0) as writer:
    base_params, base_name, history = job.base_params(config, model, data, workdir, writer, progress, say)
    if history is not None:
      results["qa_tune"] = {"history": history, "best": min(history, key=lambda h: h["nll"])}
    base = base_name.replace("_", "-")
    if "camels" in jobs:
      say(f"camels: meta-training the weighting model on the {base} base model, {config.camels.steps} steps")
      _, _, results["camels"] = camels.fit(config, model, base_params, data, workdir, writer, progress)
      results["camels"]["base_model"] = base_name
    if "mac" in jobs:
      c = config.mac
      say(f"mac: training the amortization and aggregation networks on the {base} base model (frozen), "
          f"{c.steps} steps of {c.bank_docs}-document banks, {c.questions} questions each")
      _, _, results["mac"] = mac.fit(config, model, base_params, data, workdir, writer, progress)
      results["mac"]["base_model"] = base_name
    if "fwl" in jobs:
      results["fwl"] = _fit_fwl(config, model, workdir, writer, progress, say)
  if jax.process_index() == 0:
    if "fwl" in results:
      plots.plot_fwl_training(os.path.join(workdir, FWL_PLOT), results["fwl"]["history"])
    if "compare_by_step" in results.get("camels", {}):
      plots.plot_uptake_vs_step(os.path.join(workdir, UPTAKE_PLOT), results["camels"]["compare_by_step"],
                                "Uptake on meta-val against the inner step")
    io_utils.write_json(os.path.join(workdir, "train_results.json"), results)
  return results


def _load(config: ml_collections.ConfigDict, jobs: list[str], workdir: str, say):
  """The base model, placed on the job's mesh (every job's steps follow its shardings), and the QA data
  when a job reads it (else None)."""
  model = loading.load(config.model, sharding.job_mesh(config))
  job.check_model_fits(config, model.cfg)
  if "mac" in jobs:
    mac.check_fits(config.mac, model.cfg)
  say(f"model: {config.model.source}, {model.cfg.n_layers} blocks, d_model {model.cfg.d_model}")
  if not set(jobs) & set(job.QA_JOBS):
    return model, None
  data = data_lib.load(config.data, model.tokenizer, workdir)
  say(f"data: {config.data.dataset}, " + ", ".join(f"{k} {len(v)}" for k, v in data.splits.items())
      + " documents")
  return model, data


def _fit_fwl(config: ml_collections.ConfigDict, model: loading.Loaded, workdir: str, writer, progress: bool,
             say) -> dict:
  c = config.fwl
  say(f"fwl: training the fast-weight head{' and the body' if c.train_body else ''}, {c.steps} steps of "
      f"{c.batch_size} x {c.seq_len} tokens, text: {config.text.text_file or 'generated documents'}")
  _, _, result = fwl.fit(config, model, workdir, writer, progress)
  b, first = result["best"], result["history"][0]
  say(f"fwl: validation perplexity {b['val_ppl']:.3f} at step {b['step']} (static {b['val_static_ppl']:.3f}; "
      f"initial head {first['val_ppl']:.3f})")
  return result


def main(argv):
  del argv
  config, workdir, distributed = cli.flag_values()
  with cli.session("train", config, workdir, job.RULES, job.CROSS, job.SAFE_ON_RESUME,
                   prerequisites=job.check_sources, distributed=distributed, introduced=job.INTRODUCED):
    results = run(config, workdir, distributed=distributed)
  if jax.process_index() != 0:  # the processes of one run hold the same results; one prints them
    return
  if "qa_tune" in results:
    b = results["qa_tune"]["best"]
    print(f"qa_tune: best QA-val NLL {b['nll']:.4f} at step {b['step']}")
  if "camels" in results:
    print(report.camels_summary(results["camels"]))
  if "mac" in results:
    print(report.mac_summary(results["mac"]))
  print(f"results in {os.path.join(workdir, 'train_results.json')}; log and manifest in {workdir}")


if __name__ == "__main__":
  cli.define_flags(workdir_help="Checkpoints, TensorBoard events, results")
  cli.run(main)
