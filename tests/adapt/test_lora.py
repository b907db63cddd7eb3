"""LoRA adapters: identity at init, only adapters train, rank/target checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from camels_jax.adapt import lora
from camels_jax.checks import ConfigError
from camels_jax.models import transformer
from camels_jax.models.config import ModelConfig

LLAMA = ModelConfig(arch="llama", vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                    max_len=64, tie_embeddings=False)
GPT2 = ModelConfig(arch="gpt2", vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=48, max_len=64)
TOKENS = np.arange(1, 13)[None] % 40


def _loss(graphdef, params, tokens=TOKENS):
  logp = jax.nn.log_softmax(transformer.apply(graphdef, params, tokens)[:, :-1], -1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()


@pytest.mark.parametrize("cfg,targets", [(LLAMA, "q,k,v,o,gate,up,down"), (GPT2, "q,k,v,o,fc,proj")])
def test_lora_starts_as_the_identity_and_a_step_trains_only_the_adapters(cfg, targets):
  graphdef, params = transformer.init(cfg, 0)
  before = jax.tree.map(np.array, params)  # host copies, to compare bit for bit afterwards
  adapters = lora.lora_init(params, targets, rank=4, seed=1)
  assert set(adapters) == set(targets.split(","))
  assert adapters["k"]["a"].shape == (cfg.n_layers, cfg.d_model, 4)
  assert adapters["k"]["b"].shape == (cfg.n_layers, 4, cfg.n_kv_heads * cfg.head_dim)
  s = lora.scale(8.0, 4)
  np.testing.assert_array_equal(transformer.apply(graphdef, lora.merge(params, adapters, s), TOKENS),
                                transformer.apply(graphdef, params, TOKENS))

  grads = jax.grad(lambda a: _loss(graphdef, lora.merge(params, a, s)))(adapters)
  # At B = 0 the gradient reaches B only (dL/dA = dL/dW @ B^T = 0).
  assert all(float(jnp.abs(g["a"]).max()) == 0.0 and float(jnp.abs(g["b"]).max()) > 0 for g in grads.values())
  stepped = jax.tree.map(lambda a, g: a - 0.5 * g, adapters, grads)
  merged = lora.merge(params, stepped, s)
  assert float(_loss(graphdef, merged)) < float(_loss(graphdef, params))
  for (path, var), (_, old) in zip(nnx.to_flat_state(params), nnx.to_flat_state(before)):
    np.testing.assert_array_equal(var.get_value(), old.get_value(), err_msg=str(path))  # base untouched
  changed = {path[2] for path, var in nnx.to_flat_state(merged)
             if not np.array_equal(var.get_value(), dict(nnx.to_flat_state(params))[path].get_value())}
  assert changed == set(targets.split(","))  # only the targeted kernels moved (no bias, norm, embedding)


def test_a_rank_above_a_projection_width_is_one_clear_error():
  _, params = transformer.init(LLAMA, 0)  # k and v: 32 x 16
  with pytest.raises(ConfigError, match=r"rank=17 exceeds the width of projection\(s\) k \(32x16\), v \(32x16\)"):
    lora.lora_init(params, "q,k,v", rank=17, seed=0)
  lora.lora_init(params, "q,k,v", rank=16, seed=0)  # the widest allowed
  found = lora.violations(LLAMA, "q,k,v", 17, at="dynamic.")
  assert len(found) == 1 and found[0].startswith("dynamic.lora_rank=17 exceeds")
  assert "rank <= min(d_in, d_out) = 16" in found[0]
  assert lora.violations(LLAMA, "q,k,v", 16) == []


def test_a_target_the_architecture_lacks_is_reported():
  _, params = transformer.init(GPT2, 0)
  with pytest.raises(ConfigError, match="no projection.*gate"):
    lora.lora_init(params, "q,gate", rank=2, seed=0)
  found = lora.violations(GPT2, "q,gate,up", 2, at="dynamic.")
  assert len(found) == 1 and found[0].startswith("dynamic.lora_targets=") and "gate, up" in found[0]
  assert lora.parse_targets(" q, v ,q") == ("q", "v")
  # projection_shapes agrees with the params
  flat = dict(nnx.to_flat_state(transformer.init(LLAMA, 0)[1]))
  for name, (d_in, d_out) in lora.projection_shapes(LLAMA).items():
    assert flat[("blocks", *lora.TARGETS[name], "kernel")].get_value().shape[1:] == (d_in, d_out)


def test_merge_is_differentiable_under_jit_and_keeps_the_param_dtype():
  cfg = LLAMA.replace(param_dtype="bfloat16", dtype="bfloat16")
  graphdef, params = transformer.init(cfg, 0)
  adapters = lora.lora_init(params, "q,down", rank=2, seed=0)
  assert adapters["q"]["a"].dtype == jnp.float32
  merged = jax.jit(lambda p, a: lora.merge(p, a, 1.0))(params, adapters)
  assert merged["blocks"]["attn"]["q"]["kernel"].get_value().dtype == jnp.bfloat16
  g = jax.jit(jax.grad(lambda a: _loss(graphdef, lora.merge(params, a, 1.0))))(adapters)
  assert g["down"]["b"].dtype == jnp.float32 and float(jnp.abs(g["down"]["b"]).max()) > 0
