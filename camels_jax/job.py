"""The job schema the entry points share: what a train / evaluate job config holds and needs.

The entry points (`train`, `evaluate`) read their config through this module and nothing else of each other:
every field's valid range (`RULES`, each section's rules from the module that builds it), the checks between
fields (`CROSS`), the fields a rerun in the same workdir may change (`SAFE_ON_RESUME`), the checks that need a
loaded model (`check_model_fits`), the files a job reads (`check_sources`, `check_eval_sources`: before any
model is loaded, paths of the wrong kind included), and the base model the jobs after QA-tuning train on
(`base_params`, through `qa_tune.tuned_params` / `qa_tune.load_tuned`).
"""

import os
from collections.abc import Callable

import ml_collections
from absl import logging

from camels_jax import checks, evaluation, qa_tune, sharding
from camels_jax import data as data_lib
from camels_jax.data import config as data_config
from camels_jax.data import text as text_lib
from camels_jax.methods import camels, fwl, mac
from camels_jax.models import loading

JOBS = ("qa_tune", "camels", "mac", "fwl")
QA_JOBS = ("qa_tune", "camels", "mac")  # the jobs that read the QA dataset (`data`)
ON_QA_TUNED = ("camels", "mac")  # the jobs that train on the QA-tuned base model

# Every field of a train / evaluate job config with its valid range (each section's RULES sits beside the
# function that builds it), and the checks between fields: all run before a model or dataset is loaded.
RULES = {
    "workdir": checks.nonempty_string,
    "jobs": checks.subset_of(*JOBS),
    "model": loading.RULES,
    "data": data_config.RULES,
    "qa_tune": qa_tune.RULES,
    "camels": camels.RULES,
    "eval": evaluation.RULES,
    "text": text_lib.RULES,
    "fwl": fwl.RULES,
    "mac": mac.RULES,
    "mesh": sharding.RULES,
}

# Fields a rerun in the same workdir may change (fnmatch patterns): more meta-training steps, how often
# and on what it validates, and anything evaluation-only. The rest would mix two experiments in one workdir.
SAFE_ON_RESUME = ("camels.steps", "camels.val_every", "camels.val_batches", "camels.compare", "camels.compare_octaves",
                  "camels.compare_batches", "camels.compare_docs", "camels.remat", "qa_tune.log_every", "model.remat",
                  "mesh.fsdp", "model.remat_policy", "eval.*", "fwl.steps", "fwl.val_every", "fwl.patience",
                  "mac.steps", "mac.val_every", "mac.val_docs")
# Fields added after workdirs were trained, with the value that behaves as the code before them: a workdir
# whose config.json lacks one resumes (and evaluates) when the config keeps that value.
INTRODUCED = {"camels.precond_docs": 0, "camels.precond_eps": 1e-8, "camels.compare_docs": 0, "mac.train_docs": 0,
              "fwl.fast_weights": True, "mac.contrast": 0.0, "mac.contrast_margin": 0.5,
              "mac.retrieve": 0.0, "mac.val_docs": 0, "mac.retrieve_steps": 0, "mac.retrieve_lr": 1e-3,
              "mac.reconstruct": 0.0}


def jobs_of(config: ml_collections.ConfigDict) -> list[str]:
  """The configured jobs, in order (`config.jobs`, comma-separated)."""
  return [j.strip() for j in config.jobs.split(",") if j.strip()]


# ------------------------------------------------------------------------------------------------
# Checks between fields, and against the loaded model.


def _has(c, *sections) -> bool:
  return all(name in c for name in sections)


def _too_long(c, max_len: int, limit: str, at: str = "") -> list[str]:
  if not _has(c, "data"):
    return []
  lengths = {"data.doc_buckets": max(c.data.doc_buckets), "data.qa_len": c.data.qa_len, "data.loc_len": c.data.loc_len}
  return [f"{at}{key} reaches {n} tokens, more than {limit}={max_len}" for key, n in lengths.items() if n > max_len]


def _fits_random_model(c, at=""):
  """Sequences must fit a random model's positions (a loaded model's are checked by `check_model_fits`)."""
  return _too_long(c, c.model.random.max_len, f"{at}model.random.max_len", at) if c.model.source == "random" else []


def check_model_fits(config: ml_collections.ConfigDict, cfg) -> None:
  """Once a model is loaded: every sequence the data section asks for fits its context (one ConfigError)."""
  found = _too_long(config, cfg.max_len, f"the context of {config.model.source}")
  if found:
    raise checks.ConfigError("config: " + "; ".join(found))


def _padded_lens(c, at=""):
  """A "padded" loss divides by padded_len - 1: 0 (the longest bucket) or at least the longest document."""
  if not _has(c, "data", "camels", "eval"):
    return []
  longest = max(c.data.doc_buckets)
  return [f"{at}{key}={n} must be 0 or >= the longest of {at}data.doc_buckets={tuple(c.data.doc_buckets)}"
          for key, n in (("camels.padded_len", c.camels.padded_len),
                         ("eval.online.padded_len", c.eval.online.padded_len)) if 0 < n < longest]


def _qa_tune_splits(c, at=""):
  if not _has(c, "data", "qa_tune"):
    return []
  return [f"{at}qa_tune.{key}={c.qa_tune[key]!r} is not a split; expected one of {', '.join(c.data.split_sizes)}"
          for key in ("train_split", "val_split") if c.qa_tune[key] not in c.data.split_sizes]


def _mac_train_docs(c, at=""):
  if not _has(c, "mac", "data") or not c.mac.train_docs or c.data.dataset == "generated":
    return []
  return [f"{at}mac.train_docs={c.mac.train_docs} needs {at}data.dataset='generated' (only generated documents "
          f"come in any number); 0 trains on the meta_train split"]


def _weighting_layers(c, at=""):
  if not _has(c, "camels"):
    return []
  w = c.camels.weighting
  if c.model.source == "random" and w.backbone == "base" and w.base_layers > c.model.random.n_layers:
    return [f"{at}camels.weighting.base_layers={w.base_layers} exceeds the base model's "
            f"{at}model.random.n_layers={c.model.random.n_layers}"]
  return []


CROSS = (checks.within("model", loading.CROSS) + checks.within("data", data_config.CROSS)
         + checks.within("qa_tune", qa_tune.CROSS) + checks.within("camels", camels.CROSS)
         + checks.within("eval", evaluation.CROSS) + checks.within("text", text_lib.CROSS)
         + [_fits_random_model, _padded_lens, _qa_tune_splits, _weighting_layers, _mac_train_docs])


# ------------------------------------------------------------------------------------------------
# Prerequisites: the files a job reads, checked before anything is loaded.


class PathKindError(checks.UserError):
  """A path of the wrong kind: a directory where a file is expected, or a file where a directory is."""


def expect_file(path: str, what: str) -> None:
  """Raises `PathKindError` when `path` is a directory (a missing file is the reader's to report)."""
  if path and os.path.isdir(path):
    raise PathKindError(f"{path}: is a directory, where a file is expected ({what}); give the path of a file")


def expect_dir(path: str, what: str) -> None:
  """Raises `PathKindError` when `path` is a file (a missing directory is created by whoever writes it)."""
  if path and os.path.exists(path) and not os.path.isdir(path):
    raise PathKindError(f"{path}: is a file, where a directory is expected ({what}); give a directory, or move "
                        f"the file away")


def _check_data_paths(config: ml_collections.ConfigDict) -> None:
  c = config.data
  if c.dataset == "squad":
    for p in c.path.split(","):
      expect_file(p.strip(), "data.path (a SQuAD JSON file)")
  expect_file(c.loc_path, "data.loc_path (a locality text or CSV file)")
  expect_dir(c.data_dir, "data.data_dir (where the prepared datasets go)")


def check_sources(config: ml_collections.ConfigDict, workdir: str = "") -> None:
  """The train job's prerequisites: the files the configured jobs read exist, are files, and are not empty
  (before anything is loaded)."""
  del workdir
  jobs = set(jobs_of(config))
  if jobs & set(QA_JOBS):
    _check_data_paths(config)
    data_lib.check_sources(config.data)
  if "fwl" in jobs and config.text.text_file:
    expect_file(config.text.text_file, "text.text_file")
    text_lib.read_text(config.text.text_file)


def check_eval_sources(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The evaluate job's prerequisites: its data, and what each configured method needs from the train job."""
  _check_data_paths(config)
  evaluation.check_prerequisites(config, workdir)


# ------------------------------------------------------------------------------------------------
# The base model the jobs train on.


def base_params(config: ml_collections.ConfigDict, model: loading.Loaded, data, workdir: str, writer,
                progress: bool = True, say: Callable[[str], None] = logging.info):
  """(params, name, QA-tuning history or None) of the base model the configured jobs train on.

  With qa_tune among the jobs: the QA-tuned params (`qa_tune.tuned_params`: loaded when a QA-tuning
  finished in `workdir`, else trained). Without it, meta-training (or MAC) alone continues the experiment in
  this workdir: it trains on the QA-tuned model the qa_tune job left here, as `jobs=qa_tune,camels` would,
  never silently the raw base model (it says so when there is none).
  """
  jobs = jobs_of(config)
  if "qa_tune" in jobs:
    params, history = qa_tune.tuned_params(config, model, data, workdir, writer, progress=progress, say=say)
    return params, "qa_tuned", history
  if not set(jobs) & set(ON_QA_TUNED):
    return model.params, "raw", None
  found = qa_tune.load_tuned(model, workdir)
  if found is not None:
    return found[0], "qa_tuned", None
  where = os.path.join(workdir, qa_tune.TUNED)
  logging.warning("no finished QA-tuning in %s", where)
  say(f"{'/'.join(j for j in jobs if j in ON_QA_TUNED)}: no finished QA-tuning in {where}: training on the raw "
      f"base model (add qa_tune to config.jobs to QA-tune it first, as the reference does)")
  return model.params, "raw", None
