"""The `eval` section of a job config, importable without the evaluation itself.

Config files (configs/*.py) build their sections from light modules; `camels_jax.evaluation` (the protocol,
its method registry and `RULES`, which check `methods` against that registry) imports this builder.
"""

import ml_collections

from camels_jax.adapt import online


def eval_config() -> ml_collections.ConfigDict:
  """The `eval` section of a job config."""
  return ml_collections.ConfigDict(dict(
      methods="uniform,ssm,tfidf,camels,oracle,uniform+qa_lt",  # comma-separated names of REGISTRY (also: mac)
      lrs=(1e-4, 2.5e-5, 6.25e-6, 1.5625e-6),  # Adam lrs (each > 0) swept per method (reference README)
      # Each time the pick is the grid's largest (smallest) lr, one more lr 4x above (below) it is tried, at
      # most this many times (>= 0); a pick still on the edge is flagged ("lr_edge" in results.json).
      widen=2,
      # "No adaptation" (lr 0) is a candidate of every sweep: a method every lr harms is not reported at a
      # harmful lr.
      no_adaptation_candidate=True,
      # "grid": validate every lr (the reference). "ascending": from the smallest lr up, stopping at the first
      # that scores worse than the one below it (assumes one best lr; a method every lr harms costs one stream).
      sweep="grid",
      val_docs=8,  # documents (>= 1) of the validation stream (meta-val split) used to pick each method's lr
      # Decoding of the validation answers: "greedy" (cheaper than the test's), "beam" (as the test), or "" (none:
      # answer NLL only, for select="nll"; a validation stream as long as the test stream then costs its
      # updates and one forward pass per question, not a generation).
      val_decoding="greedy",
      decoding="beam",  # test decoding: "beam" (reference: 12 beams, 4 groups, penalty 10) or "greedy"
      # Diverse beam search (reference); num_beams a multiple of num_groups, diversity_penalty >= 0.
      num_beams=12, num_groups=4, diversity_penalty=10.0,
      max_new_tokens=16,  # answer budget (reference: 16)
      batch_size=16,  # questions per scoring / generation batch (one shape; larger did not help on 2 cores)
      curve_points=4,  # points (>= 1) along the test stream where F1 on the documents seen so far is measured
      retention_docs=4,  # first documents (>= 1) whose questions are scored right after them and at the end
      heatmap_docs=3,  # documents (>= 1) drawn in the token-weight heatmaps
      # How each method's lr is picked on the validation stream (SELECT_RULES). "nll": lowest answer NLL,
      # smooth and fed by every answer token, so it still ranks the lrs when a few validation questions (the
      # CPU default has 9) leave their F1 tied; "f1": highest F1, ties to prefix EM (the earlier rule).
      select="nll",
      # Intervals over questions (camels_jax.stats): resamples >= 1, level in (0, 1).
      bootstrap=dict(resamples=2000, level=0.95, seed=0),
      tfidf_min_threshold=0.0,  # TF-IDF weights below this (>= 0) are set to 0 (reference: 0)
      # uniform+qa_lt (reference): lr > 0, the others >= 1 (as qa_tune's fields of the same names).
      light_tune=dict(lr=2.5e-5, patience=3, val_every=16, max_steps=200),
      online=online.online_config(),  # adaptation optimiser (lr is swept)
      # The meta-objective on the test documents (`meta_objective` in results.json, with eval.methods=camels):
      # each document's weighted inner SGD step from the reset QA-tuned model, then its own questions; the
      # learned weights against these fixed weightings (mean-matched), at 2^-k .. 2^k times the learned step.
      meta_objective="uniform,ssm,tfidf,oracle",  # subset of uniform,ssm,tfidf,oracle; "" = not measured
      meta_objective_octaves=1,  # k >= 0 of that step grid
      meta_objective_docs=0,  # on the first this many test documents (>= 0; 0 = every one)
      # Questions by the position of their document in the test stream: this many equal parts (>= 1), each
      # with the answer-NLL change against no adaptation (early documents: forgetting; late: never learned).
      position_parts=2,
      open_book=True,  # score the open-book ceiling: the QA-tuned model with each question's document in its prompt
      open_book_docs=0,  # on the first this many test documents (>= 0; 0 = every one): its prompts are long
      # retrieval and mac+retrieval (camels_jax/methods/retrieval.py): the k (>= 1) documents ranked highest for
      # each question, put in its prompt (retrieval) or kept in MAC's bank (mac+retrieval); a prompt holds at most
      # max_len tokens (>= 0; 0 = the model's positions less max_new_tokens), its context cut from the end.
      retrieval=dict(k=1, max_len=0),
      # MAC's bank against its size (with eval.methods=mac): the test questions answered again with this many
      # distractor documents mixed into the stream's bank at seeded positions (increasing counts >= 1; () = not
      # measured). Generated data: question-free documents of its "loc" split past the locality texts; other
      # datasets: documents of meta-val, QA-val and QA-train (evaluation.methods.distractor_docs).
      mac_distractors=(),
  ))
