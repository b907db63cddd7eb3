"""Dynamic evaluation's optimiser, learning rate and decay, selected on validation articles, never on the test.

A text's articles are split three ways, whole articles only (`text.split_three`): the last `heldout_fraction`
are the test articles, the `val_fraction` before them the validation articles, and the rest training
articles, which only optimizer "rms" reads (its gradient statistics, `dynamic_eval.gradient_rms`). Every
candidate of the grid (each optimizer with each of its learning rates, and "rms" with each decay) runs
dynamic evaluation over the first `val_tokens` validation tokens, segmented as the job's `dynamic` section
says; the lowest mean NLL wins. A winner whose learning rate is the first or last of its optimizer's grid,
or whose decay is the largest of the grid (the grid did not bracket the best), is flagged in `edge`; each
optimizer's own best is reported with its own flags (`optimizer_bests`), so a loser that was not bracketed
shows.
`select` is given the training and validation tokens only, so the test articles cannot sway it.
"""

import dataclasses

import ml_collections
from absl import logging
import numpy as np
import tqdm

from camels_jax import checks, stats
from camels_jax.data import text
from camels_jax.methods import dynamic_eval


def sweep_config() -> ml_collections.ConfigDict:
  """The `sweep` section of a perplexity job."""
  return ml_collections.ConfigDict(dict(
      enabled=False,  # select dynamic.optimizer, lr and decay on validation articles, then score the test ones
      optimizers="sgd,adam,rms",  # optimizers tried (comma-separated subset of sgd, adam, rms)
      # The grids bracket each optimizer's own best for SmolLM2 on WikiText-2 (overlap 512/256, validation ppl):
      # SGD 1e-2 (23.46), Adam 1e-4 (21.50), RMS 3e-5 (22.87; 1e-5 gives 24.05, 1e-4 30.96).
      sgd_lrs=(3e-3, 1e-2, 3e-2),  # learning rates tried with SGD, increasing
      adam_lrs=(3e-5, 1e-4, 3e-4, 1e-3),  # ... with Adam
      rms_lrs=(1e-5, 3e-5, 1e-4, 3e-4),  # ... with rms (each with every decay below)
      rms_decays=(0.0, 1e-2),  # decays tried with rms, increasing, >= 0
      val_fraction=0.1,  # validation articles: this fraction of all, just before the test articles, in (0, 1)
      heldout_fraction=0.1,  # test articles: the last fraction of the articles, in (0, 1)
      val_tokens=4096,  # validation tokens each candidate is scored on, >= 2 (0 = all)
  ))


RULES = {
    "enabled": checks.boolean,
    "optimizers": checks.subset_of(*dynamic_eval.OPTIMIZERS),
    "sgd_lrs": checks.increasing(checks.positive),
    "adam_lrs": checks.increasing(checks.positive),
    "rms_lrs": checks.increasing(checks.positive),
    "rms_decays": checks.increasing(checks.non_negative),
    "val_fraction": checks.between(0, 1),
    "heldout_fraction": checks.between(0, 1),
    "val_tokens": checks.count_or_zero,
}


CROSS = text.CROSS  # the same fractions as a text section's


@dataclasses.dataclass(frozen=True)
class Candidate:
  optimizer: str
  lr: float
  decay: float = 0.0

  def section(self, c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`c` (a `dynamic` section) with this candidate's optimizer, lr and decay."""
    out = ml_collections.ConfigDict(c.to_dict())
    out.update(optimizer=self.optimizer, lr=float(self.lr), decay=float(self.decay))
    return out


def candidates(s: ml_collections.ConfigDict) -> list[Candidate]:
  out = []
  for opt in s.optimizers.split(","):
    if opt == "rms":
      out += [Candidate("rms", lr, d) for d in s.rms_decays for lr in s.rms_lrs]
    else:
      out += [Candidate(opt, lr) for lr in s[f"{opt}_lrs"]]
  return out


def edges(best: Candidate, s: ml_collections.ConfigDict) -> list[str]:
  """What of the winner sits on the edge of its grid (a grid of one value is a fixed setting, never an edge)."""
  found = []
  lrs = list(s[f"{best.optimizer}_lrs"])
  if len(lrs) > 1 and best.lr in (lrs[0], lrs[-1]):
    found.append(f"{best.optimizer} lr {best.lr:g} is the {'smallest' if best.lr == lrs[0] else 'largest'} of "
                 f"{lrs}")
  decays = list(s.rms_decays)
  if best.optimizer == "rms" and len(decays) > 1 and best.decay == decays[-1]:
    found.append(f"rms decay {best.decay:g} is the largest of {decays}")
  return found


def optimizer_bests(rows: list[dict], s: ml_collections.ConfigDict) -> list[dict]:
  """Each swept optimizer's best candidate (by validation NLL) with its own edge flags: a loser whose best
  sits on its grid's edge was not given its best chance."""
  out = []
  for opt in s.optimizers.split(","):
    mine = [r for r in rows if r["optimizer"] == opt and r["val_nll"] is not None]
    if not mine:
      out.append({"optimizer": opt, "val_ppl": None, "edge": ["every candidate diverged"]})
      continue
    b = min(mine, key=lambda r: r["val_nll"])
    out.append({"optimizer": opt, "lr": b["lr"], "decay": b["decay"], "val_ppl": b["val_ppl"],
                "edge": edges(Candidate(opt, b["lr"], b["decay"]), s)})
  return out


def select(graphdef, params, cfg, c: ml_collections.ConfigDict, s: ml_collections.ConfigDict,
           train_ids, val_ids, progress: bool = True) -> tuple[dict, object]:
  """(report, rms): every candidate's validation score, the winner and its edge flags; and optimizer rms's
  gradient statistics on `train_ids` (None when rms is not swept), for scoring the test articles."""
  checks.validate_section("sweep", s, RULES, CROSS)
  val_ids = list(val_ids)[:s.val_tokens or None]
  rms = None
  if "rms" in s.optimizers.split(","):
    rms = dynamic_eval.gradient_rms(graphdef, params, cfg, train_ids, c, progress=progress)
  static = dynamic_eval.evaluate(graphdef, params, cfg, val_ids, c, dynamic=False, progress=False)
  rows, best, best_nll = [], None, np.inf
  for cand in tqdm.tqdm(candidates(s), desc="sweep", disable=not progress):
    r = dynamic_eval.evaluate(graphdef, params, cfg, val_ids, cand.section(c), dynamic=True, progress=False,
                              rms=rms)
    # A diverged candidate's NLL is stored as null: results files are strict JSON.
    rows.append(dataclasses.asdict(cand) | {"val_nll": stats.finite_or_none(r["nll"]),
                                            "val_ppl": stats.finite_or_none(r["ppl"]), "time_s": r["time_s"]})
    logging.info("sweep: %s lr %g decay %g: validation ppl %.4f", cand.optimizer, cand.lr, cand.decay, r["ppl"])
    if np.isfinite(r["nll"]) and r["nll"] < best_nll:
      best, best_nll = cand, r["nll"]
  if best is None:
    raise checks.UserError("sweep: every candidate's validation NLL is NaN or infinite; try smaller lrs")
  report = {"static_val_nll": static["nll"], "static_val_ppl": static["ppl"], "val_tokens": len(val_ids),
            "candidates": rows, "selected": dataclasses.asdict(best), "edge": edges(best, s),
            "optimizer_bests": optimizer_bests(rows, s)}
  return report, rms
