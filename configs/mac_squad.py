"""MAC on SQuAD v1.1 paragraphs: configs/camels_squad_cpu.py (QA-tuned SmolLM2-135M, CaMeLS, every baseline)
plus MAC trained on the same meta-train paragraphs and evaluated on the same test stream, in one table.

  python -m camels_jax.train --config configs/mac_squad.py
  python -m camels_jax.evaluate --config configs/mac_squad.py

Needs ../shared/data/squad_v1.1_dev_part.json (data.path). Measured on 2 CPU cores (2026-12-05, split_seed 0,
other jobs beside parts of it): train 37.5 min (QA-tuning and CaMeLS 22, MAC 150 steps at 4.3 s and 4 validations
on the first 32 meta-val paragraphs, 147 questions, `mac.val_docs`), evaluate 43.5 min. Every baseline row equals
camels_squad_cpu's split 0 (same seeds; no adaptation 3.5735). MAC's meta-val answer NLL (own / other bank) went
3.615 untrained (the base model) -> 4.102 / 4.116 at step 50, 3.872 / 3.873 at 100, 4.094 / 4.092 at 150 (training
loss 5.38 / 3.71 / 3.40 over steps 1-50 / 51-100 / 101-150): on 579 meta-train paragraphs MAC never beat the base
model, so the best networks are the untrained ones and MAC's test row is the base model exactly. Test stream (24
paragraphs, 112 questions), F1 / answer NLL, paired against no adaptation (F1 0.052, NLL 3.573):

  retrieval (k = 1, TF-IDF; recall@1 0.643) 0.211 / 2.382: F1 +0.159 [+0.091, +0.227], NLL -0.997 [-1.207, -0.784]
  MAC (untrained = the base model) 0.052 / 3.573 (+0.000), its other-bank control the same; 0.041 s a paragraph
  MAC + retrieval 0.052 / 3.573; - retrieval: F1 -0.159 [-0.227, -0.091]
  CaMeLS (1e-4) 0.052 / 4.137; MAC - CaMeLS F1 -0.000 [-0.041, +0.042]
  uniform + light-tune 0.062 / 3.405; open book (first 12 paragraphs) 0.235 / 2.521
Retrieval is the only row that answers from the stream. No accelerator was lent to this task (the device tool's
status: not drawn), so the reference-sized MAC has not been run.
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
