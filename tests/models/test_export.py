"""Models leave as Hugging Face checkpoint folders that transformers loads with no code from this library."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from camels_jax.models import export, hf, tokenizer, transformer
from camels_jax.models.config import ModelConfig

GPT2 = ModelConfig(arch="gpt2", vocab_size=50257, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64,
                   max_len=64)
LLAMA = dict(arch="llama", vocab_size=50257, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, d_ff=80, max_len=64,
             norm_eps=1e-5, rope_theta=500.0)


def _random_params(cfg, seed=0):
  # Random values in every tensor (norm scales and biases too), so a misplaced one changes the logits.
  graphdef, params = transformer.init(cfg, seed)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return graphdef, jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("cfg", [GPT2, ModelConfig(**LLAMA, tie_embeddings=False),
                                 ModelConfig(**LLAMA, tie_embeddings=True)], ids=["gpt2", "llama-untied", "llama-tied"])
def test_transformers_loads_the_export_with_the_same_logits(tmp_path, cfg):
  graphdef, params = _random_params(cfg)
  tok = tokenizer.gpt2()
  folder = export.save_pretrained(str(tmp_path / "hf"), cfg, params, tok)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
  assert type(model).__name__ == ("GPT2LMHeadModel" if cfg.arch == "gpt2" else "LlamaForCausalLM")
  tokens = np.asarray([tok.encode("The clockmaker Ailo Brennik founded a guild in 1871.")])
  with torch.no_grad():
    want = model(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(transformer.apply(graphdef, params, tokens))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
  # The tokenizer ships too, and transformers' copy encodes as ours does.
  hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
  assert hf_tok("Hello world, 1871.")["input_ids"] == tok.encode("Hello world, 1871.")
  assert hf_tok.eos_token_id == tok.eos_id
  # And this library reads it back to the same parameters.
  cfg_back, params_back = hf.load_folder(folder)
  assert cfg_back.replace(max_len=cfg.max_len) == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_export_and_a_folder_written_whole(tmp_path, monkeypatch):
  cfg = GPT2
  _, params = _random_params(cfg)
  folder = export.save_pretrained(str(tmp_path / "hf"), cfg, params, None, dtype="bfloat16")
  with open(os.path.join(folder, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  model = transformers.AutoModelForCausalLM.from_pretrained(folder)
  assert model.transformer.wte.weight.dtype == torch.bfloat16
  # A failure mid-way leaves the earlier folder as it was and no temporary folder behind.
  monkeypatch.setattr(export, "tokenizer_files", lambda tok: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    export.save_pretrained(folder, cfg, params, tokenizer.gpt2())
  assert sorted(os.listdir(tmp_path)) == ["hf"] and os.path.isfile(os.path.join(folder, export.WEIGHTS))
  with pytest.raises(ValueError, match="dtype='int8'"):
    export.save_pretrained(folder, cfg, params, None, dtype="int8")
