"""A tiny base model, weighting model and hand-made meta-batch shared by the CaMeLS tests."""

import jax
import jax.numpy as jnp
import numpy as np

from camels_jax.methods import camels
from camels_jax.models import loading, transformer
from camels_jax.models.config import ModelConfig

V = 40


def tiny(dtype="float32", seed=0):
  """(base Loaded, wm_graphdef, wm_params) with a random last layer so every weight has a gradient."""
  cfg = ModelConfig(arch="llama", vocab_size=V, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=24,
                    max_len=32, tie_embeddings=False, dtype=dtype, param_dtype=dtype)
  graphdef, params = transformer.init(cfg, seed)
  base = loading.Loaded(cfg, graphdef, params, tokenizer=None)
  wcfg = camels.weighting_config()
  wcfg.backbone, wcfg.base_layers, wcfg.hidden = "base", 1, 8
  wm_graphdef, wm_params = camels.build_weighting_model(wcfg, base)
  key = jax.random.key(seed + 1)
  wm_params["fc2"]["kernel"].set_value(0.3 * jax.random.normal(key, wm_params["fc2"]["kernel"].shape, dtype))
  return base, wm_graphdef, wm_params


def batch(n_docs, seed=0, q=2, doc_len=12, qa_len=8, loc_len=10):
  """A meta-batch of random token documents, questions whose answers are document tokens, one loc text."""
  rng = np.random.default_rng(seed)
  doc_tokens = rng.integers(1, V, (n_docs, doc_len))
  doc_mask = np.ones((n_docs, doc_len), bool)
  doc_mask[0, doc_len - 3:] = False  # one right-padded document
  qa_tokens = rng.integers(1, V, (n_docs, q, qa_len))
  qa_tokens[:, :, -3:] = doc_tokens[:, None, 2:5]  # answers copy document tokens
  qa_mask = np.ones((n_docs, q, qa_len), bool)
  qa_loss = np.zeros((n_docs, q, qa_len), bool)
  qa_loss[:, :, -3:] = True
  return {
      "doc_tokens_BxL": jnp.asarray(doc_tokens), "doc_mask_BxL": jnp.asarray(doc_mask),
      "doc_valid_B": jnp.ones((n_docs,), bool),
      "qa_tokens_BxQxS": jnp.asarray(qa_tokens), "qa_mask_BxQxS": jnp.asarray(qa_mask),
      "qa_loss_mask_BxQxS": jnp.asarray(qa_loss), "qa_valid_BxQ": jnp.ones((n_docs, q), bool),
      "loc_tokens_KxT": jnp.asarray(rng.integers(1, V, (1, loc_len))),
      "loc_mask_KxT": jnp.ones((1, loc_len), bool),
  }
