"""CaMeLS on SQuAD: QA-tune SmolLM2-135M on the QA-train articles, then meta-train the weighting model with
the reference's settings (inner SGD lr 5e-4 on the padded-mean weighted loss, 6 documents per batch,
base reset every 4 batches, c_kl 0.1, Adam 1e-5 with 4-batch accumulation).

  python -m camels_jax.train --config configs/camels_squad.py \
      --config.data.path=../shared/data/squad_v1.1_dev_part.json

With the 38-article SQuAD v1.1 dev subset the split is 655/144/529/95/224 paragraphs (QA-train/QA-val/
meta-train/meta-val/test, by article; see camels_jax/data/config.py). Budget: an accelerator; on 2 CPU
cores a meta-training batch of 6 documents takes about 100 s, so the 2,000 batches here take 2-3 days.
A smoke test that it runs end to end: add --config.qa_tune.max_steps=2 --config.camels.steps=4
--config.camels.val_every=4 --config.camels.val_batches=1.
"""

import ml_collections

from camels_jax.data import get_data_config
from camels_jax.eval_config import eval_config
from camels_jax.methods.camels import camels_config
from camels_jax.models.loading import model_config
from camels_jax.qa_tune import qa_tune_config


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/camels_squad"  # checkpoints, TensorBoard events (tb/), results
  c.jobs = "qa_tune,camels"  # comma-separated, run in order
  c.model = model_config("smollm2")  # base model
  c.data = get_data_config("squad")  # SQuAD JSON split by article
  c.data.path = "../shared/data/squad_v1.1_dev_part.json"  # SQuAD-format JSON file(s), comma-separated
  c.qa_tune = qa_tune_config()  # QA-tuning (reference: Adam 2.5e-5, early stop on NLL)
  c.qa_tune.max_steps = 2000
  c.qa_tune.val_every = 100
  c.camels = camels_config()  # reference meta-training settings
  c.camels.steps = 2000
  c.camels.val_every = 100
  c.eval = eval_config()  # the reference protocol: Adam lr sweep, diverse beam search, all 224 test paragraphs
  c.eval.select = "f1"  # the reference picks the lr by validation F1
  c.eval.val_docs = 24  # meta-val paragraphs the lr is picked on
  return c
