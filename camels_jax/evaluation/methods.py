"""The built-in evaluation methods, registered under the names `eval.methods` lists: the weighted-gradient
methods (uniform, SSM, TF-IDF, CaMeLS: one Adam step per document on token-weighted losses, `adapt.online`),
uniform followed by a QA light-tune after the stream, MAC (no gradient step: a memory bank of amortized
documents), retrieval (the top-k documents in the prompt) and MAC + retrieval (the bank restricted to them).
"""

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import numpy as np
import tqdm

from camels_jax import checks, qa_tune
from camels_jax.adapt import online
from camels_jax.data import dataset, pipeline
from camels_jax.evaluation.method import REGISTRY, Context, Method, OnDoc, WeightFn, pad, register, score
from camels_jax.methods import baselines, camels, mac, retrieval

MAC_BANK_DIR = "eval_mac_bank"  # <workdir>/eval_mac_bank: MAC's bank after the test stream (orbax)
# Where MAC's other-bank control takes its documents: held out from the test stream and from MAC's training
# (whose documents it may have memorised).
OTHER_BANK_SPLITS = ("meta_val", "qa_val", "qa_train")


def cached_weights(fn: WeightFn) -> WeightFn:
  """`fn` computed once per (document, length): the lr sweep and the diagnostics read the same weights."""
  cache = {}

  def cached(d, length):
    if (d.doc.id, length) not in cache:
      cache[(d.doc.id, length)] = np.asarray(fn(d, length), np.float32)
    return cache[(d.doc.id, length)]
  return cached


def stream_spec(ctx: Context) -> pipeline.Spec:
  """The data's `Spec` with the stream's document buckets (`online.stream_buckets`)."""
  return dataclasses.replace(ctx.data.spec,
                             doc_buckets=online.stream_buckets(ctx.ec.online, ctx.data.spec.doc_buckets))


def doc_weights(ctx: Context, weights: WeightFn, d) -> np.ndarray:
  """w_N of document `d`'s tokens, computed at its bucket length as the adaptation does (so CaMeLS's
  jitted weighting compiles once per bucket and the cache of `cached_weights` is hit)."""
  n = len(d.tokens)
  return np.asarray(weights(d, pipeline.bucket(n, stream_spec(ctx).doc_buckets)))[:n]


def baseline(name: str, **eval_options: str) -> Callable[[Context], WeightFn]:
  """Builds `baselines.doc_weighting(name)` for a context; `eval_options` maps its options to `eval` fields."""

  def build(ctx: Context) -> WeightFn:
    texts = [d.doc.text for docs in ctx.data.splits.values() for d in docs]  # TF-IDF's idf: every document
    options = {option: ctx.ec[field] for option, field in eval_options.items()}
    return baselines.doc_weighting(name, ctx.model.tokenizer, texts, add_bos=ctx.data.spec.add_bos, **options)
  return build


def camels_weights(ctx: Context) -> WeightFn:
  """The trained weighting model's token weights (the best meta-validation of the camels job)."""
  wm_graphdef, meta = camels.load_trained(ctx.config, ctx.model, ctx.workdir)
  weigh = jax.jit(functools.partial(camels.token_weights, wm_graphdef))

  def fn(d, length):
    tokens_1xL = pad(d.tokens, length)[None].astype(np.int32)
    mask_1xL = pad(np.ones(len(d.tokens), np.int32), length)[None]
    return np.asarray(weigh(meta["wm"], tokens_1xL, mask_1xL))[0]
  return fn


def adapt(ctx: Context, docs, weights: WeightFn, lr: float, on_doc: OnDoc | None = None, desc: str = "adapt",
          **resume):
  """The QA-tuned model adapted on `docs` in order with `weights` at learning rate `lr` (`resume`:
  `online.adapt_stream`'s opt_state, start and on_state, with ctx.params the params after `start` documents).

  At lr 0 (the "no adaptation" candidate chosen) the updates are skipped: clipped Adam and SGD scale their
  whole step by the lr, so every document would leave the parameters exactly as they are. The state is then
  `ctx.params` itself, whose answers `score` has already computed for no adaptation.
  """
  if lr == 0:
    for i in range(len(docs)):
      if on_doc is not None:
        on_doc(i, ctx.params)
    return ctx.params
  oc = ctx.ec.online.copy_and_resolve_references()
  oc.lr = lr
  icfg = online.inner_config(oc, ctx.data.spec.doc_buckets)
  spec = stream_spec(ctx)
  batches = [pipeline.doc_batch([d], spec, ctx.data.pad_id) for d in docs]
  weight_fn = lambda i, b: weights(docs[i], b["doc_tokens_BxL"].shape[1])[None]
  params, _ = online.adapt_stream(ctx.model.graphdef, ctx.params, batches, weight_fn, oc, icfg,
                                  on_doc=on_doc, progress=ctx.progress, desc=desc, **resume)
  return params


def adapt_step_bytes(ctx: Context) -> int:
  """XLA's compiled memory of one adaptation step at the longest bucket: one step shape serves every
  weighting (the weights are an input)."""
  oc = ctx.ec.online.copy_and_resolve_references()
  buckets = ctx.data.spec.doc_buckets
  return online.step_bytes(ctx.model.graphdef, ctx.params, max(buckets), oc, online.inner_config(oc, buckets))


@dataclasses.dataclass(frozen=True)
class Weighted(Method):
  """One clipped Adam step per document on its token-weighted LM loss (`adapt.online`): the weighting is
  all that tells uniform, SSM, TF-IDF and CaMeLS apart."""

  name: str
  build_weights: Callable[[Context], WeightFn]  # the weighting, built once per evaluation
  require_trained: Callable[[str], None] | None = None  # workdir -> raises UserError without what it loads
  weights: WeightFn | None = None  # `build_weights`'s, set by `prepare`

  def require(self, config, workdir):
    if self.require_trained is not None:
      self.require_trained(workdir)

  def prepare(self, ctx, test_docs):
    return dataclasses.replace(self, weights=cached_weights(self.build_weights(ctx)))

  def lrs(self, ec, chosen):
    return tuple(ec.lrs)

  def adapt(self, ctx, docs, lr, on_doc=None, desc="adapt"):
    return adapt(ctx, docs, self.weights, lr, on_doc, desc)

  def token_weights(self, ctx, d):
    return doc_weights(ctx, self.weights, d)

  def record(self, ctx, state, test_docs):
    return {"memory_bytes": {"adapt": adapt_step_bytes(ctx)}}


class _NullWriter:
  def write_scalars(self, step, scalars):
    del step, scalars


def light_tune(ctx: Context, params):
  """QA light-tune after adaptation (reference baseline): QA-train, early stop on QA-val F1."""
  lt = ctx.ec.light_tune
  c = qa_tune.qa_tune_config()
  c.update(lr=lt.lr, patience=lt.patience, val_every=lt.val_every, max_steps=lt.max_steps,
           stop_metric="f1", val_decoding="greedy", max_new_tokens=ctx.ec.max_new_tokens)
  model = dataclasses.replace(ctx.model, params=params)
  best, _ = qa_tune.qa_tune(model, ctx.data, c, _NullWriter(), progress=ctx.progress)
  return best


@dataclasses.dataclass(frozen=True)
class LightTuned(Method):
  """`base`'s adaptation, then a QA light-tune of the adapted model (the reference's uniform + QA
  light-tune). It takes `base`'s chosen lr and adapted test stream when `base` ran before it: a sweep would
  light-tune once per lr."""

  name: str
  base: Method
  post_phase: ClassVar[str] = "light_tune"

  @property
  def adaptation(self):
    return self.base.adaptation

  def require(self, config, workdir):
    self.base.require(config, workdir)

  def prepare(self, ctx, test_docs):
    return dataclasses.replace(self, base=self.base.prepare(ctx, test_docs))

  def lrs(self, ec, chosen):
    return (chosen[self.base.name],) if self.base.name in chosen else self.base.lrs(ec, chosen)

  def adapt(self, ctx, docs, lr, on_doc=None, desc="adapt"):
    return self.base.adapt(ctx, docs, lr, on_doc, desc)

  def post_stream(self, ctx, state):
    return light_tune(ctx, state)

  def answer(self, ctx, state, docs, decoding, desc):
    return self.base.answer(ctx, state, docs, decoding, desc)

  def token_weights(self, ctx, d):
    return self.base.token_weights(ctx, d)

  def record(self, ctx, state, test_docs):
    return self.base.record(ctx, state, test_docs)


def distractor_docs(ctx: Context, test_docs, n: int) -> list:
  """`n` documents to mix into MAC's bank, none of them a test document or one MAC trained on: with generated
  data the question-free documents of its "loc" split past the locality texts (any number); otherwise the
  documents of `OTHER_BANK_SPLITS`, of which there must be `n`."""
  data = ctx.data
  if data.config.dataset == "generated":
    start = data.config.generated.loc_docs
    return dataset.generated_docs(data.config, ctx.model.tokenizer, ctx.workdir, "loc", start + n, start)
  test_ids = {d.doc.id for d in test_docs}
  pool = [d for split in OTHER_BANK_SPLITS for d in data.splits.get(split, ()) if d.doc.id not in test_ids]
  if len(pool) < n:
    raise checks.ConfigError(f"config: eval.mac_distractors asks for {n} distractor documents, but "
                             f"{', '.join(OTHER_BANK_SPLITS)} hold {len(pool)} (only generated data makes any number)")
  return pool[:n]


def mixed_bank(bank: mac.Bank, extra: mac.Bank, n: int, seed: int) -> mac.Bank:
  """`bank` with the first `n` documents of `extra` at seeded random positions (windows of the hierarchical
  aggregation then mix the two, as in a stream where they arrive among its documents)."""
  tokens_MxTxD = np.concatenate([bank.tokens_MxTxD, extra.tokens_MxTxD[:n]])
  return mac.Bank(tokens_MxTxD[np.random.default_rng([seed, n]).permutation(len(tokens_MxTxD))])


def other_bank_docs(data, test_docs) -> list:
  """As many documents as `test_docs` (fewer if the splits hold fewer) from `OTHER_BANK_SPLITS`, in the
  evaluation stream's order, none of them a test document: the bank of MAC's other-bank control."""
  pool = [d for split in OTHER_BANK_SPLITS for d in data.splits.get(split, ())]
  test_ids = {d.doc.id for d in test_docs}
  pool = [d for d in pool if d.doc.id not in test_ids]
  return list(pipeline.Stream(pool, min(len(test_docs), len(pool)), data.config.stream_seed, data.spec,
                              data.pad_id).docs)


@dataclasses.dataclass(frozen=True)
class Mac(Method):
  """MAC: no gradient step. Each document is amortized into a memory bank as it arrives; each question is
  answered by the frozen QA-tuned model with the prefix aggregated from the bank for it. No lr."""

  name: str = "mac"
  versus: ClassVar[tuple[str, ...]] = ("camels",)  # the paper's comparison: amortization against learned weights
  graphdef: Any = None  # the trained networks (`mac.load_trained`), set by `prepare`
  params: Any = None
  capacity: int = 0  # bank slots every prefix is aggregated over: the test stream's length

  def require(self, config, workdir):
    if "mac" not in config:
      raise checks.ConfigError("config: eval.methods has mac but the config has no mac section "
                               "(configs/mac_default.py)")
    mac.require_trained(workdir)

  def prepare(self, ctx, test_docs):
    graphdef, params = mac.load_trained(ctx.config, ctx.model, ctx.workdir)
    first = pipeline.doc_batch([test_docs[0]], ctx.data.spec, ctx.data.pad_id)
    # Compiled before the clock starts, as the gradient methods' steps are by their lr sweep.
    jax.block_until_ready(mac.amortize_jit(graphdef, params, first["doc_tokens_BxL"], first["doc_mask_BxL"]))
    return dataclasses.replace(self, graphdef=graphdef, params=params, capacity=len(test_docs))

  def adapt(self, ctx, docs, lr, on_doc=None, desc="adapt"):
    c = ctx.config.mac
    return mac.stream_bank(self.graphdef, self.params, docs, ctx.data.spec, ctx.data.pad_id, c.tokens,
                           ctx.model.cfg.d_model, on_doc=on_doc, progress=ctx.progress, desc=desc)

  def answer(self, ctx, state, docs, decoding, desc):
    prefix_fn = mac.prefix_fn(self.graphdef, self.params, state, self.capacity, ctx.config.mac.window)
    return score(ctx, ctx.params, docs, decoding, desc, prefix_fn=prefix_fn)

  def controls(self, ctx, state, test_docs):
    """The test questions answered from a bank of as many other documents (`other_bank_docs`): MAC's answers
    owe to its memory of the stream only what they gain over this."""
    others = other_bank_docs(ctx.data, test_docs)
    if not others:
      return {}
    bank = self.adapt(ctx, others, None, desc="mac other bank")
    prefix_fn = mac.prefix_fn(self.graphdef, self.params, bank, self.capacity, ctx.config.mac.window)
    other = score(ctx, ctx.params, test_docs, ctx.ec.decoding, "mac other-bank QA", prefix_fn=prefix_fn)
    ctx.say(f"mac: answer NLL {other['nll']:.4f} with a bank of {bank.docs} other documents "
            f"({', '.join(OTHER_BANK_SPLITS)})")
    return {"other_bank": other | {"bank_docs": bank.docs}} | self._distractors(ctx, state, test_docs)

  def _distractors(self, ctx, bank, test_docs) -> dict:
    """The test questions answered again from the stream's bank with `eval.mac_distractors` documents mixed
    in (`distractor_docs`, `mixed_bank`): how MAC's answers degrade as its memory grows. Each entry also has
    the seconds per document of amortizing the distractors, and the seconds per question and XLA's compiled
    bytes of aggregating that bank for one question batch."""
    counts, window = tuple(ctx.ec.mac_distractors), ctx.config.mac.window
    if not counts:
      return {}
    docs = distractor_docs(ctx, test_docs, max(counts))
    start = time.perf_counter()
    extra = self.adapt(ctx, docs, None, desc="mac distractors")
    amortize_s = (time.perf_counter() - start) / len(docs)
    batch = next(iter(pipeline.qa_eval_batches(test_docs[:1], ctx.data.spec, ctx.data.pad_id, ctx.ec.batch_size)))
    out = {}
    for n in counts:
      mixed = mixed_bank(bank, extra, n, ctx.data.config.stream_seed)
      lowered = mac.prefix_lowered(self.graphdef, self.params, batch, mixed, mixed.docs, window)
      prefix_fn = mac.prefix_fn(self.graphdef, self.params, mixed, mixed.docs, window)
      start = time.perf_counter()
      s = score(ctx, ctx.params, test_docs, ctx.ec.decoding, f"mac +{n} distractors QA", prefix_fn=prefix_fn)
      seconds = time.perf_counter() - start
      out[f"distractors_{n}"] = s | {
          "bank_docs": mixed.docs, "distractors": n, "amortize_s": amortize_s,
          "answer_s": seconds / max(len(s["per_question"]["nll"]), 1),
          "prefix_bytes": online.compiled_bytes(lowered.compile()), "bank_bytes": mixed.nbytes}
      ctx.say(f"mac: answer NLL {s['nll']:.4f}, F1 {s['f1']:.4f} with {n} distractors in a bank of "
              f"{mixed.docs} documents ({seconds:.0f} s)")
    return out

  def record(self, ctx, state, test_docs):
    state.save(os.path.join(ctx.workdir, MAC_BANK_DIR))
    return self._bank_record(ctx, state, test_docs)

  def _bank_record(self, ctx, bank, test_docs) -> dict:
    ctx.say(f"{self.name}: bank of {bank.docs} documents, {bank.size_tokens} tokens, {bank.nbytes / 2**20:.2f} MiB")
    return {"bank": {"docs": bank.docs, "tokens": bank.size_tokens, "bytes": bank.nbytes},
            "memory_bytes": self._memory(ctx, bank, test_docs[0])}

  def _memory(self, ctx, bank, doc) -> dict:
    """XLA's compiled memory of one document's amortization and of one question batch's prefix, and the bank's."""
    first = pipeline.doc_batch([doc], ctx.data.spec, ctx.data.pad_id)
    amortize = mac.amortize_jit.lower(self.graphdef, self.params, first["doc_tokens_BxL"], first["doc_mask_BxL"])
    batch = next(iter(pipeline.qa_eval_batches(ctx.data.splits["meta_val"][:1], ctx.data.spec, ctx.data.pad_id,
                                               ctx.ec.batch_size)))
    prefix = mac.prefix_lowered(self.graphdef, self.params, batch, bank, bank.docs, ctx.config.mac.window)
    return {"adapt": online.compiled_bytes(amortize.compile()), "prefix": online.compiled_bytes(prefix.compile()),
            "bank": bank.nbytes}


def _own_positions(index: retrieval.Index, docs) -> np.ndarray:
  """Each question's own document's position in `index` (-1: not in it), in `pipeline.questions(docs)`
  order."""
  position = {d.doc.id: j for j, d in enumerate(index.docs)}
  return np.array([position.get(d.doc.id, -1) for d in docs for _ in d.qas], np.int64)


def index_stream(docs, on_doc: OnDoc | None = None, progress: bool = False, desc: str = "index"):
  """The `retrieval.Index` of `docs` read in order (`on_doc(i, index)` after each)."""
  index = retrieval.Index()
  for i, d in enumerate(tqdm.tqdm(docs, desc=desc, disable=not progress, leave=False)):
    index = index.add(d)
    if on_doc is not None:
      on_doc(i, index)
  return index


@dataclasses.dataclass(frozen=True)
class Retrieval(Method):
  """No gradient step: the stream's documents are indexed as they arrive, and each question is answered by
  the frozen QA-tuned model with the `eval.retrieval.k` documents ranked highest for it in its prompt
  (`methods.retrieval`). No lr. Its answers also say how often the question's own document was retrieved
  ("recall") and how many prompts were cut to fit ("documents_cut")."""

  name: str = "retrieval"

  def adapt(self, ctx, docs, lr, on_doc=None, desc="adapt"):
    return index_stream(docs, on_doc, ctx.progress, desc)

  def answer(self, ctx, state, docs, decoding, desc):
    rc = ctx.ec.retrieval
    limit = ctx.model.cfg.max_len - ctx.ec.max_new_tokens  # room for the answer the generation may write
    limit = min(limit, rc.max_len) if rc.max_len else limit
    prompted, spec, cut, top_QxK = retrieval.prompted(docs, state, rc.k, ctx.data.spec,
                                                      ctx.model.tokenizer.encode("\n\n"), limit)
    scores = score(ctx, ctx.params, prompted, decoding, desc, spec=spec)
    return scores | {"recall": retrieval.recall(top_QxK, _own_positions(state, docs)), "documents_cut": cut}

  def record(self, ctx, state, test_docs):
    return {"index_docs": len(state)}


class Retrieved(NamedTuple):
  """MAC + retrieval's state: MAC's bank of the stream and the index of the same documents."""

  bank: mac.Bank
  index: retrieval.Index


@dataclasses.dataclass(frozen=True)
class MacRetrieval(Mac):
  """MAC with its bank restricted, for each question, to the `eval.retrieval.k` documents ranked highest for
  it (`methods.retrieval`) before aggregation (`mac.prefix_rows`)."""

  name: str = "mac+retrieval"
  versus: ClassVar[tuple[str, ...]] = ("mac", "retrieval")

  def adapt(self, ctx, docs, lr, on_doc=None, desc="adapt"):
    index = [retrieval.Index()]

    def both(i, bank):
      index[0] = index[0].add(docs[i])
      if on_doc is not None:
        on_doc(i, Retrieved(bank, index[0]))
    bank = super().adapt(ctx, docs, lr, both, desc)
    return Retrieved(bank, index[0])

  def answer(self, ctx, state, docs, decoding, desc):
    top_k = ctx.ec.retrieval.k
    top_QxK = state.index.top_k([qa.question for d in docs for qa in d.qas], top_k)
    # Each question's bank: its retrieved documents' tokens (fewer than k while the stream is short: padded).
    bank_QxKxTxD = np.zeros((len(top_QxK), top_k) + state.bank.tokens_MxTxD.shape[1:], np.float32)
    valid_QxK = np.zeros((len(top_QxK), top_k), bool)
    bank_QxKxTxD[:, :top_QxK.shape[1]] = state.bank.tokens_MxTxD[top_QxK]
    valid_QxK[:, :top_QxK.shape[1]] = True

    def prefix_fn(batch):
      rows_B = np.maximum(batch["qa_index_B"], 0)  # padding rows (-1) take any question's bank
      return mac.prefix_rows_jit(self.graphdef, self.params, {k: batch[k] for k in mac.QUESTION_KEYS},
                                 bank_QxKxTxD[rows_B], valid_QxK[rows_B], window=ctx.config.mac.window)
    scores = score(ctx, ctx.params, docs, decoding, desc, prefix_fn=prefix_fn)
    return scores | {"recall": retrieval.recall(top_QxK, _own_positions(state.index, docs))}

  def controls(self, ctx, state, test_docs):
    return {}  # MAC's row has the other-bank control

  def record(self, ctx, state, test_docs):
    return self._bank_record(ctx, state.bank, test_docs)  # the bank MAC's row saves


for _method in (Weighted("uniform", baseline("uniform")), Weighted("ssm", baseline("ssm")),
                Weighted("tfidf", baseline("tfidf", min_threshold="tfidf_min_threshold")),
                Weighted("camels", camels_weights, camels.require_trained),
                # All weight on the tokens of the gold answers, which no method sees: the ceiling of any
                # weighting under this protocol, not a method.
                Weighted("oracle", baseline("oracle"))):
  register(_method)
register(LightTuned("uniform+qa_lt", REGISTRY["uniform"]))
register(Mac())
register(Retrieval())
register(MacRetrieval())
