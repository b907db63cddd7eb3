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
  which compares the normalised prediction cut to the normalised gold's length.
"""

import collections
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
def _answer_logprobs(graphdef, params, batch):
  tokens_BxS, mask_BxS, loss_mask_BxS = _qa_arrays(batch)
  nll_B, count_B = _answer_nll_B(transformer.apply(graphdef, params, tokens_BxS, mask_BxS), tokens_BxS,
                                 loss_mask_BxS)
  return -nll_B, count_B


@functools.partial(jax.jit, static_argnums=0)
def _qa_nll(graphdef, params, batch):
  tokens_BxS, mask_BxS, loss_mask_BxS = _qa_arrays(batch)
  return loss.answer_nll(transformer.apply(graphdef, params, tokens_BxS, mask_BxS), tokens_BxS,
                         loss_mask_BxS)


def answer_logprobs(graphdef: nnx.GraphDef, params: transformer.Params, batch: Batch):
  """Per-row answer log-likelihood and answer length (jitted).

  Args:
    graphdef, params: the model.
    batch: a QA batch (qa_tokens_BxS, qa_mask_BxS, qa_loss_mask_BxS, qa_valid_B are read).

  Returns:
    (logp_B, count_B): the summed log-probability of each row's answer tokens and EOS, and their
    number; both 0 on invalid rows.
  """
  return _answer_logprobs(graphdef, params, _device_batch(batch))


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
  one). The width P is the longest prompt rounded up to `multiple` (at most S), so the jitted decoders
  compile for a few widths only. Invalid rows get a one-token prompt (EOS), so no row is empty.

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
  p = min(s, -(-int(len_B.max()) // multiple) * multiple)
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
             num_groups: int = 4, diversity_penalty: float = 10.0) -> decoding_lib.Decoded:
  """Generated ids (after the prompt) for every row of a QA batch; see `answer`."""
  prompt_BxP, mask_BxP = prompts(batch, tokenizer.pad_id, tokenizer.eos_id)
  if decoding == "greedy":
    return decoding_lib.greedy(graphdef, params, prompt_BxP, mask_BxP, cfg=cfg,
                               max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id)
  if decoding == "beam":
    return decoding_lib.diverse_beam_search(
        graphdef, params, prompt_BxP, mask_BxP, cfg=cfg, max_new_tokens=max_new_tokens,
        eos_id=tokenizer.eos_id, num_beams=num_beams, num_groups=num_groups,
        diversity_penalty=float(diversity_penalty))
  raise ValueError(f"decoding={decoding!r} is not one of {DECODINGS}")


def answer(graphdef: nnx.GraphDef, params: transformer.Params, cfg: ModelConfig, tokenizer,
           batch: Batch, decoding: str = "greedy", max_new_tokens: int = 16, num_beams: int = 12,
           num_groups: int = 4, diversity_penalty: float = 10.0) -> list[str]:
  """The model's answer to every question of a QA batch.

  Args:
    graphdef, params, cfg: the model.
    tokenizer: its tokenizer (eos_id ends an answer, pad_id pads the prompts).
    batch: a QA batch (qa_tokens_BxS, qa_prompt_len_B, qa_valid_B).
    decoding: "greedy" (the reference's QA-tuning validation) or "beam" (diverse beam search, the
      reference's final evaluation).
    max_new_tokens: generation budget (reference: 16).
    num_beams, num_groups, diversity_penalty: diverse beam search settings (reference: 12, 4, 10.0).

  Returns:
    B answer strings; "" for invalid rows.
  """
  out = generate(graphdef, params, cfg, tokenizer, batch, decoding, max_new_tokens, num_beams, num_groups,
                 diversity_penalty)
  tokens_BxT = np.asarray(out.tokens_BxT)
  valid_B = np.asarray(batch["qa_valid_B"], bool)
  return [answer_text(tokenizer, row, tokenizer.eos_id) if ok else "" for row, ok in zip(tokens_BxT, valid_B)]


# ------------------------------------------------------------------------------------------------
# Evaluation.


def _gold_text(gold: Any) -> str:
  return clean_text(gold if isinstance(gold, str) else gold.answer)


def evaluate_qa(graphdef: nnx.GraphDef, params: transformer.Params, cfg: ModelConfig, tokenizer,
                batches: Iterable[Batch], golds: Sequence[Any], decoding: str | None = "greedy",
                progress: bool = False, desc: str = "qa eval", return_predictions: bool = False,
                **generate_kwargs) -> dict[str, Any]:
  """Answer NLL and (with a decoding) EM / prefix EM / F1 over the valid rows of `batches`.

  Args:
    graphdef, params, cfg: the model.
    tokenizer: its tokenizer.
    batches: QA batches, e.g. `Data.qa_eval_batches(split)` or `Stream.qa_batches(b)`.
    golds: gold answers indexed by qa_index_B: strings, or records with an `.answer` (e.g.
      `pipeline.questions(docs)`).
    decoding: "greedy", "beam", or None to skip generation (then em, prefix_em and f1 are NaN).
    progress: show a tqdm bar.
    desc: the bar's label.
    return_predictions: also return {"predictions": {qa_index: answer}}.
    **generate_kwargs: max_new_tokens, num_beams, num_groups, diversity_penalty (see `answer`).

  Returns:
    {"em", "prefix_em", "f1"}: means over the questions; "nll": token-weighted mean answer NLL (the
    reference's); "n": number of questions; "tokens": answer tokens scored.
  """
  nll_sum, count, n = 0.0, 0.0, 0
  em, prefix_em, f1_sum = 0.0, 0.0, 0.0
  predictions = {}
  total = len(batches) if hasattr(batches, "__len__") else None
  for batch in tqdm.tqdm(batches, desc=desc, total=total, disable=not progress, leave=False):
    s, c = qa_nll(graphdef, params, batch)
    nll_sum, count = nll_sum + float(s), count + float(c)
    valid_B = np.asarray(batch["qa_valid_B"], bool)
    n += int(valid_B.sum())
    if decoding is None:
      continue
    texts = answer(graphdef, params, cfg, tokenizer, batch, decoding, **generate_kwargs)
    for i in np.flatnonzero(valid_B):
      index = int(batch["qa_index_B"][i])
      gold = _gold_text(golds[index])
      em += exact_match(texts[i], gold)
      prefix_em += prefix_exact_match(texts[i], gold)
      f1_sum += f1(texts[i], gold)
      predictions[index] = texts[i]
  gen = decoding is not None and n > 0
  result = dict(em=em / n if gen else float("nan"), prefix_em=prefix_em / n if gen else float("nan"),
                f1=f1_sum / n if gen else float("nan"), nll=nll_sum / max(count, 1.0), n=n, tokens=int(count))
  if return_predictions:
    result["predictions"] = predictions
  return result

