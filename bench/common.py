"""What every benchmark measures against: this machine's own f32 matmul rate, timed in the same run."""

import statistics
import time

import jax
import jax.numpy as jnp


def best_time(fn, *args, repeats: int = 3) -> float:
  """Seconds of the fastest of `repeats` calls, after one warm-up (compilation) call."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def matmul_flops_per_s(n: int = 2048, dtype=jnp.float32) -> float:
  """FLOP/s of one jitted n x n x n matmul: the peak a dense model step can hope for here."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  return 2 * n**3 / best_time(jax.jit(jnp.matmul), a, b, repeats=5)


def decoder_flops(cfg, batch: int, seq_len: int) -> float:
  """Forward FLOPs of a decoder: 2 per multiply-add of every matmul, attention as computed (full L x L)."""
  d, e, f = cfg.d_model, cfg.head_dim, cfg.d_ff
  proj = d * e * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
  mlp = (3 if cfg.arch == "llama" else 2) * d * f
  attn = 2 * seq_len * cfg.n_heads * e  # q.k and p.v, per query token
  per_token = cfg.n_layers * (proj + mlp + attn) + d * cfg.vocab_size
  return 2.0 * per_token * batch * seq_len


HUGEPAGES = "glibc.malloc.hugetlb=1"


def rerun_with_hugepages() -> bool:
  """Re-executes this process (same command line) with glibc's malloc asking for transparent huge pages.

  XLA:CPU allocates a step's temporaries anew on every call; at gigabytes per step, faulting in their 4 KiB
  pages costs seconds of kernel time per call (the exact meta step: 2.1M page faults, 12% of its time).
  GLIBC_TUNABLES is read when the process starts, hence the re-exec. Returns False (and does nothing) when
  the tunable is already set or the kernel's transparent huge pages are off.
  """
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      thp_off = "[never]" in f.read()
  except OSError:
    thp_off = True
  if "glibc.malloc.hugetlb" in tunables or thp_off:
    return False
  env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, HUGEPAGES) if t))
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  return True  # not reached


def interleaved_seconds(fns: dict, rounds: int) -> dict:
  """{name: [seconds of each round]} of calling every fn once per round, each round starting one name further on.

  Wall times on a shared machine drift by up to half between runs, so a ratio read off two numbers timed minutes
  apart can land either side of a target. Timing every variant in every round, in rotated order, exposes each
  ratio to the same drift; the spread over rounds says how far to trust it. Every fn must be compiled already.
  """
  names = list(fns)
  out = {n: [] for n in names}
  for r in range(rounds):
    for n in names[r % len(names):] + names[:r % len(names)]:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[n]())
      out[n].append(time.perf_counter() - t0)
  return out


def round_ratios(seconds: dict, ref: str) -> dict:
  """{name: {"ratios": each round's seconds / ref's seconds in that round, "median", "lo", "hi"}}."""
  out = {}
  for n, s in seconds.items():
    r = [a / b for a, b in zip(s, seconds[ref])]
    out[n] = {"ratios": r, "median": statistics.median(r), "lo": min(r), "hi": max(r)}
  return out
