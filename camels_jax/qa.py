"""Question answering shared by every method: SQuAD metrics, answer NLL, answer generation, evaluation.

Protocol (the CaMeLS reference, notes/reference.md §6):
- A QA sequence is question tokens, then " " + answer + EOS; the NLL covers the answer and its EOS.
- Generation prompts are the question alone (no template), left-padded so that every row's last question
  token sits in the last column; 16 new tokens at most, greedy or diverse beam search (12 beams, 4 groups,
  diversity penalty 10), pad = EOS.
- The answer is the generated text up to EOS, decoded without special tokens, with the tokenizer
  clean-up of transformers (`clean_up_tokenization_spaces=True`) and stripped; the gold is cleaned the same
  way.
- F1 is SQuAD v1.1 token F1; `exact_match` is SQuAD EM; `prefix_exact_match` is the reference's "EM",
  which compares the normalised prediction cut to the normalised gold's length. All three score against
  the reference's single gold answer per question.
- `official_exact_match` / `official_f1` are what published SQuAD numbers use (evaluate-v1.1.py): the best
  EM / F1 over all gold answers of the question, taken as the dataset gives them (not cleaned).
"""

import collections
import dataclasses
import functools
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from camels_jax.adapt import loss
from camels_jax.models import decoding as decoding_lib
from camels_jax.models import transformer
from camels_jax.models.config import ModelConfig

DECODINGS = ("greedy", "beam")
Batch = Mapping[str, np.ndarray]

# ------------------------------------------------------------------------------------------------
# SQuAD v1.1 metrics (the official evaluate-v1.1.py definitions, which the reference copies).

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
  """Lower case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (SQuAD)."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", s).split())


def f1(prediction: str, gold: str) -> float:
  """SQuAD v1.1 token F1 of the normalised strings (0 when they share no token, so 0 if either is empty)."""
  pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
  num_same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
  if num_same == 0:
    return 0.0
  precision, recall = num_same / len(pred_tokens), num_same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> bool:
  """SQuAD v1.1 exact match: the normalised strings are equal."""
  return normalize_answer(prediction) == normalize_answer(gold)


def prefix_exact_match(prediction: str, gold: str) -> bool:
  """The reference's EM (util.exact_match, match_length=False): the normalised prediction, cut to the
  normalised gold's character length, equals the normalised gold.

  So "Paris, France" matches "Paris", and so does "Parisian" (a character prefix); an empty normalised
  gold matches anything.
  """
  norm_gold = normalize_answer(gold)
  return normalize_answer(prediction)[:len(norm_gold)] == norm_gold


def official_exact_match(prediction: str, golds: Sequence[str]) -> bool:
  """SQuAD v1.1's EM: the best `exact_match` over all gold answers (metric_max_over_ground_truths)."""
  return _max_over_golds(exact_match, prediction, golds)


def official_f1(prediction: str, golds: Sequence[str]) -> float:
  """SQuAD v1.1's F1: the best `f1` over all gold answers (metric_max_over_ground_truths)."""
  return _max_over_golds(f1, prediction, golds)


def _max_over_golds(metric, prediction: str, golds: Sequence[str]):
  if isinstance(golds, str) or not golds:  # a bare string would be scored letter by letter
    raise ValueError(f"golds must be a non-empty sequence of strings, got {golds!r}")
  return max(metric(prediction, gold) for gold in golds)


# transformers' `clean_up_tokenization` (what decode(..., clean_up_tokenization_spaces=True) applies).
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def clean_text(text: str) -> str:
  """Text as the reference compares it: transformers' tokenization clean-up, then strip."""
  for old, new in _CLEAN_UP:
    text = text.replace(old, new)
  return text.strip()


# ------------------------------------------------------------------------------------------------
# Answer likelihood.


def _qa_arrays(batch: Batch):
  """tokens, mask and the answer loss mask restricted to valid rows."""
  valid_Bx1 = jnp.asarray(batch["qa_valid_B"])[:, None]
  return (batch["qa_tokens_BxS"], batch["qa_mask_BxS"],
          jnp.asarray(batch["qa_loss_mask_BxS"]) & valid_Bx1)


def _answer_nll_B(logits_BxSxV, tokens_BxS, loss_mask_BxS):
  # Row by row through the shared loss, so there is one definition of the answer NLL.
  per_row = jax.vmap(lambda l, t, m: loss.answer_nll(l[None], t[None], m[None]))
  return per_row(logits_BxSxV, tokens_BxS, loss_mask_BxS)


# The batch arrays the answer likelihood (and QA training) reads.
LIKELIHOOD_KEYS = ("qa_tokens_BxS", "qa_mask_BxS", "qa_loss_mask_BxS", "qa_valid_B")


def _device_batch(batch: Batch) -> dict[str, Any]:
  """Only the arrays the likelihood needs, so other keys neither retrace nor get transferred."""
  return {k: batch[k] for k in LIKELIHOOD_KEYS}


@functools.partial(jax.jit, static_argnums=0)
def _answer_logprobs(graphdef, params, batch, prefix=None):
  tokens_BxS, mask_BxS, loss_mask_BxS = _qa_arrays(batch)
  nll_B, count_B = _answer_nll_B(transformer.apply(graphdef, params, tokens_BxS, mask_BxS, prefix), tokens_BxS,
                                 loss_mask_BxS)
  return -nll_B, count_B


@functools.partial(jax.jit, static_argnums=0)
def _qa_nll(graphdef, params, batch):
  tokens_BxS, mask_BxS, loss_mask_BxS = _qa_arrays(batch)
  return loss.answer_nll(transformer.apply(graphdef, params, tokens_BxS, mask_BxS), tokens_BxS,
                         loss_mask_BxS)


def answer_logprobs(graphdef: nnx.GraphDef, params: transformer.Params, batch: Batch,
                    prefix: transformer.Prefix | None = None):
  """Per-row answer log-likelihood and answer length (jitted).

  Args:
    graphdef, params: the model.
    batch: a QA batch (qa_tokens_BxS, qa_mask_BxS, qa_loss_mask_BxS, qa_valid_B are read).
    prefix: a `transformer.Prefix` with one row per batch row conditioning the model (MAC), or None.

  Returns:
    (logp_B, count_B): the summed log-probability of each row's answer tokens and EOS, and their
    number; both 0 on invalid rows.
  """
  return _answer_logprobs(graphdef, params, _device_batch(batch), prefix)


def qa_nll(graphdef: nnx.GraphDef, params: transformer.Params, batch: Batch):
  """Summed answer NLL over the batch's valid rows and the number of answer tokens it covers (jitted).

  Summing (sum, count) over batches and dividing gives the token-weighted NLL the reference reports.

  Args:
    graphdef, params: the model.
    batch: a QA batch (qa_tokens_BxS, qa_mask_BxS, qa_loss_mask_BxS, qa_valid_B are read).

  Returns:
    (nll_sum, count) as float32 scalars.
  """
  return _qa_nll(graphdef, params, _device_batch(batch))


# ------------------------------------------------------------------------------------------------
# Generation.


def prompts(batch: Batch, pad_id: int, eos_id: int, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded question prompts of a QA batch.

  The prompt of row i is qa_tokens_BxS[i, :qa_prompt_len_B[i]] (the question, with BOS if the data adds
  one). The width P is the longest prompt rounded up to `multiple`, or, where that is coarser, to a quarter
  of the power of two at or below it (at most S): the jitted decoders compile for a few widths only, also
  where prompts hold whole documents (the open book: 5 widths from 256 to 511 tokens, not 16).
  Invalid rows get a one-token prompt (EOS), so no row is empty.

  Args:
    batch: a QA batch (qa_tokens_BxS, qa_prompt_len_B, qa_valid_B).
    pad_id: id written into the padding (masked out).
    eos_id: the invalid rows' prompt.
    multiple: P is a multiple of this.

  Returns:
    prompt_BxP (int32) and mask_BxP (int32, 1 on the question tokens).
  """
  tokens_BxS = np.asarray(batch["qa_tokens_BxS"])
  valid_B = np.asarray(batch["qa_valid_B"], bool)
  len_B = np.where(valid_B, np.asarray(batch["qa_prompt_len_B"]), 1)
  s = tokens_BxS.shape[1]
  longest = int(len_B.max())
  step = max(multiple, (1 << (longest.bit_length() - 1)) // 4)
  p = min(s, -(-longest // step) * step)
  # Column j of the prompt holds token j - (P - len) of the question, or padding when that is negative.
  src_BxP = np.arange(p)[None, :] - (p - len_B[:, None])
  mask_BxP = src_BxP >= 0
  prompt_BxP = np.take_along_axis(tokens_BxS, np.clip(src_BxP, 0, s - 1), axis=1)
  prompt_BxP = np.where(valid_B[:, None], prompt_BxP, eos_id)
  prompt_BxP = np.where(mask_BxP, prompt_BxP, pad_id)
  return prompt_BxP.astype(np.int32), mask_BxP.astype(np.int32)


def answer_text(tokenizer, ids, eos_id: int) -> str:
  """The answer a generated id sequence spells: ids before the first EOS, decoded and cleaned.

  Special tokens are dropped as the reference's `skip_special_tokens=True` does.
  """
  ids = [int(i) for i in ids]
  if eos_id in ids:
    ids = ids[:ids.index(eos_id)]
  return clean_text(tokenizer.backend.decode(ids, skip_special_tokens=True))


def generate(graphdef: nnx.GraphDef, params: transformer.Params, cfg: ModelConfig, tokenizer,
             batch: Batch, decoding: str = "greedy", max_new_tokens: int = 16, num_beams: int = 12,
             num_groups: int = 4, diversity_penalty: float = 10.0,
             prefix: transformer.Prefix | None = None) -> decoding_lib.Decoded:
  """Generated ids (after the prompt) for every row of a QA batch; see `answer`."""
  prompt_BxP, mask_BxP = prompts(batch, tokenizer.pad_id, tokenizer.eos_id)
  if decoding == "greedy":
    return decoding_lib.greedy(graphdef, params, prompt_BxP, mask_BxP, prefix, cfg=cfg,
                               max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id)
  if decoding == "beam":
    return decoding_lib.diverse_beam_search(
        graphdef, params, prompt_BxP, mask_BxP, prefix, cfg=cfg, max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_id, num_beams=num_beams, num_groups=num_groups,
        diversity_penalty=float(diversity_penalty))
  raise ValueError(f"decoding={decoding!r} is not one of {DECODINGS}")


def answer(graphdef: nnx.GraphDef, params: transformer.Params, cfg: ModelConfig, tokenizer,
           batch: Batch, decoding: str = "greedy", max_new_tokens: int = 16, num_beams: int = 12,
           num_groups: int = 4, diversity_penalty: float = 10.0,
           prefix: transformer.Prefix | None = None) -> list[str]:
  """The model's answer to every question of a QA batch.

  Args:
    graphdef, params, cfg: the model.
    tokenizer: its tokenizer (eos_id ends an answer, pad_id pads the prompts).
    batch: a QA batch (qa_tokens_BxS, qa_prompt_len_B, qa_valid_B).
    decoding: "greedy" (the reference's QA-tuning validation) or "beam" (diverse beam search, the
      reference's final evaluation).
    max_new_tokens: generation budget (reference: 16).
    num_beams, num_groups, diversity_penalty: diverse beam search settings (reference: 12, 4, 10.0).
    prefix: a `transformer.Prefix` of B rows conditioning the model, or None.

  Returns:
    B answer strings; "" for invalid rows.
  """
  out = generate(graphdef, params, cfg, tokenizer, batch, decoding, max_new_tokens, num_beams, num_groups,
                 diversity_penalty, prefix)
  tokens_BxT = np.asarray(out.tokens_BxT)
  valid_B = np.asarray(batch["qa_valid_B"], bool)
  return [answer_text(tokenizer, row, tokenizer.eos_id) if ok else "" for row, ok in zip(tokens_BxT, valid_B)]


# ------------------------------------------------------------------------------------------------
# Evaluation.


# The per-question metrics of generated answers, in the order they are reported.
GENERATED_METRICS = ("em", "prefix_em", "f1", "official_em", "official_f1")


@dataclasses.dataclass(frozen=True)
class Gold:
  """What scoring one question needs of its record."""

  answer: str  # the reference's gold (em, prefix_em, f1), compared after `clean_text` as the reference does
  golds: tuple[str, ...]  # every gold answer (official_em, official_f1), as given
  id: str
  question: str

  @classmethod
  def of(cls, record: Any, index: int) -> "Gold":
    """From a gold string, or a record with `.answer` and optionally `.golds`, `.id`, `.question`."""
    if isinstance(record, str):
      return cls(record, (record,), str(index), "")
    golds = tuple(getattr(record, "golds", ()) or ()) or (record.answer,)
    return cls(record.answer, golds, getattr(record, "id", "") or str(index), getattr(record, "question", ""))


def question_scores(prediction: str, gold: Gold) -> dict[str, float]:
  """Every `GENERATED_METRICS` score of one (cleaned) prediction."""
  reference = clean_text(gold.answer)
  return dict(em=float(exact_match(prediction, reference)),
              prefix_em=float(prefix_exact_match(prediction, reference)), f1=f1(prediction, reference),
              official_em=float(official_exact_match(prediction, gold.golds)),
              official_f1=official_f1(prediction, gold.golds))


def evaluate_qa(graphdef: nnx.GraphDef, params: transformer.Params, cfg: ModelConfig, tokenizer,
                batches: Iterable[Batch], golds: Sequence[Any], decoding: str | None = "greedy",
                progress: bool = False, desc: str = "qa eval", return_predictions: bool = False,
                prefix_fn=None, **generate_kwargs) -> dict[str, Any]:
  """Answer NLL and (with a decoding) EM / prefix EM / F1 / official EM / official F1 over the valid rows.

  Args:
    graphdef, params, cfg: the model.
    tokenizer: its tokenizer.
    batches: QA batches, e.g. `Data.qa_eval_batches(split)` or `Stream.qa_batches(b)`.
    golds: one entry per question, indexed by qa_index_B: gold strings (then the one gold is also the
      official scores' only gold), or records with an `.answer` and optionally `.golds`, `.id` and
      `.question` (e.g. `pipeline.questions(docs)`).
    decoding: "greedy", "beam", or None to skip generation (then the generated metrics are NaN).
    progress: show a tqdm bar.
    desc: the bar's label.
    return_predictions: also return per-question scores and answers (below).
    prefix_fn: prefix_fn(batch) -> the `transformer.Prefix` that conditions the model on that batch's rows
      (MAC: aggregated from its memory bank per question); None = the model alone.
    **generate_kwargs: max_new_tokens, num_beams, num_groups, diversity_penalty (see `answer`).

  Returns:
    {"em", "prefix_em", "f1"}: means over the questions against the reference's gold;
    {"official_em", "official_f1"}: means of the official SQuAD v1.1 scores (best over all golds);
    "nll": token-weighted mean answer NLL (the reference's); "n": number of questions; "tokens": answer
    tokens scored. With `return_predictions`, also, one entry per question in qa_index order:
    "per_question": {metric: [float]} for every `GENERATED_METRICS` (NaN without decoding), "nll" (the
    question's mean answer-token NLL) and "tokens" (its answer tokens, the weights that recover "nll");
    "predictions": [{"index", "id", "question", "golds", "answer"}] ("answer" is None without decoding).
  """
  rows = []
  total = len(batches) if hasattr(batches, "__len__") else None
  for batch in tqdm.tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
    prefix = None if prefix_fn is None else prefix_fn(batch)
    rows += _score_batch(graphdef, params, cfg, tokenizer, batch, golds, decoding, generate_kwargs, prefix)
  rows.sort(key=lambda r: r["index"])
  result = _aggregate(rows, generated=decoding is not None)
  if return_predictions:
    result["per_question"] = {k: [r[k] for r in rows] for k in GENERATED_METRICS + ("nll", "tokens")}
    result["predictions"] = [{k: r[k] for k in ("index", "id", "question", "golds", "answer")} for r in rows]
  return result


def _score_batch(graphdef, params, cfg, tokenizer, batch: Batch, golds: Sequence[Any], decoding: str | None,
                 generate_kwargs, prefix=None) -> list[dict[str, Any]]:
  """One record per valid row: its question, answer NLL, and (with a decoding) answer and scores."""
  logp_B, count_B = (np.asarray(x, np.float64) for x in answer_logprobs(graphdef, params, batch, prefix))
  texts = None if decoding is None else answer(graphdef, params, cfg, tokenizer, batch, decoding,
                                               prefix=prefix, **generate_kwargs)
  rows = []
  for i in np.flatnonzero(np.asarray(batch["qa_valid_B"], bool)):
    index = int(batch["qa_index_B"][i])
    gold = Gold.of(golds[index], index)
    scores = (question_scores(texts[i], gold) if texts is not None
              else dict.fromkeys(GENERATED_METRICS, float("nan")))
    rows.append(dict(index=index, id=gold.id, question=gold.question, golds=list(gold.golds),
                     answer=None if texts is None else texts[i], logp=float(logp_B[i]),
                     tokens=float(count_B[i]), nll=-float(logp_B[i]) / max(float(count_B[i]), 1.0), **scores))
  return rows


def _aggregate(rows: Sequence[Mapping[str, Any]], generated: bool) -> dict[str, Any]:
  """Question means of the generated metrics (NaN without generation) and the token-weighted NLL."""
  n = len(rows)
  result = {k: (sum(r[k] for r in rows) / n if generated and n else float("nan")) for k in GENERATED_METRICS}
  count = sum(r["tokens"] for r in rows)
  return result | dict(nll=-sum(r["logp"] for r in rows) / max(count, 1.0), n=n, tokens=int(count))
