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


def qa_tuned_params(config, model: loading.Loaded, data, workdir: str, writer, progress: bool = True):
  """The QA-tuned base params: loaded from <workdir>/qa_tune if a finished run is there, else trained."""
  with checkpoint.Checkpointer(os.path.join(workdir, "qa_tune"), max_to_keep=1) as ckpt:
    if ckpt.latest_step() is not None:
      restored = ckpt.restore(None, {"params": model.params})
      logging.info("qa_tune: loaded the QA-tuned model from %s", ckpt.directory)
      return restored.state["params"], restored.meta["history"]
    params, history = qa_tune.qa_tune(model, data, config.qa_tune, writer, progress=progress)
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
  base_params = model.params
  if "qa_tune" in jobs:
    base_params, history = qa_tuned_params(config, model, data, workdir, writer, progress)
    results["qa_tune"] = {"history": history, "best": min(history, key=lambda h: h["nll"])}
  if "camels" in jobs:
    _, _, results["camels"] = camels.fit(config, model, base_params, data, workdir, writer, progress)
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
    r = results["camels"]
    first = r["history"][0]
    print(f"camels: meta-val loss {first['val_loss']:.4f} at init -> {r['best']['val_loss']:.4f} "
          f"(best, step {r['best_step']}); QA NLL after adaptation {first['val_qa']:.4f} -> "
          f"{r['best']['val_qa']:.4f}")
  print(f"results in {os.path.join(workdir, 'train_results.json')}")


def define_flags():
  """Flags of this entry point (defined only when it runs, so modules can import each other)."""
  config_flags.DEFINE_config_file("config", None, "Job config (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events, results (default: config.workdir).")
  flags.DEFINE_bool(
      "distributed", None, "Join a multi-process run (jax.distributed); default: detect from the environment.")


if __name__ == "__main__":
  define_flags()
  app.run(main)
