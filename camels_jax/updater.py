"""Keeping a model up to date with your own documents, as a library: adapt it on them in order with a method
a train (and evaluate) run prepared, as the evaluation's online protocol does; answer questions from the
result; export it. `camels_jax.update`, `camels_jax.ask` and `camels_jax.export` are its commands (their
docstrings: the input forms and what a workdir holds).

  from camels_jax import updater
  u = updater.Updater.load("runs/default", method="camels")  # the lr its evaluation chose; its QA-tuned model
  state = u.update(["The Brennik Guild was founded in 1871 by ...", "..."])
  u.export(state, "runs/notes/hf")  # transformers.AutoModelForCausalLM.from_pretrained("runs/notes/hf")
  u.ask(state, ["Who founded the Brennik Guild?"])  # [Answer(text=..., logprob=..., tokens=...)]
  u.ask(None, ["Who founded the Brennik Guild?"])  # the model before the update

Methods: uniform, ssm, tfidf, camels (one clipped Adam step per document on the token-weighted loss, at the lr
the method's evaluation chose unless one is given; TF-IDF's document frequencies come from the documents
updated on) and mac (each document amortized into a memory bank by the trained MAC networks; no lr). A
document longer than the model's longest document bucket is read as consecutive pieces of that length, each
one step, where the evaluation would truncate it.
"""

import collections
import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging

from camels_jax import checkpoint, checks, evaluation, io_utils, plots, qa, qa_tune
from camels_jax.adapt import online
from camels_jax.data import dataset, pipeline
from camels_jax.data.sources import DataError, Document, read_text
from camels_jax.evaluation import methods as methods_lib
from camels_jax.methods import mac
from camels_jax.models import export as export_lib
from camels_jax.models import hf, loading

METHODS = ("uniform", "ssm", "tfidf", "camels", "mac")
QA_TUNED = "qa_tuned"  # --base: the QA-tuned model of the from_workdir
STATE_DIR = "update_state"  # <workdir>/update_state: what an interrupted update resumes from
EXPORT_DIR = "hf"  # <workdir>/hf: the adapted model as a Hugging Face checkpoint (weighted methods)
BANK_DIR = "mac"  # <workdir>/mac: MAC's bank of the documents and its networks (orbax), with a note
RESULT_FILE = "update.json"
WEIGHTS_PAGE = "token_weights.html"


# ------------------------------------------------------------------------------------------------
# Documents.


def read_documents(path: str, separator: str = "", text_field: str = "text") -> list[tuple[str, str]]:
  """(id, text) of every document in `path` (a text file, a .jsonl file or a directory; the module doc).

  Raises:
    DataError: a missing, empty or non-UTF-8 file, a JSONL line that is not an object with a non-empty string
      `text_field` (named by file and line), a directory without .txt files, or no document at all.
  """
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.endswith(".txt") and os.path.isfile(os.path.join(path, n)))
    if not names:
      raise DataError(f"{path}: a directory of documents holds no .txt file")
    return [(name, read_text(os.path.join(path, name)).strip()) for name in names]
  text = read_text(path)
  if path.endswith(".jsonl"):
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{number}: not a JSON object ({e.msg})") from None
      value = record.get(text_field) if isinstance(record, dict) else None
      if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}:{number}: no non-empty string field {text_field!r} (set --text_field)")
      docs.append((f"{os.path.basename(path)}:{number}", value.strip()))
    return docs
  lines, docs, start = text.splitlines(), [], 1
  current: list[str] = []
  for number, line in enumerate(lines + [separator if separator else ""], 1):
    boundary = line.strip() == separator if separator else not line.strip()
    if boundary:
      if "".join(current).strip():
        docs.append((f"{os.path.basename(path)}:{start}", "\n".join(current).strip()))
      current, start = [], number + 1
    else:
      current.append(line)
  if not docs:
    raise DataError(f"{path}: no document in the file")
  return docs


def tokenized(texts: Sequence[tuple[str, str]], tok, spec: pipeline.Spec) -> list[pipeline.TokenizedDoc]:
  """The documents as the online protocol reads them; one longer than the longest bucket becomes consecutive
  pieces of at most that many tokens (ids "<id>#<k>"), so no text is left unread."""
  limit = spec.doc_buckets[-1] - (1 if spec.add_bos else 0)
  pieces = []
  for doc_id, text in texts:
    ids, offsets = tok.encode_with_offsets(text)
    cuts = [0] + [offsets[i][0] for i in range(limit, len(ids), limit)] + [len(text)]
    parts = [text[a:b] for a, b in zip(cuts, cuts[1:]) if text[a:b].strip()]
    for k, part in enumerate(parts):
      piece_id = doc_id if len(parts) == 1 else f"{doc_id}#{k}"
      pieces.append(Document(piece_id, piece_id, part))
  return pipeline.tokenize(pieces, tok, spec, collections.Counter())


def fingerprint(texts: Sequence[tuple[str, str]], method: str, lr, base: str) -> str:
  """What an update is of: a resumed update must continue the same one."""
  h = hashlib.sha256(json.dumps([method, lr, base, list(texts)]).encode())
  return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# The updater.


class Answer(NamedTuple):
  text: str  # the generated answer (the evaluation's decoding)
  logprob: float  # its log-likelihood under the model (answer tokens and EOS, summed)
  tokens: int  # how many tokens that covers


@dataclasses.dataclass
class Updater:
  """A method ready to update a model on documents: the from_workdir's config, the base model and params, the
  method's lr and trained artifacts (`load`)."""

  config: ml_collections.ConfigDict  # the from_workdir's job config
  model: loading.Loaded
  params: Any  # the base params updates start from
  method: str
  lr: float | None  # None for MAC
  from_workdir: str
  base: str = QA_TUNED
  progress: bool = True

  @classmethod
  def load(cls, from_workdir: str, method: str = "uniform", lr: float | None = None, base: str = QA_TUNED,
           progress: bool = True) -> "Updater":
    """Checks what the update needs (`check`), then loads the base model.

    Args:
      from_workdir: the workdir of a train run (and, for the default lr, of its evaluate run).
      method: one of `METHODS`.
      lr: the adaptation lr; None reads the one the method's evaluation chose.
      base: `QA_TUNED` (the from_workdir's QA-tuned model) or a model source (as model.source).
      progress: progress bars.
    """
    config, lr = check(from_workdir, method, lr, base)
    mc = config.model.copy_and_resolve_references()
    if base != QA_TUNED:  # another model: its own tokenizer too
      mc.source, mc.tokenizer = base, ""
    model = loading.load(mc)
    params = model.params
    if base == QA_TUNED:
      params, _ = qa_tune.load_tuned(model, from_workdir)
    return cls(config, model, params, method, lr, from_workdir, base, progress)

  def context(self, docs) -> evaluation.Context:
    """The evaluation's context with `docs` as the data (TF-IDF's document frequencies come from them)."""
    c = self.config.data
    data = dataset.Data(c, pipeline.Spec.from_config(c), self.model.tokenizer.pad_id, {"update": list(docs)}, [],
                        {})
    return evaluation.Context(self.config, self.model, self.params, data, self.from_workdir, self.progress)

  def documents(self, texts: Sequence[str | tuple[str, str]]) -> list[pipeline.TokenizedDoc]:
    """Strings (ids "0", "1", ...) or (id, text) pairs, tokenised as `update` reads them."""
    pairs = [(str(i), t) if isinstance(t, str) else tuple(t) for i, t in enumerate(texts)]
    return tokenized(pairs, self.model.tokenizer, pipeline.Spec.from_config(self.config.data))

  def update(self, texts: Sequence[str | tuple[str, str]], state_dir: str = "", save_every: int = 10,
             weights_out: list | None = None):
    """The base model updated on `texts` in order: adapted params (weighted methods) or a `mac.Bank`.

    Args:
      texts: the documents (strings, or (id, text) pairs).
      state_dir: where to checkpoint every `save_every` documents and at the end, and resume from ("": none).
      save_every: documents between checkpoints (>= 1).
      weights_out: if a list, gets (tokenized document, w_N) of each document the weights were read for.
    """
    docs = self.documents(texts)
    ctx = self.context(docs)
    method = evaluation.REGISTRY[self.method].prepare(ctx, docs)
    if weights_out is not None and self.method != "mac":
      weights_out.extend((d, method.token_weights(ctx, d)) for d in docs)
    key = fingerprint([(d.doc.id, d.doc.text) for d in docs], self.method, self.lr, self.base)
    if self.method == "mac":
      return self._bank(ctx, method, docs, state_dir, save_every, key)
    return self._adapt(ctx, method, docs, state_dir, save_every, key)

  def _resume(self, state_dir: str, key: str, abstract) -> tuple[int, Any]:
    """(documents already read, their saved state) in `state_dir`, or (0, None)."""
    if not state_dir or not os.path.isdir(state_dir):
      return 0, None
    with checkpoint.Checkpointer(state_dir, max_to_keep=1) as ckpt:
      if ckpt.latest_step() is None:
        return 0, None
      meta = ckpt.restore(None, None).meta
      if meta.get("fingerprint") != key:
        raise checks.UserError(f"{state_dir}: holds an update of other documents or settings; give another "
                               f"--workdir, or delete that directory to start over")
      return meta["docs"], ckpt.restore(None, abstract).state

  def _saver(self, state_dir: str, save_every: int, n: int, key: str):
    if not state_dir:
      return None

    def save(i, state):
      if (i + 1) % save_every == 0 or i + 1 == n:
        with checkpoint.Checkpointer(state_dir, max_to_keep=1) as ckpt:
          ckpt.save(i + 1, state, meta={"docs": i + 1, "fingerprint": key})
    return save

  def _adapt(self, ctx, method, docs, state_dir, save_every, key):
    oc = ctx.ec.online
    direction = online.direction_of(oc.optimizer, float(oc.grad_clip))
    abstract = {"params": self.params, "opt": jax.eval_shape(direction.init, self.params)}
    start, saved = self._resume(state_dir, key, abstract)
    if start == len(docs):
      return saved["params"]
    save = self._saver(state_dir, save_every, len(docs), key)
    resume = {} if saved is None else {"opt_state": saved["opt"], "start": start}
    if save is not None:
      resume["on_state"] = lambda i, params, opt: save(i, {"params": params, "opt": opt})
    if saved is not None:
      ctx = dataclasses.replace(ctx, params=saved["params"])
    return methods_lib.adapt(ctx, docs, method.weights, self.lr, desc="update", **resume)

  def _bank(self, ctx, method, docs, state_dir, save_every, key):
    c = self.config.mac
    shape = (len(docs), c.tokens, self.model.cfg.d_model)
    start, saved = self._resume(state_dir, key, {"bank": np.zeros(shape, np.float32)})
    bank = mac.Bank.empty(c.tokens, self.model.cfg.d_model, capacity=len(docs))
    for m_TxD in (np.asarray(saved["bank"])[:start] if saved is not None else []):
      bank = bank.append(m_TxD)
    save = self._saver(state_dir, save_every, len(docs), key)
    for i in tqdm.trange(start, len(docs), desc="update", disable=not self.progress, initial=start,
                         total=len(docs)):
      b = pipeline.doc_batch([docs[i]], ctx.data.spec, ctx.data.pad_id)
      bank = bank.append(np.asarray(mac.amortize_jit(method.graphdef, method.params, b["doc_tokens_BxL"],
                                                     b["doc_mask_BxL"]))[0])
      if save is not None:
        save(i, {"bank": bank.padded(len(docs))[0]})
    return bank

  def load_state(self, workdir: str):
    """The state an update wrote to `workdir`: the exported params, or MAC's bank."""
    if self.method == "mac":
      return mac.Bank.restore(os.path.join(workdir, BANK_DIR, "bank"))
    folder = os.path.join(workdir, EXPORT_DIR)
    _, params = hf.load_folder(folder)
    return params

  def export(self, state, folder: str, note: dict | None = None) -> str:
    """Adapted params as a Hugging Face checkpoint folder (`models.export`). MAC changes no weight: its bank
    (`folder`/bank) and trained networks (`folder`/networks, params) as orbax, and a note of what loads them."""
    extra = {"camels_jax_update.json": json.dumps(note or {}, indent=2)}
    if isinstance(state, mac.Bank):
      state.save(os.path.join(folder, "bank"))
      with checkpoint.Checkpointer(os.path.join(folder, "networks"), max_to_keep=1) as ckpt:
        ckpt.save(0, {"params": self._mac_networks[1]}, meta={"mac": self.config.mac.to_dict()})
      extra["README.txt"] = (
          "MAC's memory of the documents: bank/ (mac.Bank.restore) and networks/ (the params of "
          "camels_jax.methods.mac.build(config.mac, base model)), both orbax. The base model is the QA-tuned model "
          f"of {os.path.abspath(self.from_workdir)}. In Python: camels_jax.updater.Updater.load(from_workdir, "
          "'mac').load_state(<update workdir>), then .ask(bank, questions).\n")
      for name, text in extra.items():
        io_utils.write_atomic(os.path.join(folder, name), text)
      return folder
    return export_lib.save_pretrained(folder, self.model.cfg, state, self.model.tokenizer, extra=extra)

  @functools.cached_property
  def _mac_networks(self):
    return mac.load_trained(self.config, self.model, self.from_workdir)

  def _conditioning(self, state):
    """(params, prefix_fn or None) that answer from `state`: params, MAC's bank, or None (the base model)."""
    if isinstance(state, mac.Bank):
      graphdef, mac_params = self._mac_networks
      return self.params, mac.prefix_fn(graphdef, mac_params, state, state.docs, self.config.mac.window)
    return (self.params if state is None else state), None

  def _batches(self, questions: Sequence[str], answers: Sequence[str]):
    spec, tok = pipeline.Spec.from_config(self.config.data), self.model.tokenizer
    doc = Document("ask", "ask", "", tuple(questions), tuple(answers))
    docs = pipeline.tokenize([doc], tok, spec, collections.Counter())
    if len(docs[0].qas) != len(questions):
      raise checks.UserError(f"an answer is longer than data.max_answer_len={spec.max_answer_len} tokens")
    return list(pipeline.qa_eval_batches(docs, spec, tok.pad_id, self.config.eval.batch_size))

  def score(self, state, questions: Sequence[str], answers: Sequence[str]) -> list[tuple[float, int]]:
    """(log-likelihood, tokens) of each answer (its tokens and EOS) to its question, given `state` (as `ask`)."""
    params, prefix_fn = self._conditioning(state)
    out = []
    for batch in self._batches(questions, answers):
      prefix = None if prefix_fn is None else prefix_fn(batch)
      logp_B, count_B = qa.answer_logprobs(self.model.graphdef, params, batch, prefix)
      out += [(float(lp), int(n)) for lp, n, ok in zip(np.asarray(logp_B), np.asarray(count_B), batch["qa_valid_B"])
              if ok]
    return out

  def ask(self, state, questions: Sequence[str], decoding: str | None = None) -> list[Answer]:
    """Answers to `questions` from `state` (params, or MAC's bank; None: the base model), in the evaluation's
    prompt format and decoding (`decoding` overrides it), each with its log-likelihood."""
    ec = self.config.eval
    decoding = decoding or ec.decoding
    params, prefix_fn = self._conditioning(state)
    texts = []
    for batch in self._batches(questions, [""] * len(questions)):  # the answer slot is not read
      prefix = None if prefix_fn is None else prefix_fn(batch)
      out = qa.answer(self.model.graphdef, params, self.model.cfg, self.model.tokenizer, batch, decoding,
                      prefix=prefix, **evaluation.method.generate_kwargs(ec, decoding))
      texts += [a for a, ok in zip(out, batch["qa_valid_B"]) if ok]
    return [Answer(t, lp, n) for t, (lp, n) in zip(texts, self.score(state, questions, texts))]


def check(from_workdir: str, method: str, lr: float | None, base: str) -> tuple[ml_collections.ConfigDict, float]:
  """The from_workdir's config and the lr to use; one `checks.UserError` when the update cannot run (an unknown
  method, a missing trained artifact or QA-tuned model, no lr given or chosen), before any model loads."""
  if method not in METHODS:
    raise checks.UserError(f"--method={method!r}: expected one of {', '.join(METHODS)}")
  config = io_utils.workdir_config(from_workdir, "a finished `python -m camels_jax.train` run")
  if base != QA_TUNED and method in ("camels", "mac"):
    raise checks.UserError(f"--method={method} reads the tokens and hidden states of the model it was trained "
                           f"on: it needs --base={QA_TUNED} (the from_workdir's QA-tuned model), not {base!r}")
  evaluation.REGISTRY[method].require(config, from_workdir)  # camels: the weighting model; mac: its networks
  if base == QA_TUNED and not os.path.isdir(os.path.join(from_workdir, qa_tune.TUNED)):
    raise checks.UserError(f"{from_workdir}: no QA-tuned model ({qa_tune.TUNED}/); run the train job there, or "
                           f"give --base=<model source>")
  if method == "mac":
    return config, None
  if lr is None:
    path = os.path.join(from_workdir, "eval", "results.json")
    try:
      with open(path, encoding="utf-8") as f:
        lr = json.load(f)["methods"][method]["lr"]
    except (OSError, ValueError, KeyError, TypeError):
      raise checks.UserError(f"{path}: no lr chosen for {method} (run `python -m camels_jax.evaluate` there with "
                             f"{method} in eval.methods, or give --lr)") from None
  if not isinstance(lr, (int, float)) or lr < 0:
    raise checks.UserError(f"--lr={lr!r}: expected a number >= 0")
  return config, float(lr)


# ------------------------------------------------------------------------------------------------
# An update's workdir.


def run(from_workdir: str, docs_path: str, workdir: str, method: str = "uniform", lr: float | None = None,
        base: str = QA_TUNED, separator: str = "", text_field: str = "text", save_every: int = 10,
        progress: bool = True, say=logging.info) -> dict:
  """An update on the documents of `docs_path`, written to `workdir` (`camels_jax.update`'s doc); returns what
  it writes to update.json."""
  texts = read_documents(docs_path, separator, text_field)
  u = Updater.load(from_workdir, method, lr, base, progress)
  say(f"update: {len(texts)} documents with {method}" + ("" if u.lr is None else f" at lr {u.lr:g}") +
      f", from the {'QA-tuned model of ' + from_workdir if base == QA_TUNED else base}")
  if u.lr == 0:
    say(f"update: lr 0 (no adaptation won {method}'s evaluation): the model stays as it is")
  weights: list = []
  start = time.perf_counter()
  state = u.update(texts, os.path.join(workdir, STATE_DIR), save_every, weights)
  seconds = time.perf_counter() - start
  record = {"from_workdir": os.path.abspath(from_workdir), "method": method, "lr": u.lr, "base": base,
            "documents": [doc_id for doc_id, _ in texts], "pieces": len(u.documents(texts)),
            "seconds": seconds, "seconds_per_document": seconds / len(texts),
            "model": u.model.cfg.arch, "output": BANK_DIR if method == "mac" else EXPORT_DIR}
  u.export(state, os.path.join(workdir, BANK_DIR if method == "mac" else EXPORT_DIR), note=record)
  if weights:
    tok = u.model.tokenizer
    plots.write_heatmap_html(os.path.join(workdir, WEIGHTS_PAGE), [([tok.decode([t]) for t in d.tokens], w)
                                                                   for d, w in weights],
                             [f"{method}: {d.doc.id}" for d, _ in weights], f"Token weights: {method}")
  io_utils.write_json(os.path.join(workdir, RESULT_FILE), record)
  return record


