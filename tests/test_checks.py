"""Config checks: every shipped field has a range, every range is enforced, shipped configs pass, and every
violation (field or cross-field) is reported at once, by its full dotted key. Pure Python: no model loads."""

import glob
import os

import ml_collections
import pytest

from camels_jax import checks, eval_config, evaluation, job, perplexity, qa_tune
from camels_jax.methods import camels
from tests.tiny_config import REPO, load_config

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py")))


def _job(config):
  """(rules, cross) of the entry point that reads `config`: train / evaluate, or perplexity."""
  return (job.RULES, job.CROSS) if "jobs" in config else (perplexity.RULES, perplexity.CROSS)


def _loose(config) -> ml_collections.ConfigDict:
  """A copy whose fields take values of any type (a bad value may be a string where a number belongs)."""
  return ml_collections.ConfigDict(config.to_dict(), type_safe=False)


def _set(config, path: str, value):
  *parents, key = path.split(".")
  for p in parents:
    config = config[p]
  config[key] = value


def _keys(found: list[str]) -> list[str]:
  return [m.split("=", 1)[0] for m in found]


_LOADED = {name: load_config(name) for name in CONFIGS}


def test_every_shipped_config_is_found():
  assert {"default", "camels_squad", "camels_squad_cpu", "ppl_smollm2", "tiny"} <= set(CONFIGS)


@pytest.mark.parametrize("name,key", [(n, k) for n, c in _LOADED.items() for k in checks.leaves(c)])
def test_every_field_has_a_rule(name, key):
  # A new field needs its range next to its definition (a section's RULES), or this fails.
  rules, _ = _job(_LOADED[name])
  assert key in checks.flat_rules(rules), f"configs/{name}.py: {key} has no rule"


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_pass_as_they_are(name):
  config = _LOADED[name]
  checks.validate(config, *_job(config), where=f"configs/{name}.py")


def _holder(path: str) -> str:
  """A train config with the section of `path` (the CaMeLS configs have no text / fwl sections)."""
  return "tiny" if path.split(".")[0] in _LOADED["tiny"] else "fwl_small"


_BAD = ([(_holder(path), path, rule) for path, rule in checks.flat_rules(job.RULES).items()]
        + [("ppl_smollm2", path, rule) for path, rule in checks.flat_rules(perplexity.RULES).items()])


@pytest.mark.parametrize("name,path,rule", _BAD, ids=[f"{n}:{p}" for n, p, _ in _BAD])
def test_a_value_out_of_range_is_reported_under_its_key(name, path, rule):
  assert not rule(rule.bad_example), f"{path}: the rule accepts its own bad example {rule.bad_example!r}"
  config = _loose(_LOADED[name])
  _set(config, path, rule.bad_example)  # also adds an optional field (model.random.norm_eps) the config lacks
  found = checks.violations(config, *_job(config))
  assert _keys(found) == [path], found
  assert rule.doc in found[0]


def test_every_violation_is_listed_in_one_error():
  config = _loose(load_config("tiny"))
  config.data.qa_len, config.camels.outer_lr, config.eval.select, config.model.dtype = 0, -1.0, "bleu", "int8"
  with pytest.raises(checks.ConfigError) as e:
    checks.validate(config, job.RULES, job.CROSS)
  message = str(e.value)
  assert "4 invalid field(s)" in message
  for key in ("data.qa_len=0", "camels.outer_lr=-1.0", "eval.select='bleu'", "model.dtype='int8'"):
    assert key in message


_CROSS_CASES = {
    "val_every/reset_every": (dict(camels__val_every=6, camels__reset_every=4),
                              "camels.val_every=6 must be a multiple of camels.reset_every=4"),
    "mixing": (dict(camels__mixing=True, camels__inner_steps=1), "camels.mixing=True needs camels.inner_steps >= 2"),
    "num_beams/num_groups": (dict(eval__decoding="beam", eval__num_beams=5, eval__num_groups=2),
                             "eval.num_beams=5 must be a multiple of eval.num_groups=2"),
    "stop_metric/val_decoding": (dict(qa_tune__stop_metric="f1", qa_tune__val_decoding=""),
                                 "qa_tune.stop_metric='f1' needs qa_tune.val_decoding"),
    "select/val_decoding": (dict(eval__select="f1", eval__val_decoding=""),
                            "eval.select='f1' needs eval.val_decoding"),
    "weight_decay/optimizer": (dict(qa_tune__weight_decay=0.1), "qa_tune.weight_decay=0.1 is used by"),
    "max_answer_len/qa_len": (dict(data__max_answer_len=47), "data.max_answer_len=47 must be <= data.qa_len - 2"),
    "path": (dict(data__dataset="squad", data__split_sizes__test=5), "data.path is empty"),
    "generated sizes": (dict(data__split_sizes__qa_val=-1), "data.split_sizes.qa_val=-1"),
    "squad rest": (dict(data__dataset="squad", data__path="x.json", data__split_sizes__test=-1,
                        data__split_sizes__qa_val=-1, data__stream_docs=-1), "only one split may be -1"),
    "stream_docs/test": (dict(data__stream_docs=7), "data.stream_docs=7 exceeds data.split_sizes.test=6"),
    "random model heads": (dict(model__random__n_heads=3), "model.random: ModelConfig: d_model=32"),
    "random backbone heads": (dict(camels__weighting__backbone="random", camels__weighting__random__n_heads=3),
                              "camels.weighting.random: ModelConfig: d_model=128"),
    "buckets/max_len": (dict(data__doc_buckets=(128, 512)), "data.doc_buckets reaches 512 tokens, more than "
                                                            "model.random.max_len=256"),
    "camels padded_len": (dict(camels__padded_len=100), "camels.padded_len=100 must be 0 or >="),
    "online padded_len": (dict(eval__online__padded_len=100), "eval.online.padded_len=100 must be 0 or >="),
    "qa_tune split": (dict(qa_tune__train_split="train"), "qa_tune.train_split='train' is not a split"),
    "weighting layers": (dict(camels__weighting__base_layers=3), "camels.weighting.base_layers=3 exceeds"),
    "mac train_docs": (dict(mac__train_docs=100, data__dataset="squad", data__path="x.json"),
                       "mac.train_docs=100 needs data.dataset='generated'"),
}


@pytest.mark.parametrize("changes,expected", _CROSS_CASES.values(), ids=_CROSS_CASES.keys())
def test_a_cross_field_violation_is_reported_by_full_key(changes, expected):
  config = _loose(load_config("tiny"))
  for path, value in changes.items():
    _set(config, path.replace("__", "."), value)
  found = checks.violations(config, job.RULES, job.CROSS)
  assert len(found) == 1 and expected in found[0], found


def test_cross_checks_wait_for_fields_in_range():
  # A field out of range is reported alone: cross-field checks assume every field is valid.
  config = _loose(load_config("tiny"))
  config.camels.val_every, config.camels.reset_every = 6, 0
  assert _keys(checks.violations(config, job.RULES, job.CROSS)) == ["camels.reset_every"]


def test_sections_check_themselves_when_called_as_a_library():
  c = camels.camels_config()
  c.val_every, c.reset_every = 6, 4
  with pytest.raises(checks.ConfigError, match="camels.val_every=6 must be a multiple of camels.reset_every=4"):
    camels._check(c, 1)
  with pytest.raises(checks.ConfigError, match=r"camels.streams=1 must be a multiple of the mesh.s 2 data shards"):
    camels._check(camels.camels_config(), 2)
  q = qa_tune.qa_tune_config()
  q.patience = 0
  with pytest.raises(checks.ConfigError, match="qa_tune.patience=0"):
    qa_tune._check(q)
  e = eval_config.eval_config()
  assert checks.violations(ml_collections.ConfigDict({"eval": e}), {"eval": evaluation.RULES},
                           checks.within("eval", evaluation.CROSS)) == []


def test_rule_constructors():
  assert checks.between(0, 1)(0.5) and not checks.between(0, 1)(1) and not checks.between(0, 1)(0)
  increasing = checks.increasing(checks.count)
  assert increasing((1, 2)) and not increasing((2, 2)) and not increasing(()) and not increasing("12")
  subset = checks.subset_of("a", "b", allow_empty=True)
  assert subset("") and subset("a, b") and not subset("a,c") and not subset(1)
  assert not checks.count(True) and not checks.count(1.0) and checks.count_or_all(-1)
  assert checks.within("s", [lambda c, at="": [f"{at}x"]])[0](ml_collections.ConfigDict({"s": {}})) == ["s.x"]
  assert checks.within("s", [lambda c, at="": ["never"]])[0](ml_collections.ConfigDict()) == []
