"""MAC on SQuAD v1.1 paragraphs: configs/camels_squad_cpu.py (QA-tuned SmolLM2-135M, CaMeLS, every baseline)
plus MAC trained on the same meta-train paragraphs and evaluated on the same test stream, in one table.

  python -m camels_jax.train --config configs/mac_squad.py
  python -m camels_jax.evaluate --config configs/mac_squad.py

Needs ../shared/data/squad_v1.1_dev_part.json (data.path). Measured: see README ("MAC").
"""

from camels_jax import config_files
from camels_jax.methods.mac import mac_config


def get_config():
  c = config_files.sibling(__file__, "camels_squad_cpu")
  c.workdir = "runs/mac_squad"
  c.jobs = "qa_tune,camels,mac"  # camels_squad_cpu's jobs, then MAC on the same QA-tuned model
  c.mac = mac_config()  # MAC (camels_jax/methods/mac.py)
  c.mac.steps = 150  # CPU budget
  c.mac.val_every = 25
  c.eval.methods = "uniform,ssm,tfidf,camels,uniform+qa_lt,mac,retrieval,mac+retrieval"
  return c
