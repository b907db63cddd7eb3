"""MAC on SQuAD v1.1 paragraphs: configs/camels_squad_cpu.py (QA-tuned SmolLM2-135M, CaMeLS, every baseline)
plus MAC trained on the same meta-train paragraphs and evaluated on the same test stream, in one table.

  python -m camels_jax.train --config configs/mac_squad.py
  python -m camels_jax.evaluate --config configs/mac_squad.py

Needs ../shared/data/squad_v1.1_dev_part.json (data.path). Not yet measured. Started on 2026-12-05 from split 1's
camels_squad_cpu workdir: MAC trains on 579 meta-train paragraphs at ~7 s a step on 2 cores, and each validation
over the 131 meta-val paragraphs took 10.7 min (beside a test run), so 150 steps validated every 25 need about
1.5 h; it was stopped at step 7 (training loss 5.0-5.9 against the base model's 3.05).
"""

from camels_jax import config_files
from camels_jax.methods.mac import mac_config


def get_config():
  c = config_files.sibling(__file__, "camels_squad_cpu")
  c.workdir = "runs/mac_squad"
  c.jobs = "qa_tune,camels,mac"  # camels_squad_cpu's jobs, then MAC on the same QA-tuned model
  c.mac = mac_config()  # MAC (camels_jax/methods/mac.py)
  c.mac.steps = 150  # CPU budget
  c.mac.val_every = 50
  c.mac.val_docs = 32  # 4 banks of meta-val paragraphs, ~2.6 min a validation (all 131: 10.7 min)
  c.eval.methods = "uniform,ssm,tfidf,camels,uniform+qa_lt,mac,retrieval,mac+retrieval"
  return c
