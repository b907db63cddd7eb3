"""The CaMeLS meta step in PyTorch (torch.func), on a transformers Llama holding our SmolLM2 weights.

Used by `bench.meta_step` (which prints the comparison); not a script of its own. Mirrors
`camels_jax.methods.camels.meta_loss` with InnerConfig() defaults ("padded" normalisation, one pass):

  w = softplus_3(head(first k blocks + final norm of the base model))       weighting model
  for each document i, in order:  theta <- theta - lr * grad_theta L_w(theta; doc_i)   (second order)
  loss = answer NLL of the questions (adapted theta) + c_kl * KL(base || adapted) on the locality text

The meta-gradient is `torch.func.grad(outer)(meta_params)` where `outer` calls
`torch.func.grad(inner_loss)` once per document: grad of grad, the create_graph=True semantics.
"""

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch.func import functional_call

_LINEARS = (("attn/q", "self_attn.q_proj"), ("attn/k", "self_attn.k_proj"), ("attn/v", "self_attn.v_proj"),
            ("attn/o", "self_attn.o_proj"), ("mlp/gate", "mlp.gate_proj"), ("mlp/up", "mlp.up_proj"),
            ("mlp/down", "mlp.down_proj"))


def _flat(params) -> dict[str, np.ndarray]:
  """An nnx params State as {"blocks/0/attn/q/kernel": float32 array} (blocks unstacked)."""
  from camels_jax.models import convert  # pylint: disable=g-import-not-at-top
  return {k: np.asarray(v, np.float32) for k, v in convert.params_to_flat(params).items()}


def _t(a: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.array(a, np.float32))  # a writable copy


def llama_state(flat: dict[str, np.ndarray], n_layers: int, prefix: str = "model.") -> dict[str, torch.Tensor]:
  """Our llama names -> transformers names; our kernels are [in, out], torch Linear weights [out, in]."""
  state = {prefix + "embed_tokens.weight": _t(flat["embed/embedding"]), prefix + "norm.weight": _t(flat["ln_f/scale"])}
  for i in range(n_layers):
    b, h = f"blocks/{i}/", f"{prefix}layers.{i}."
    state[h + "input_layernorm.weight"] = _t(flat[b + "ln1/scale"])
    state[h + "post_attention_layernorm.weight"] = _t(flat[b + "ln2/scale"])
    for ours, theirs in _LINEARS:
      state[h + theirs + ".weight"] = _t(flat[b + ours + "/kernel"].T)
  return state


def hf_config(cfg, n_layers: int | None = None, attn: str = "eager") -> transformers.LlamaConfig:
  hf = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
      num_hidden_layers=n_layers or cfg.n_layers, num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
      mlp_bias=False)
  hf._attn_implementation = attn  # pylint: disable=protected-access
  return hf


class TorchMeta:
  """The base LM and weighting model in torch, with our weights, and a functional meta step.

  Args:
    cfg, base_params: our base ModelConfig and params (tied-embedding llama).
    wm_params: our WeightingModel params (backbone = first k base blocks, fc1, fc2).
    k: the weighting model's number of blocks.
    inner_lr, c_kl, padded_len: as MetaConfig / InnerConfig ("padded" normalisation).
    attn: transformers attention implementation ("eager" or "sdpa").
  """

  def __init__(self, cfg, base_params, wm_params, k: int, inner_lr: float, c_kl: float, padded_len: int = 0,
               beta: float = 3.0, attn: str = "eager"):
    if cfg.arch != "llama" or not cfg.tie_embeddings:
      raise ValueError("the torch meta step mirrors tied-embedding llama models only")
    self.inner_lr, self.c_kl, self.padded_len, self.beta = inner_lr, c_kl, padded_len, beta
    self.base = transformers.LlamaForCausalLM(hf_config(cfg, attn=attn)).eval()
    missing, unexpected = self.base.load_state_dict(llama_state(_flat(base_params), cfg.n_layers),
                                                    strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)  # tied to embed_tokens
    self.wm = transformers.LlamaModel(hf_config(cfg, n_layers=k, attn=attn)).eval()
    wflat = _flat(wm_params)
    backbone = {p.removeprefix("backbone/"): v for p, v in wflat.items() if p.startswith("backbone/")}
    self.wm.load_state_dict(llama_state(backbone, k, prefix=""), strict=True)
    for p in list(self.base.parameters()) + list(self.wm.parameters()):
      p.requires_grad_(False)
    self.base_params = dict(self.base.named_parameters())  # lm_head is tied: one entry, embed_tokens
    self.meta_params = {"wm/" + n: p.detach().clone() for n, p in self.wm.named_parameters()}
    self.meta_params |= {"fc1/weight": _t(wflat["fc1/kernel"].T), "fc1/bias": _t(wflat["fc1/bias"]),
                         "fc2/weight": _t(wflat["fc2/kernel"].T), "fc2/bias": _t(wflat["fc2/bias"])}

  def weights(self, meta, tokens_BxL, mask_BxL):
    wm = {n.removeprefix("wm/"): p for n, p in meta.items() if n.startswith("wm/")}
    h = functional_call(self.wm, wm, (tokens_BxL,), {"attention_mask": mask_BxL}).last_hidden_state
    z = F.linear(F.gelu(F.linear(h, meta["fc1/weight"], meta["fc1/bias"])), meta["fc2/weight"], meta["fc2/bias"])
    return F.softplus(z[..., 0], beta=self.beta) * mask_BxL

  def logits(self, params, tokens_BxL, mask_BxL=None):
    kw = {} if mask_BxL is None else {"attention_mask": mask_BxL}
    return functional_call(self.base, params, (tokens_BxL,), kw).logits

  @staticmethod
  def token_nll(logits_BxLxV, tokens_BxL):
    """nll[:, t] = -log p(tokens[:, t+1] | ...), last column 0 (as camels_jax.adapt.loss.token_nll)."""
    nll = F.cross_entropy(logits_BxLxV[:, :-1].transpose(1, 2), tokens_BxL[:, 1:], reduction="none")
    return F.pad(nll, (0, 1))

  def inner_loss(self, params, tokens_1xL, mask_1xL, w_1xL):
    m = mask_1xL.float()
    target_mask = F.pad(m[:, 1:] * m[:, :-1], (0, 1))
    lw = F.pad(w_1xL[:, 1:], (0, 1)) * target_mask
    total = (self.token_nll(self.logits(params, tokens_1xL, mask_1xL), tokens_1xL) * lw).sum(-1)
    return (total / ((self.padded_len or tokens_1xL.shape[1]) - 1)).mean()

  def outer_loss(self, params, base_logits, b):
    qa_tokens = b["qa_tokens_BxQxS"]
    n, s = qa_tokens.shape[0] * qa_tokens.shape[1], qa_tokens.shape[2]
    qa_tokens, qa_mask = qa_tokens.reshape(n, s), b["qa_mask_BxQxS"].reshape(n, s)
    loss_mask = (b["qa_loss_mask_BxQxS"].reshape(n, s) * b["qa_valid_BxQ"].reshape(n, 1)).float()
    lw = F.pad(loss_mask[:, 1:], (0, 1))
    qa = (self.token_nll(self.logits(params, qa_tokens, qa_mask), qa_tokens) * lw).sum() / lw.sum().clamp(min=1)
    logp_pre = F.log_softmax(base_logits, -1)
    logp_post = F.log_softmax(self.logits(params, b["loc_tokens_KxT"], b["loc_mask_KxT"]), -1)
    m = b["loc_mask_KxT"].float()
    kl = ((logp_pre.exp() * (logp_pre - logp_post)).sum(-1) * m).sum() / m.sum().clamp(min=1)
    return qa + self.c_kl * kl

  def meta_loss(self, meta, b):
    tokens, mask, valid = b["doc_tokens_BxL"], b["doc_mask_BxL"], b["doc_valid_B"]
    w = self.weights(meta, tokens, mask)
    with torch.no_grad():
      base_logits = self.logits(self.base_params, b["loc_tokens_KxT"], b["loc_mask_KxT"])
    inner_grad = torch.func.grad(self.inner_loss)  # differentiable: the outer grad sees through it
    params = self.base_params
    for i in range(tokens.shape[0]):
      if not bool(valid[i]):
        continue
      g = inner_grad(params, tokens[i:i + 1], mask[i:i + 1], w[i:i + 1])
      params = {n: p - self.inner_lr * g[n] for n, p in params.items()}
    return self.outer_loss(params, base_logits, b)

  def value_and_grad(self, batch):
    """(meta loss, meta-gradient dict) by torch.func.grad_and_value of the grad-of-grad objective."""
    g, v = torch.func.grad_and_value(self.meta_loss)(self.meta_params, batch)
    return v, g

  def autograd_value_and_grad(self, batch):
    """The same with classic autograd: torch.autograd.grad(create_graph=True) inside, .backward outside."""
    meta = {n: p.detach().requires_grad_(True) for n, p in self.meta_params.items()}
    tokens, mask, valid = batch["doc_tokens_BxL"], batch["doc_mask_BxL"], batch["doc_valid_B"]
    w = self.weights(meta, tokens, mask)
    with torch.no_grad():
      base_logits = self.logits(self.base_params, batch["loc_tokens_KxT"], batch["loc_mask_KxT"])
    params = {n: p.detach().requires_grad_(True) for n, p in self.base_params.items()}
    names = list(params)
    for i in range(tokens.shape[0]):
      if not bool(valid[i]):
        continue
      l = self.inner_loss(params, tokens[i:i + 1], mask[i:i + 1], w[i:i + 1])
      g = torch.autograd.grad(l, [params[n] for n in names], create_graph=True)
      params = {n: params[n] - self.inner_lr * gi for n, gi in zip(names, g)}
    loss = self.outer_loss(params, base_logits, batch)
    grads = torch.autograd.grad(loss, list(meta.values()))
    return loss.detach(), dict(zip(meta, grads))

  def to_jax_names(self, grads: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Meta-gradients keyed by our flat names, kernels transposed back to [in, out]."""
    inv = {theirs: ours for ours, theirs in _LINEARS}
    out = {}
    for n, g in grads.items():
      a = g.detach().numpy()
      if n.startswith("fc"):
        out[n.replace("/weight", "/kernel")] = a.T if n.endswith("weight") else a
        continue
      n = n.removeprefix("wm/")
      if n == "embed_tokens.weight":
        out["backbone/embed/embedding"] = a
      elif n == "norm.weight":
        out["backbone/ln_f/scale"] = a
      else:
        _, i, rest = n.split(".", 2)
        if rest == "input_layernorm.weight":
          out[f"backbone/blocks/{i}/ln1/scale"] = a
        elif rest == "post_attention_layernorm.weight":
          out[f"backbone/blocks/{i}/ln2/scale"] = a
        else:
          out[f"backbone/blocks/{i}/{inv[rest.removesuffix('.weight')]}/kernel"] = a.T
    return out


def sdpa_double_backward_error() -> str | None:
  """The error a grad of grad through transformers' "sdpa" attention raises on CPU (None if it works).

  Checked on a 1-block toy Llama, so the benchmark can say why it uses "eager" attention.
  """
  hf = transformers.LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
  hf._attn_implementation = "sdpa"  # pylint: disable=protected-access
  model = transformers.LlamaForCausalLM(hf).eval()
  params = {n: p.detach() for n, p in model.named_parameters()}
  tokens = torch.tensor([[1, 2, 3, 4]])
  scale = torch.tensor(1.0)

  def inner(p, s):
    return s * functional_call(model, p, (tokens,)).logits.square().mean()

  def outer(s):
    g = torch.func.grad(inner)(params, s)
    return sum(x.square().sum() for x in g.values())

  try:
    torch.func.grad(outer)(scale)
    return None
  except RuntimeError as e:
    return str(e).splitlines()[0]


def to_torch_batch(batch) -> dict[str, torch.Tensor]:
  out = {}
  for k, v in batch.items():
    a = np.asarray(v)
    out[k] = torch.from_numpy(a.astype(np.int64) if a.dtype.kind in "iub" else a.astype(np.float32))
  return out

