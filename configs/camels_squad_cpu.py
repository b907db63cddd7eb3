"""CaMeLS on real SQuAD paragraphs, sized for 2 CPU cores (41 minutes): QA-tune SmolLM2-135M on the
QA-train articles, meta-train the weighting model with the embedded default's levers, then evaluate every
method on a 40-paragraph test stream.

  python -m camels_jax.train --config configs/camels_squad_cpu.py
  python -m camels_jax.evaluate --config configs/camels_squad_cpu.py

Differences from configs/camels_squad.py (the reference's settings), all for the CPU budget:
- documents cut to 256 tokens (one bucket, one compilation of the meta step); the reference pads to 1024;
- the default's levers (configs/default.py says why): inner SGD lr 0.035 on weights rescaled to a fixed
  mean per document, outer Adam lr 1e-3 on every batch, a few dozen outer steps instead of thousands;
- 2 paragraphs per meta-batch (reference: 6), 5 question slots each;
- evaluation: lr picked by validation answer NLL on 4 meta-val paragraphs, greedy decoding, a 40-paragraph
  test stream (about 190 questions) instead of all 224 test paragraphs with diverse beam search.

Measured (2 CPU cores): QA-tuning 30 steps: QA-val NLL 6.92 ->
3.05, meta-training 16 steps (best at step 8), then the comparison of weightings. On 12 meta-val
paragraphs (about 60 questions), one inner step per paragraph at the learned weights' mean weight:

  weighting  uptake (nats)  x uniform  locality KL  facts/filler  per-question uptake - uniform [95% CI]
  learned    0.197          1.81       0.049        1.23          +0.31 [+0.16, +0.46]
  uniform    0.109          1.00       0.157        1.00
  SSM        0.099          0.91       0.112        1.95          +0.04 [-0.09, +0.17]
  TF-IDF     0.239          2.20       0.065        1.26          +0.30 [+0.19, +0.41]
  oracle     0.335          3.08       0.146        -             +0.21 [+0.10, +0.33]

Learned weights beat SSM (+0.27 [+0.10, +0.45] per question) and uniform, but not TF-IDF, and shift
weight to answer spans only a little (1.23) in 8 steps.

Evaluate: 20 min 29 s on a quiet machine (peak RSS 9.3 GB), on those trained weights. Test stream of 40
paragraphs, 185 questions, Adam online adaptation at the lr picked on 4 meta-val paragraphs (3e-5 for every
method), greedy decoding. F1 [95% CI] (reference gold), official SQuAD F1, F1 - uniform [95% CI, paired]:

  no adaptation  0.034 [0.018, 0.055]  0.046
  uniform        0.046 [0.029, 0.066]  0.063  -
  SSM            0.055 [0.033, 0.080]  0.078  +0.009 [-0.013, +0.030]
  TF-IDF         0.058 [0.037, 0.082]  0.082  +0.012 [-0.003, +0.028]
  CaMeLS         0.088 [0.058, 0.120]  0.109  +0.042 [+0.017, +0.066]
  uniform + QA light-tune  0.053 [0.028, 0.080]  0.060  +0.007 [-0.018, +0.030]

CaMeLS is the only method whose paired interval against uniform excludes 0: about 1.9x uniform's F1, as in
the paper (StreamingQA, DistilGPT2: 5.79 vs 3.76). Every adaptation still raises the answer NLL over no
adaptation (uniform by 0.87 nats, CaMeLS by 0.25); only the light-tune lowers it.
Timing on a quiet machine: train 20 min 37 s (peak RSS 12.5 GB; the comparison included, the same numbers
as above to the fourth decimal), evaluate 20 min 29 s: 41 min for the two commands.
"""

import ml_collections

from camels_jax import config_files


def get_config() -> ml_collections.ConfigDict:
  c = config_files.sibling(__file__, "camels_squad")
  d = config_files.sibling(__file__, "default")
  c.workdir = "runs/camels_squad_cpu"  # checkpoints, TensorBoard events (tb/), results
  c.data.doc_buckets = (256,)  # one bucket (paragraphs past 256 tokens are cut; counted in the log)
  c.data.meta_batch_docs = 2  # CPU budget (reference: 6)
  c.data.stream_docs = 24  # test paragraphs in the stream (about 110 questions): 60 min a split on 2 cores
  c.qa_tune.max_steps = 30  # CPU budget (reference: until QA-val NLL stops improving)
  c.qa_tune.val_every = 15
  c.qa_tune.lr = d.qa_tune.lr
  for key in ("inner_lr", "outer_lr", "grad_accum", "reset_every", "compare"):
    c.camels[key] = d.camels[key]
  c.camels.weighting.update(d.camels.weighting)
  c.camels.steps = 16  # CPU budget
  c.camels.val_every = 8
  c.camels.val_batches = 3
  c.camels.compare_batches = 3  # 6 meta-val paragraphs: 45 two-paragraph updates of ~13 s at 3 steps
  c.camels.compare_octaves = d.camels.compare_octaves  # at 1/2, 1 and 2 times the learned step
  # The lr is picked on 6 validation paragraphs, 4x fewer Adam steps than the test stream's 24 (the default
  # has as many): a longer validation stream costs (candidates x methods) updates per paragraph.
  c.eval.update(select=d.eval.select, lrs=d.eval.lrs, val_docs=6, val_decoding="", decoding="greedy",
                curve_points=2, meta_objective_docs=8, open_book_docs=12)
  c.eval.light_tune.update(d.eval.light_tune)
  return c
