"""Perplexity of a language model on a text.

  python -m camels_jax.perplexity --config configs/ppl_smollm2.py [--config.text_file=PATH]

The text is cut into non-overlapping windows of `seq_len` tokens (the last one padded); every token
but the first of each window is predicted from the window before it.
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

from camels_jax import io_utils, metrics
from camels_jax.adapt import loss
from camels_jax.data import generated
from camels_jax.data.sources import DataError, check_file
from camels_jax.models import loading, transformer


def windows(ids: list[int], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """tokens_NxL and mask_NxL of consecutive, non-overlapping windows."""
  n = max(1, math.ceil(len(ids) / seq_len))
  tokens_NxL = np.full((n, seq_len), pad_id, np.int32)
  mask_NxL = np.zeros((n, seq_len), np.int32)
  for i in range(n):
    chunk = ids[i * seq_len:(i + 1) * seq_len]
    tokens_NxL[i, :len(chunk)] = chunk
    mask_NxL[i, :len(chunk)] = 1
  return tokens_NxL, mask_NxL


@functools.partial(jax.jit, static_argnums=0)
def nll_sum(graphdef, params, tokens_BxL, mask_BxL):
  """Summed next-token NLL over real targets, and their count."""
  nll_BxL = loss.token_nll(transformer.apply(graphdef, params, tokens_BxL, mask_BxL), tokens_BxL)
  weight_BxL = loss.target_mask(mask_BxL)
  return (nll_BxL * weight_BxL).sum(), weight_BxL.sum()


def perplexity(graphdef, params, tokens_NxL: np.ndarray, mask_NxL: np.ndarray, batch_size: int,
               progress: bool = True) -> dict[str, float]:
  """{"ppl", "nll", "tokens"} of the windows, in batches of `batch_size` (padded with empty rows)."""
  total, count = 0.0, 0.0
  for i in tqdm.trange(0, len(tokens_NxL), batch_size, desc="perplexity", disable=not progress):
    tokens_BxL, mask_BxL = tokens_NxL[i:i + batch_size], mask_NxL[i:i + batch_size]
    short = batch_size - len(tokens_BxL)
    if short:  # one shape for every batch: a single compilation
      tokens_BxL = np.pad(tokens_BxL, ((0, short), (0, 0)))
      mask_BxL = np.pad(mask_BxL, ((0, short), (0, 0)))
    s, c = nll_sum(graphdef, params, tokens_BxL, mask_BxL)
    total, count = total + float(s), count + float(c)
  nll = total / max(count, 1.0)
  return {"ppl": math.exp(nll), "nll": nll, "tokens": int(count)}


def load_text(config: ml_collections.ConfigDict) -> str:
  """The configured text file, or (by default) documents of the generated dataset."""
  if config.text_file:
    with open(check_file(config.text_file), encoding="utf-8") as f:
      return f.read()
  docs = generated.generate(config.generated_seed, "test", config.generated_docs)
  return "\n\n".join(d.text for d in docs)


def run(config: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict:
  """Loads the model, measures perplexity and writes `perplexity.json` and TensorBoard scalars."""
  model = loading.load(config.model)
  text = load_text(config)
  ids = model.tokenizer.encode(text, add_bos=config.add_bos)
  if config.max_tokens:
    ids = ids[:config.max_tokens]
  if not ids:
    raise DataError(f"{config.text_file or 'generated text'}: no tokens to score")
  tokens_NxL, mask_NxL = windows(ids, min(config.seq_len, model.cfg.max_len), model.tokenizer.pad_id)
  result = perplexity(model.graphdef, model.params, tokens_NxL, mask_NxL, config.batch_size, progress)
  result |= {"source": config.model.source, "text": config.text_file or "generated"}
  writer = metrics.MetricWriter(os.path.join(workdir, "tb"), enabled=jax.process_index() == 0)
  writer.write_scalars(0, {"perplexity": result["ppl"], "nll": result["nll"]})
  writer.close()
  io_utils.write_json(os.path.join(workdir, "perplexity.json"), result)
  return result


def main(argv):
  del argv
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or config.workdir
  result = run(config, workdir)
  logging.info("perplexity %.3f over %d tokens", result["ppl"], result["tokens"])
  print(f"perplexity {result['ppl']:.3f} (nll {result['nll']:.4f}) over {result['tokens']} predicted tokens; "
        f"results in {os.path.join(workdir, 'perplexity.json')}")


def define_flags():
  """Flags of this entry point (defined only when it runs, so modules can import each other)."""
  config_flags.DEFINE_config_file("config", None, "Job config (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where results and TensorBoard events go (default: config.workdir).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
