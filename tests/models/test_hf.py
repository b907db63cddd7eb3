"""Logits of checkpoints read from Hugging Face folders equal transformers' PyTorch models."""

import json

import numpy as np
import pytest
import torch
import transformers

from camels_jax.models import hf, transformer
from camels_jax.models.convert import CheckpointError


def _gpt2(tmp_path):
  cfg = transformers.GPT2Config(vocab_size=97, n_positions=64, n_embd=48, n_layer=2, n_head=4)
  return transformers.GPT2LMHeadModel(cfg)


def _llama(tmp_path, tied, kv_heads=2):
  cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                 num_attention_heads=6, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                                 max_position_embeddings=64, rope_theta=500.0,
                                 tie_word_embeddings=tied)
  return transformers.LlamaForCausalLM(cfg)


def _random_weights(model, seed=0):
  # Default inits leave biases and norms at 0/1; random values make every tensor's mapping count.
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
  return model.eval()


@pytest.mark.parametrize("make", [
    _gpt2,
    lambda p: _llama(p, tied=False),
    lambda p: _llama(p, tied=True),
    lambda p: _llama(p, tied=False, kv_heads=6),
], ids=["gpt2", "llama-gqa-untied", "llama-gqa-tied", "llama-mha"])
def test_logits_match_torch(tmp_path, make):
  model = _random_weights(make(tmp_path))
  model.save_pretrained(tmp_path)
  cfg, params = hf.load_folder(str(tmp_path))
  graphdef, _ = transformer.abstract(cfg)

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 97, size=(3, 17))
  mask = np.ones_like(tokens)
  mask[1, 11:] = 0  # right padding
  with torch.no_grad():
    want = model(torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()
  got = np.asarray(transformer.apply(graphdef, params, tokens, mask))
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)


def test_left_padding_matches_unpadded(tmp_path):
  model = _random_weights(_llama(tmp_path, tied=True))
  model.save_pretrained(tmp_path)
  cfg, params = hf.load_folder(str(tmp_path))
  graphdef, _ = transformer.abstract(cfg)
  tokens = np.arange(1, 9)[None]
  padded = np.concatenate([np.zeros((1, 3), int), tokens], axis=1)
  mask = (padded > 0).astype(int)
  want = transformer.apply(graphdef, params, tokens)
  got = transformer.apply(graphdef, params, padded, mask)[:, 3:]
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_pytorch_bin_folder(tmp_path):
  model = _random_weights(_gpt2(tmp_path), seed=3)
  model.config.save_pretrained(tmp_path)
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  cfg, params = hf.load_folder(str(tmp_path))
  tokens = np.arange(10)[None]
  with torch.no_grad():
    want = model(torch.tensor(tokens)).logits.numpy()
  got = transformer.apply(transformer.abstract(cfg)[0], params, tokens)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_unknown_architecture_is_one_clear_error(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
  with pytest.raises(CheckpointError, match=r"config\.json: model_type 'mamba' is not supported"):
    hf.load_folder(str(tmp_path))


def test_missing_folder_and_weights(tmp_path):
  with pytest.raises(CheckpointError, match="no such checkpoint folder"):
    hf.load_folder(str(tmp_path / "nope"))
  _gpt2(tmp_path).config.save_pretrained(tmp_path)
  with pytest.raises(CheckpointError, match="no \\*.safetensors"):
    hf.load_folder(str(tmp_path))


def test_wrong_shape_names_the_tensor(tmp_path):
  model = _gpt2(tmp_path)
  model.save_pretrained(tmp_path)
  hf_cfg = json.loads((tmp_path / "config.json").read_text())
  hf_cfg["n_inner"] = 100
  (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
  with pytest.raises(CheckpointError, match=r"blocks/0/mlp/fc/(bias|kernel) has shape"):
    hf.load_folder(str(tmp_path))
