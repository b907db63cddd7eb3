"""The default job shrunk to a tiny random model and a few steps: a smoke test of every stage in about a
minute on 2 CPU cores (what the tests run, and what to try a change on first).

  python -m camels_jax.train --config configs/tiny.py
  python -m camels_jax.evaluate --config configs/tiny.py

Its numbers mean nothing (a random 2-block model, 6 test documents); it checks that the stages run.
"""

from camels_jax import config_files
from camels_jax.methods.mac import mac_config


def get_config():
  c = config_files.sibling(__file__, "default")
  c.workdir = "runs/tiny"
  c.model.source = "random"
  c.model.tokenizer = "gpt2"
  c.model.random.update(vocab_size=50257, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                        max_len=256)
  c.data.split_sizes.update(qa_train=12, qa_val=4, meta_train=12, meta_val=6, test=6)
  c.data.generated.loc_docs = 4
  c.data.doc_buckets = (256,)
  c.data.qa_len = 48
  c.data.loc_len = 64
  c.data.meta_batch_docs = 3
  c.data.stream_docs = 4
  c.data.qa_batch_size = 8
  c.qa_tune.max_steps = 4
  c.qa_tune.val_every = 2
  c.camels.weighting.base_layers = 1
  c.camels.weighting.hidden = 16
  c.camels.steps = 8
  c.camels.reset_every = 2
  c.camels.grad_accum = 2
  c.camels.val_every = 4
  c.camels.inner_lr = 0.3
  c.camels.outer_lr = 3e-3
  c.mac = mac_config()  # MAC on the tiny model (jobs / eval.methods add "mac" to run it)
  c.mac.update(tokens=2, heads=2, base_layers=1, window=2, bank_docs=3, questions=4, steps=4, val_every=2,
               mlp_mult=1, lr=1e-3)
  c.eval.lrs = (1e-3, 1e-4)
  c.eval.val_docs = 3
  c.eval.num_beams, c.eval.num_groups = 4, 2
  c.eval.max_new_tokens = 4
  c.eval.curve_points = 2
  c.eval.retention_docs = 2
  c.eval.heatmap_docs = 2
  c.eval.light_tune.update(max_steps=2, val_every=1, patience=1)
  return c
