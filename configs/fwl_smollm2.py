"""Fast Weight Layers on SmolLM2-135M-Instruct: a fast-weight head trained on top of the frozen body.

  python -m camels_jax.train --config configs/fwl_smollm2.py
  python -m camels_jax.train --config configs/fwl_smollm2.py \
      --config.text.text_file=../shared/data/wikitext2_raw_test.txt --workdir runs/fwl_smollm2_wikitext

By default the text is the generated dataset's documents (no files); with WikiText-2 raw the last 10% of its
articles are the test articles, never read here, and the 10% before them the validation articles. Validation
(and the best checkpoint) uses the validation articles' perplexity of the FWL model, reported beside the
static model's (the same body and unembedding without the head). Scoring with it: `python -m camels_jax.perplexity
--config configs/ppl_smollm2.py --config.method=fwl --config.fwl_workdir=runs/fwl_smollm2`.

Measured before the validation articles were split off (bench/fwl_vs_dynamic.py of stop 33, 2 CPU cores; the
checkpoint was picked on the held-out articles): a head trained for 60 steps of 4 x 256 tokens of WikiText-2
test's first 55 articles (4.4 s/step) lowers the perplexity of the 7 held-out articles, on the same
512-token windows, from 25.51 (static) to 22.49, at 1.43x static's scoring time; the best dynamic-evaluation
variant lowers 21.01 to 20.14 at 3.68x. The bench's docstring has the whole table.
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
  c.fwl.steps = 150  # CPU budget
  c.fwl.val_every = 50
  c.fwl.lr = 1e-3
  return c
