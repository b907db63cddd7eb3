"""Fast Weight Layers on a small decoder trained from scratch (body and head together).

  python -m camels_jax.train --config configs/fwl_small.py
  python -m camels_jax.train --config configs/fwl_small.py --config.text.text_file=../shared/data/tinyshakespeare.txt

A 4-block, 256-wide Llama-style decoder with SmolLM2's tokenizer, randomly initialised and trained with the
FWL head end to end (`fwl.train_body`). Validation compares the validation articles' perplexity of the FWL model
with the same model's static perplexity (the head off); the last 10% of the articles (test) are never read. Not yet run to its 300 steps; a 20-step smoke run on the
generated text (2 CPU cores, shared, 10 s/step; before the validation split) reached held-out perplexity 274.9 with the head against 281.8
without it.
"""

import ml_collections

from camels_jax.data.text import text_config
from camels_jax.methods.fwl import fwl_config
from camels_jax.models.loading import model_config
from camels_jax.sharding import mesh_config


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/fwl_small"  # checkpoints (fwl/), TensorBoard events (tb/), train_results.json
  c.jobs = "fwl"
  c.model = model_config("random", tokenizer="smollm2", d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
                         d_ff=1024, max_len=512)
  c.mesh = mesh_config()  # devices: data parallel x FSDP (camels_jax/sharding.py)
  c.text = text_config()  # training text and held-out articles (camels_jax/data/text.py)
  c.fwl = fwl_config()
  c.fwl.train_body = True  # from scratch: the body learns with the head
  c.fwl.body_lr = 1e-3
  c.fwl.lr = 1e-3
  c.fwl.chunk = 64
  c.fwl.seq_len = 256
  c.fwl.batch_size = 8
  c.fwl.steps = 300
  c.fwl.val_every = 100
  return c
