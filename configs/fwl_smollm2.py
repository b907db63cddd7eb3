"""Fast Weight Layers on SmolLM2-135M-Instruct: a fast-weight head trained on top of the frozen body.

  python -m camels_jax.train --config configs/fwl_smollm2.py
  python -m camels_jax.train --config configs/fwl_smollm2.py \
      --config.text.text_file=../shared/data/wikitext2_raw_test.txt --workdir runs/fwl_smollm2_wikitext

By default the text is the generated dataset's documents (no files); with WikiText-2 raw the last 10% of its
articles are the test articles, never read here, and the 10% before them the validation articles. Validation
(and the best checkpoint) uses the validation articles' perplexity of the FWL model, reported beside the
static model's (the same body and unembedding without the head). Scoring with it: `python -m camels_jax.perplexity
--config configs/ppl_smollm2.py --config.method=fwl --config.fwl_workdir=runs/fwl_smollm2`.

Measured with the second command (2026-12-05, 2 CPU cores; WikiText-2 raw test, 48 training / 7 validation / 7 test
articles; these settings, resumed once at step 80): validation perplexity (16 windows of 256 tokens) 42.77 with the initial head, 35.82 at
step 80, 32.30 at 200, best 31.62 at step 240 (static 43.00); steps 260-300 did not beat it (the second pass over
the 1,007 training windows starts at step 252: training loss fell, validation rose), so early stopping ended the
run at step 300 (~6 s/step alone). bench/fwl_vs_dynamic.py scored that head on the test articles: 24.95 (static,
512-token windows) to 19.02 (-23.8%), against tuned dynamic evaluation's 18.28 (-26.8%) on the same windows; its
docstring and README have the table.
"""

import ml_collections

from camels_jax.data.text import text_config
from camels_jax.methods.fwl import fwl_config
from camels_jax.models.loading import model_config
from camels_jax.sharding import mesh_config


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/fwl_smollm2"  # checkpoints (fwl/), TensorBoard events (tb/), train_results.json
  c.jobs = "fwl"
  c.model = model_config("smollm2")  # the base model (camels_jax/models/loading.py)
  c.mesh = mesh_config()  # devices: data parallel x FSDP (camels_jax/sharding.py)
  c.text = text_config()  # training text and held-out articles (camels_jax/data/text.py)
  c.fwl = fwl_config()  # the head and its training (camels_jax/methods/fwl.py)
  c.fwl.chunk = 64
  c.fwl.steps = 400  # early stopping ends it sooner on WikiText-2 (docstring)
  c.fwl.val_every = 20
  c.fwl.patience = 3
  c.fwl.lr = 1e-3
  return c
