"""The interface every evaluation method implements (`Method`), what it is given (`Context`), how its answers
are scored (`score`), and the registry of methods by the name `eval.methods` lists.

A new method is one `Method` subclass and one `register` line (see `camels_jax.evaluation.methods` for the
built-in ones); the protocol (`camels_jax.evaluation.run`) and `camels_jax.report` need nothing else.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import ml_collections
import numpy as np
from absl import logging

from camels_jax import qa
from camels_jax.data import pipeline
from camels_jax.models import loading

# Test metrics that get a bootstrap interval and a paired comparison with uniform: one value per question.
CI_METRICS = qa.GENERATED_METRICS

WeightFn = Callable[[pipeline.TokenizedDoc, int], np.ndarray]  # (document, L) -> w_L, 0 past the document
OnDoc = Callable[[int, Any], None]  # on_doc(i, state) after document i of a stream


@dataclasses.dataclass(frozen=True)
class Context:
  """What every method's evaluation needs: the model, the QA-tuned params, the data, the settings."""

  config: ml_collections.ConfigDict  # the whole job config
  model: loading.Loaded
  params: Any  # QA-tuned base params
  data: Any  # camels_jax.data.Data
  workdir: str
  progress: bool = True  # progress bars
  say: Callable[[str], None] = logging.info  # phase lines (an entry point passes one that also prints)
  # `score`s of `params` themselves by (decoding, documents): every method that no adaptation won (lr 0)
  # answers with the QA-tuned params, so its test stream reuses the no-adaptation scores.
  unadapted: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  @property
  def ec(self) -> ml_collections.ConfigDict:
    return self.config.eval


def generate_kwargs(ec, decoding) -> dict:
  """`qa.evaluate_qa`'s decoding arguments from the `eval` section."""
  kw = dict(max_new_tokens=ec.max_new_tokens)
  if decoding == "beam":
    kw |= dict(num_beams=ec.num_beams, num_groups=ec.num_groups, diversity_penalty=ec.diversity_penalty)
  return kw


def score(ctx: Context, params, docs, decoding: str, desc: str, prefix_fn=None, spec=None) -> dict:
  """QA metrics of `params` (conditioned by `prefix_fn`, see `qa.evaluate_qa`) on every question about
  `docs` (batched by `spec`, default the data's), with the per-question scores and answers.

  `qa.evaluate_qa`'s result with `return_predictions`: the aggregates plus "per_question" and
  "predictions" (see `summary` for the aggregates alone). The QA-tuned params themselves (`ctx.params`, no
  prefix, the data's batching) are scored once per decoding and documents (`Context.unadapted`).
  """
  key = None
  if params is ctx.params and prefix_fn is None and spec is None:
    key = (decoding, tuple(d.doc.id for d in docs))
    if key in ctx.unadapted:
      return dict(ctx.unadapted[key])
  batches = list(pipeline.qa_eval_batches(docs, spec or ctx.data.spec, ctx.data.pad_id, ctx.ec.batch_size))
  scores = qa.evaluate_qa(ctx.model.graphdef, params, ctx.model.cfg, ctx.model.tokenizer, batches,
                          pipeline.questions(docs), decoding, progress=ctx.progress, desc=desc,
                          return_predictions=True, prefix_fn=prefix_fn, **generate_kwargs(ctx.ec, decoding))
  if key is not None:
    ctx.unadapted[key] = scores
  return dict(scores)


def pad(x, length: int) -> np.ndarray:
  """`x` cut or zero-padded to `length`."""
  return np.pad(np.asarray(x)[:length], (0, max(0, length - len(x))))


def summary(scores: dict) -> dict:
  """The aggregate metrics of a `score` result (what results.json keeps; the per-question lists go to
  eval/predictions/)."""
  return {k: v for k, v in scores.items() if k not in ("per_question", "predictions")}


# ------------------------------------------------------------------------------------------------
# The method interface.


class Method:
  """An evaluation method: what it adapts on a document stream, and how it answers afterwards.

  A new method is one subclass (a `name`, an `adapt`, and whichever defaults it changes) and one `register`
  line; `run` and `camels_jax.report` need nothing else. The state a method carries along a stream is its
  own (adapted params for the gradient methods, a memory bank for MAC); the defaults treat it as base-model
  params.
  """

  name: str  # what eval.methods lists (set by each subclass, or a field of a dataclass subclass)
  post_phase: ClassVar[str | None] = None  # the clock phase of `post_stream`; None: no step after the stream
  versus: ClassVar[tuple[str, ...]] = ()  # methods it also gets a paired interval against, when they ran

  @property
  def adaptation(self) -> str:
    """What it adapts, and how: methods with the same adaptation reach the same state on a stream at an
    lr (and give the same token weights), so a later one reuses the earlier one's adapted test stream."""
    return self.name

  def require(self, config: ml_collections.ConfigDict, workdir: str) -> None:
    """Raises `checks.UserError` when the method cannot run with this config and workdir (before anything
    loads: e.g. no trained model)."""
    del config, workdir

  def prepare(self, ctx: Context, test_docs) -> "Method":
    """This method with what it loads once per evaluation (weights, trained networks), compiled where its
    adaptation time would otherwise include compiling."""
    del ctx, test_docs
    return self

  def lrs(self, ec: ml_collections.ConfigDict, chosen: Mapping[str, float]) -> tuple[float, ...]:
    """The learning rates to sweep on the validation stream (one: no sweep; none: the method has no lr),
    given the lr each method evaluated before it chose."""
    del ec, chosen
    return ()

  def adapt(self, ctx: Context, docs, lr: float | None, on_doc: OnDoc | None = None, desc: str = "adapt"):
    """The state after reading `docs` in order at `lr`, calling on_doc(i, state) after document i."""
    raise NotImplementedError

  def post_stream(self, ctx: Context, state):
    """The state after the step that follows the stream (`post_phase`); by default there is none."""
    del ctx
    return state

  def answer(self, ctx: Context, state, docs, decoding: str, desc: str) -> dict:
    """The `score` of every question about `docs` answered from `state`."""
    return score(ctx, state, docs, decoding, desc)

  def token_weights(self, ctx: Context, d) -> np.ndarray | None:
    """w_N of document `d`'s tokens as the method weighs them, or None (it weighs no tokens)."""
    del ctx, d
    return None

  def controls(self, ctx: Context, state, test_docs) -> dict[str, dict]:
    """{name: `score`} of the test questions answered from states that take away what the method's own
    state should contribute (MAC: a bank of as many documents, none of them the test stream's), each
    compared question by question with the method's test score; by default none."""
    del ctx, state, test_docs
    return {}

  def record(self, ctx: Context, state, test_docs) -> dict:
    """Fields of the method's results beside the protocol's ("memory_bytes", MAC's "bank"), from its state
    after the test stream (and whatever it keeps of that state)."""
    del ctx, state, test_docs
    return {}


REGISTRY: dict[str, Method] = {}  # eval.methods name -> Method


def register(method: Method) -> Method:
  """Adds `method` to `REGISTRY` under its name; returns it."""
  if not method.name or method.name in REGISTRY:
    raise ValueError(f"register: {method.name!r} is empty or already registered ({sorted(REGISTRY)})")
  REGISTRY[method.name] = method
  return method


def method_names(ec: ml_collections.ConfigDict) -> list[str]:
  """The methods `eval.methods` lists, in its order."""
  return [m.strip() for m in ec.methods.split(",") if m.strip()]
