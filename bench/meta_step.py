"""Throughput, FLOP efficiency and memory of the exact (second-order) CaMeLS meta step on SmolLM2-135M,
and the same step in PyTorch (torch.func, on a transformers Llama holding the same weights).

  python -m bench.meta_step [--docs 2] [--doc_len 256] [--qa_len 32] [--weighting_layers 2] [--no_torch]

Prints, measured in one run next to this machine's own f32 matmul rate:
  - documents/s of jax.jit(jax.value_and_grad(meta_loss)) w.r.t. the meta params (inner remat on, and off);
  - its FLOP/s as a fraction of the matmul rate, with FLOPs from XLA's cost analysis (of the step with
    its lax.scans unrolled: XLA counts a while-loop body once, whatever its trip count) and from an
    analytic count in multiples of the decoder's forward FLOPs, printed term by term (goal >= 50%);
  - compiled peak memory (XLA memory_analysis: arguments + outputs + temporaries) of the meta step vs
    a plain fine-tune step (one SGD step of the base LM on the same documents), remat on and off
    (goal <= 2x with remat);
  - the torch.func meta step: loss and meta-gradient agreement with JAX, then time, interleaved with
    JAX's, and the speed ratio JAX/torch (goal >= 1.5);
and a compact final table. Nothing is asserted on timings.
"""

import argparse
import contextlib
import ctypes
import gc
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from camels_jax.adapt import inner as inner_lib
from camels_jax.methods import camels
from camels_jax.models import loading, transformer

GB = 1e9


def truncated(base: loading.Loaded, n_layers: int) -> loading.Loaded:
  """The first `n_layers` blocks of `base`, with its embeddings, final norm and tokenizer."""
  cfg = base.cfg.replace(n_layers=n_layers)
  graphdef, _ = transformer.abstract(cfg)
  return loading.Loaded(cfg, graphdef, transformer.first_layers(base.params, n_layers), base.tokenizer)


def make_batch(vocab: int, docs: int, doc_len: int, q: int, qa_len: int, loc_len: int, answer_len: int = 8,
               seed: int = 0) -> dict[str, np.ndarray]:
  """A full (unpadded) meta-batch of random tokens; each question's last `answer_len` tokens are a span
  of its document (so the answer NLL depends on what the inner step learned)."""
  rng = np.random.default_rng(seed)
  doc = rng.integers(0, vocab, (docs, doc_len)).astype(np.int32)
  qa = rng.integers(0, vocab, (docs, q, qa_len)).astype(np.int32)
  start = rng.integers(0, doc_len - answer_len, (docs, q))
  for i in range(docs):
    for j in range(q):
      qa[i, j, -answer_len:] = doc[i, start[i, j]:start[i, j] + answer_len]
  qa_loss = np.zeros((docs, q, qa_len), bool)
  qa_loss[:, :, -answer_len:] = True
  return {
      "doc_tokens_BxL": doc, "doc_mask_BxL": np.ones((docs, doc_len), np.int32),
      "doc_valid_B": np.ones((docs,), bool),
      "qa_tokens_BxQxS": qa, "qa_mask_BxQxS": np.ones((docs, q, qa_len), np.int32),
      "qa_loss_mask_BxQxS": qa_loss, "qa_valid_BxQ": np.ones((docs, q), bool),
      "loc_tokens_KxT": rng.integers(0, vocab, (1, loc_len)).astype(np.int32),
      "loc_mask_KxT": np.ones((1, loc_len), np.int32),
  }


@contextlib.contextmanager
def unrolled_scans():
  """Traces every lax.scan fully unrolled (for cost analysis: no while loops left to under-count)."""
  scan = jax.lax.scan
  jax.lax.scan = functools.partial(scan, unroll=True)
  try:
    yield
  finally:
    jax.lax.scan = scan


def meta_step_fn(graphdef, wm_graphdef, mcfg):
  """(meta, base_params, batch) -> (loss, meta-gradient, adapted base params): one exact meta step."""

  def step(meta, base_params, batch):
    (total, aux), grads = jax.value_and_grad(camels.meta_loss, has_aux=True)(
        meta, base_params, batch, graphdef=graphdef, wm_graphdef=wm_graphdef, mcfg=mcfg)
    return total, grads, aux["adapted"]

  return step


def finetune_step_fn(graphdef, icfg, lr):
  """(params, batch) -> (loss, new params): one SGD step on all documents at once, uniform weights."""

  def step(params, batch):
    tokens, mask = batch["doc_tokens_BxL"], batch["doc_mask_BxL"]
    loss, grads = jax.value_and_grad(inner_lib.doc_loss, argnums=1)(
        graphdef, params, tokens, mask, jnp.ones(tokens.shape, jnp.float32), icfg)
    return loss, jax.tree.map(lambda p, g: p - lr * g, params, grads)

  return step


def peak_bytes(compiled) -> tuple[float, str]:
  m = compiled.memory_analysis()
  total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  return total, (f"args {m.argument_size_in_bytes / GB:.2f} + out {m.output_size_in_bytes / GB:.2f} + "
                 f"temp {m.temp_size_in_bytes / GB:.2f} GB")


def xla_flops(compiled) -> float:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca["flops"])


def analytic_flops(cfg, wcfg, args, remat: bool) -> tuple[float, list[tuple[str, float]]]:
  """Matmul FLOPs of one meta step, in multiples of F(b, l) = decoder forward FLOPs (common.decoder_flops).

  Every matmul y = x W of a forward costs 1 unit; its backward 2 (dx = dy W^T, dW = x^T dy); the reverse
  of a forward+backward (the second-order pass through an inner SGD step) 6 (2 for each of its 3
  matmuls); inner remat recomputes the inner forward+backward once more (3).
  """
  F = functools.partial(common.decoder_flops, cfg)
  hidden = 128
  Fw = (common.decoder_flops(wcfg, args.docs, args.doc_len)
        - 2.0 * wcfg.d_model * wcfg.vocab_size * args.docs * args.doc_len  # no unembedding
        + 2.0 * (wcfg.d_model * hidden + hidden) * args.docs * args.doc_len)  # MLP head
  inner_mult = 3 + 6 + (3 if remat else 0)
  n_qa = args.docs * args.qa_slots
  terms = [
      ("weighting model fwd+bwd (3 Fw)", 3 * Fw),
      ("base logits on loc text (1 F)", F(1, args.loc_len)),
      (f"inner steps: {args.docs} docs x ({inner_mult} F(1,L)) = fwd+bwd 3"
       f"{' + remat 3' if remat else ''} + 2nd-order bwd 6", args.docs * inner_mult * F(1, args.doc_len)),
      ("outer QA + loc fwd+bwd (3 F)", 3 * (F(n_qa, args.qa_len) + F(1, args.loc_len))),
  ]
  return sum(t for _, t in terms), terms


def _trim():
  """Returns freed heap memory to the OS (glibc), so JAX's and torch's big steps can take turns."""
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:
    pass


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--docs", type=int, default=2, help="documents per meta-batch (B)")
  parser.add_argument("--doc_len", type=int, default=256)
  parser.add_argument("--qa_len", type=int, default=32)
  parser.add_argument("--qa_slots", type=int, default=3, help="questions per document (Q)")
  parser.add_argument("--loc_len", type=int, default=256, help="locality text length (one text)")
  parser.add_argument("--weighting_layers", type=int, default=2, help="blocks of the weighting model")
  parser.add_argument("--repeats", type=int, default=2, help="timed calls of each step (best is kept)")
  parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch comparison")
  parser.add_argument("--all_variants", action="store_true",
                      help="also compile the meta step without remat and with inner + block remat (memory "
                           "and no-remat timing; each is another full compilation)")
  parser.add_argument("--base_layers", type=int, default=0, help="truncate SmolLM2 to its first N blocks "
                      "(0 = all 30; for quick checks of this script)")
  parser.add_argument("--cache_dir", default="", help="JAX persistent compilation cache directory")
  args = parser.parse_args()
  t_start = time.perf_counter()
  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 10.0)

  base = loading.load(loading.model_config("smollm2"))
  if args.base_layers:
    base = truncated(base, args.base_layers)
  cfg = base.cfg
  wcfg = camels.weighting_config()
  wcfg.base_layers = args.weighting_layers
  wm_graphdef, wm_params = camels.build_weighting_model(wcfg, base)
  # The head's last layer starts at zero (uniform weights), which leaves every other meta-parameter
  # without gradient; a small random last layer makes the whole meta-gradient count (as in the tests).
  fc2 = wm_params["fc2"]["kernel"]
  fc2.set_value(0.05 * jax.random.normal(jax.random.key(1), fc2.shape, fc2.dtype))
  icfg = inner_lib.InnerConfig(padded_len=args.doc_len, remat=True)
  mcfg = camels.MetaConfig(inner=icfg)
  meta = camels.init_meta_params(wm_params, mcfg)
  batch_np = make_batch(cfg.vocab_size, args.docs, args.doc_len, args.qa_slots, args.qa_len, args.loc_len)
  batch = jax.tree.map(jnp.asarray, batch_np)
  params = base.params
  remat_graphdef, _ = transformer.abstract(cfg.replace(remat=True))
  wm_cfg = cfg.replace(n_layers=args.weighting_layers)
  mcfg_of = lambda remat: camels.MetaConfig(inner=inner_lib.InnerConfig(padded_len=args.doc_len, remat=remat))

  peak0 = common.matmul_flops_per_s()
  print(f"machine f32 matmul rate: {peak0 / 1e9:.1f} GFLOP/s ({jax.device_count()} "
        f"{jax.devices()[0].platform} device(s)); SmolLM2-135M ({cfg.n_layers} blocks), {args.docs} docs x {args.doc_len} tokens, "
        f"{args.qa_slots} questions x {args.qa_len} tokens per doc, 1 loc text x {args.loc_len}, "
        f"weighting model {args.weighting_layers} blocks + MLP head 128", flush=True)

  # ---- compile: the meta step (inner remat; optionally no remat, inner + block remat), fine-tune ----
  variants = {"meta, inner remat": (base.graphdef, True)}
  if args.all_variants:
    variants |= {"meta, no remat": (base.graphdef, False), "meta, inner + block remat": (remat_graphdef, True)}
  compiled, mem_rows = {}, []
  for name, (gd, remat) in variants.items():
    t0 = time.perf_counter()
    lowered = jax.jit(meta_step_fn(gd, wm_graphdef, mcfg_of(remat))).lower(meta, params, batch)
    t1 = time.perf_counter()
    compiled[name] = lowered.compile()
    print(f"compiled {name}: trace+lower {t1 - t0:.0f} s, XLA compile {time.perf_counter() - t1:.0f} s",
          flush=True)
    mem_rows.append((name, *peak_bytes(compiled[name])))
    if name != "meta, inner remat" and name != "meta, no remat":
      del compiled[name]
  lr = mcfg.inner_lr
  for name, gd in (("fine-tune", base.graphdef), ("fine-tune, block remat", remat_graphdef)):
    t0 = time.perf_counter()
    compiled[name] = jax.jit(finetune_step_fn(gd, icfg, lr)).lower(params, batch).compile()
    print(f"compiled {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    mem_rows.insert(0 if name == "fine-tune" else 1, (name, *peak_bytes(compiled[name])))
  mem = {k: v for k, v, _ in mem_rows}

  # ---- FLOPs: XLA's cost analysis (as compiled; and of the unoptimised HLO with scans unrolled) ------
  t0 = time.perf_counter()
  with unrolled_scans():
    lowered_unrolled = jax.jit(meta_step_fn(base.graphdef, wm_graphdef, mcfg_of(True))).lower(meta, params, batch)
  ca = lowered_unrolled.cost_analysis()
  flops_unrolled = float((ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"])
  del lowered_unrolled
  gc.collect()  # the unrolled trace is large; the torch step needs the memory
  t_unrolled = time.perf_counter() - t0
  flops_loop = xla_flops(compiled["meta, inner remat"])
  an = {r: analytic_flops(cfg, wm_cfg, args, r) for r in (True, False)}
  ft_flops = xla_flops(compiled["fine-tune"])
  print(f"FLOPs of one meta step (inner remat):")
  print(f"  XLA cost analysis of the compiled step: {flops_loop / 1e12:7.3f} TFLOP  <- under-counts: the docs "
        f"are a lax.scan (a while loop) and XLA counts a while body once, not once per trip")
  print(f"  XLA cost analysis, scans unrolled:      {flops_unrolled / 1e12:7.3f} TFLOP  (unoptimised HLO of "
        f"the same step traced with unroll=True; {t_unrolled:.0f} s to trace, not compiled)")
  print(f"  analytic, matmuls only:                 {an[True][0] / 1e12:7.3f} TFLOP  (no remat: "
        f"{an[False][0] / 1e12:.3f}); F(b, l) = decoder forward FLOPs, F(1,{args.doc_len}) = "
        f"{common.decoder_flops(cfg, 1, args.doc_len) / 1e9:.1f} GFLOP")
  for name, t in an[True][1]:
    print(f"    {name:<66} {t / 1e12:7.3f} TFLOP")
  print(f"  fine-tune step: XLA {ft_flops / 1e12:.3f} TFLOP, analytic 3 F({args.docs},{args.doc_len}) = "
        f"{3 * common.decoder_flops(cfg, args.docs, args.doc_len) / 1e12:.3f} TFLOP")

  print("peak memory (XLA memory_analysis of the compiled step: arguments + outputs + temporaries):")
  for k, v, detail in mem_rows:
    print(f"  {k:<26} {v / GB:6.2f} GB  ({detail})" if v == v else f"  {k:<26}    -       ({detail})")
  ratios = [("meta (inner remat) / fine-tune", "meta, inner remat", "fine-tune"),
            ("meta (no remat) / fine-tune", "meta, no remat", "fine-tune"),
            ("meta (inner + block remat) / fine-tune (block remat)", "meta, inner + block remat",
             "fine-tune, block remat")]
  for label, a, b in ratios:
    if a in mem and mem[a] == mem[a]:
      print(f"  {label}: {mem[a] / mem[b]:.2f}x")

  # ---- JAX first calls; the no-remat step is timed before torch starts (memory: see below) ---------
  best = {}

  def sample(name, fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    return out

  runs = {"meta, inner remat": lambda: compiled["meta, inner remat"](meta, params, batch),
          "fine-tune": lambda: compiled["fine-tune"](params, batch)}
  j_loss, j_grads, _ = sample("meta, inner remat", runs["meta, inner remat"])
  j_flat = None
  if "meta, no remat" in compiled:
    # Timed alone (not interleaved with torch): holding its 9 GB of temporaries next to torch's
    # grad-of-grad graph got this process OOM-killed on a 24 GB machine.
    for _ in range(args.repeats + 1):
      sample("meta, no remat", lambda: compiled["meta, no remat"](meta, params, batch))
    del compiled["meta, no remat"]
  _trim()

  # ---- torch: agreement, then timing interleaved with JAX ----------------------------------------
  tm = None
  if not args.no_torch:
    import torch  # pylint: disable=g-import-not-at-top
    from bench import torch_meta_step  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(2)
    sdpa = torch_meta_step.sdpa_double_backward_error()
    print(f"torch: LlamaForCausalLM with attn_implementation='eager'"
          + (f" (grad of grad through 'sdpa' fails on CPU: {sdpa})" if sdpa else ""))
    tm = torch_meta_step.TorchMeta(cfg, params, meta["wm"], args.weighting_layers, mcfg.inner_lr, mcfg.c_kl,
                                   padded_len=args.doc_len, attn="eager")
    tbatch = torch_meta_step.to_torch_batch(batch_np)
    runs["torch.func"] = lambda: tm.value_and_grad(tbatch)
    runs["torch autograd"] = lambda: tm.autograd_value_and_grad(tbatch)
    t_loss, t_grads = sample("torch.func", runs["torch.func"])
    j_flat = torch_meta_step._flat(j_grads["wm"])  # pylint: disable=protected-access
    t_flat = tm.to_jax_names(t_grads)
    del t_grads
    print(f"torch.func vs JAX: meta loss {float(t_loss):.6f} vs {float(j_loss):.6f} "
          f"(rel diff {abs(float(t_loss) - float(j_loss)) / abs(float(j_loss)):.1e})")
    print("  meta-gradient, rel. L2 error torch vs JAX (|g| = norm of the JAX leaf):")
    leaves = ["fc2/kernel", "fc2/bias", "fc1/kernel", "backbone/blocks/0/attn/q/kernel",
              f"backbone/blocks/{args.weighting_layers - 1}/mlp/down/kernel", "backbone/ln_f/scale",
              "backbone/embed/embedding"]
    for leaf in leaves:
      print(f"    {leaf:<40} {rel_err(t_flat[leaf], j_flat[leaf]):.1e}  (|g| = {np.linalg.norm(j_flat[leaf]):.3e})")
    unmatched = sorted(set(j_flat) ^ set(t_flat))
    worst = max((rel_err(t_flat[k], j_flat[k]), k) for k in j_flat if k in t_flat)
    print(f"    worst of all {len(j_flat)} leaves: {worst[0]:.1e} ({worst[1]})"
          + (f"; unmatched names: {unmatched}" if unmatched else ""), flush=True)
    del t_flat, j_flat
  del j_grads
  _trim()

  # Interleaved, so that load from other processes hits every contender alike; first calls above count.
  for _ in range(args.repeats):
    for k, fn in runs.items():
      sample(k, fn)
      _trim()
  peak1 = common.matmul_flops_per_s()
  peak = max(peak0, peak1)
  print(f"matmul rate again after timing: {peak1 / 1e9:.1f} GFLOP/s; using the higher, {peak / 1e9:.1f}")

  print(f"\n=== meta step summary (SmolLM2-135M, {args.docs} x {args.doc_len}-token docs; best of "
        f"{args.repeats}-{args.repeats + 1} calls, interleaved except 'no remat'; % = of the {peak / 1e9:.0f} GFLOP/s matmul rate) ===")
  print(f"{'step':<18} {'s/step':>7} {'docs/s':>7} {'XLA GFLOP/s':>12} {'%':>5} {'analytic GFLOP/s':>17} {'%':>5}")
  ft_an = 3 * common.decoder_flops(cfg, args.docs, args.doc_len)
  for k, sec in best.items():
    fx = {"meta, inner remat": flops_unrolled, "fine-tune": ft_flops}.get(k)
    fa = ft_an if k == "fine-tune" else an["no remat" not in k and not k.startswith("torch")][0]
    xla = f"{fx / sec / 1e9:12.1f} {fx / sec / peak:5.0%}" if fx else f"{'-':>12} {'-':>5}"
    print(f"{k:<18} {sec:7.2f} {args.docs / sec:7.3f} {xla} {fa / sec / 1e9:17.1f} {fa / sec / peak:5.0%}")
  if "torch.func" in best:
    line = f"speed JAX (inner remat) / torch.func: {best['torch.func'] / best['meta, inner remat']:.2f}x"
    if "meta, no remat" in best:
      line += f";  JAX (no remat) / torch.func: {best['torch.func'] / best['meta, no remat']:.2f}x"
    line += f";  JAX (inner remat) / torch autograd: {best['torch autograd'] / best['meta, inner remat']:.2f}x"
    print(line)
  line = (f"memory: meta step (inner remat) {mem['meta, inner remat'] / GB:.2f} GB vs fine-tune "
          f"{mem['fine-tune'] / GB:.2f} GB = {mem['meta, inner remat'] / mem['fine-tune']:.2f}x")
  if "meta, no remat" in mem:
    line += (f"; no remat {mem['meta, no remat'] / GB:.2f} GB = {mem['meta, no remat'] / mem['fine-tune']:.2f}x"
             f"; inner + block remat {mem['meta, inner + block remat'] / GB:.2f} GB = "
             f"{mem['meta, inner + block remat'] / mem['fine-tune, block remat']:.2f}x of fine-tune with block remat"
             if mem["meta, inner + block remat"] == mem["meta, inner + block remat"] else
             f"; inner + block remat: fails to trace (flax TraceContextError)")
  print(line)
  print(f"(whole script: {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
  main()
