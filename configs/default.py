"""The embedded default: QA-tune SmolLM2-135M, meta-train a CaMeLS weighting model, then evaluate every
method, on the generated dataset (fictional people, organisations and towns; no files, no network).

  python -m camels_jax.train --config configs/default.py
  python -m camels_jax.evaluate --config configs/default.py

Measured on 2 CPU cores (quiet machine): train 8 min 8 s, evaluate 12 min 37 s. QA-tuning (20 steps)
lowers QA-val answer NLL from 7.29 to 2.705. Eight meta-training steps at outer lr 1e-4 move the meta-val
loss only from 1.9428 to 1.9427: too few steps to learn weights. The exact meta step compiles in about 20 s
and takes about 16 s per 256-token document. Test stream of 8 documents (24 questions), beam search:

  method          lr      EM      prefix EM  F1      answer NLL
  no adaptation   -       0.0000  0.0000     0.0000  2.791
  uniform         3e-4    0.0000  0.0417     0.0128  4.962
  ssm             3e-4    0.0000  0.0000     0.0000  2.933
  tfidf           3e-4    0.0417  0.0417     0.0417  2.817
  camels          3e-4    0.0000  0.0417     0.0139  4.933
  uniform+qa_lt   3e-4    0.0417  0.0417     0.0417  2.304

The documents are fictional, so nothing is answerable without adaptation. Adapted models often state the
answer and then keep going, which is why prefix EM exceeds F1. Results go to
runs/default/train_results.json and runs/default/eval/.
"""

import ml_collections

from camels_jax.data import get_data_config
from camels_jax.evaluation import eval_config
from camels_jax.methods.camels import camels_config
from camels_jax.models.loading import model_config
from camels_jax.qa_tune import qa_tune_config


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/default"  # checkpoints, TensorBoard events (tb/), results
  c.jobs = "qa_tune,camels"  # comma-separated, run in order: "qa_tune", "camels"
  c.model = model_config("smollm2")  # base model (camels_jax/models/loading.py)
  c.data = get_data_config("generated")  # dataset, splits, lengths (camels_jax/data/config.py)
  c.data.doc_buckets = (256,)  # one bucket: one compilation of the meta step
  c.data.qa_len = 32  # generated questions + answers are at most 28 SmolLM2 tokens
  c.data.meta_batch_docs = 2  # CPU budget (reference: 6); memory of the exact meta step ~ documents
  c.data.stream_docs = 8  # CPU budget: 8 test documents, 24 questions
  c.qa_tune = qa_tune_config()  # QA-tuning of the base model (camels_jax/qa_tune.py)
  c.qa_tune.max_steps = 20  # CPU budget: ~4 min
  c.qa_tune.val_every = 10
  c.qa_tune.lr = 1e-4  # higher than the reference's 2.5e-5: 20 steps, not thousands
  c.camels = camels_config()  # meta-training (camels_jax/methods/camels.py)
  c.camels.weighting.base_layers = 2  # a 2-block weighting model from SmolLM2's first blocks
  c.camels.steps = 8  # CPU budget
  c.camels.val_every = 4
  c.camels.grad_accum = 2
  c.camels.val_batches = 2
  c.camels.outer_lr = 1e-4  # higher than the reference's 1e-5: 8 batches, not tens of thousands
  c.eval = eval_config()  # online-adaptation evaluation (camels_jax/evaluation.py)
  c.eval.lrs = (3e-4, 1e-4)  # two lrs (CPU budget); 12 one-step updates need more than the reference's 1e-4
  c.eval.val_docs = 3  # CPU budget: the lr is picked on 3 meta-val documents (9 questions)
  c.eval.curve_points = 3
  c.eval.light_tune.update(max_steps=10, val_every=5)
  return c
