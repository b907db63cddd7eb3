"""The online-adaptation evaluation of every method, after the train job in the same workdir.

  python -m camels_jax.evaluate --config configs/default.py [--workdir DIR]

Writes <workdir>/eval/{results.json, results.md, f1_curve.png, weights_<method>.png|html} and
<workdir>/eval/predictions/<method>.json ({question id: answer}, what the official SQuAD v1.1 script reads)
with <method>_detail.json (question, gold answers, answer, per-question scores), and prints the results
table.

Launched as several processes (launch/*.sh, `--distributed`), they run the protocol in lockstep on one mesh:
with `mesh.fsdp` spanning them each holds its slice of every parameter; process 0 prints and writes.
"""

import os

import jax
from absl import logging

from camels_jax import cli, evaluation, job, metrics, qa_tune, report, sharding
from camels_jax import data as data_lib
from camels_jax.models import loading


def run(config, workdir: str, progress: bool = True, distributed: bool | None = None) -> dict:
  """Loads the QA-tuned model (training it if the train job has not) and evaluates every method."""
  sharding.initialize_distributed(distributed)
  # Several processes run the same protocol in lockstep on one mesh (each holds its slice of the parameters
  # when mesh.fsdp spans them); the first reports and writes.
  progress = progress and jax.process_index() == 0
  say = cli.phase if progress else logging.info
  # Online adaptation follows the base model's shardings: split over mesh.fsdp devices, or whole.
  model = loading.load(config.model, sharding.job_mesh(config))
  job.check_model_fits(config, model.cfg)
  data = data_lib.load(config.data, model.tokenizer, workdir)
  with metrics.MetricWriter(os.path.join(workdir, "tb"), enabled=jax.process_index() == 0) as writer:
    params, _ = qa_tune.tuned_params(config, model, data, workdir, writer, progress=progress, say=say)
    ctx = evaluation.Context(config, model, params, data, workdir, progress, say)
    return evaluation.run(ctx, writer)


def main(argv):
  del argv
  config, workdir, distributed = cli.flag_values()
  with cli.session("evaluate", config, workdir, job.RULES, job.CROSS, job.SAFE_ON_RESUME,
                   prerequisites=job.check_eval_sources, distributed=distributed, introduced=job.INTRODUCED):
    results = run(config, workdir, distributed=distributed)
  if jax.process_index():
    return
  print(report.table(results))
  cost = report.cost_lines(results)
  if cost:
    print("\n".join(["Adaptation cost:"] + cost) + "\n")
  print(f"outputs in {os.path.join(workdir, 'eval')}; log and manifest in {workdir}")


if __name__ == "__main__":
  cli.define_flags(workdir_help="The train job's workdir")
  cli.run(main)
