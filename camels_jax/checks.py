"""Config checking: every field's valid range or choices, checked for the whole config before any work.

Each config section keeps a `RULES` dict beside the function that builds it: field name (a dotted path
for nested sub-sections, or a nested dict) -> a `Rule`, e.g.

  RULES = {"lr": checks.positive, "steps": checks.count, "optimizer": checks.one_of("adam", "sgd"),
           "light_tune": {"patience": checks.count}}

and may add `CROSS`, a list of functions (config_section, at="") -> [violations] for constraints between
fields; `at` is the section's dotted prefix ("camels."), written before every key a message names, so a
section's checks read the same alone and inside a job config (`within`).
An entry point composes the sections it reads (`validate(config, {"camels": camels.RULES, ...},
within("camels", camels.CROSS))`) and raises one `ConfigError` listing every violation at once, before a
model or dataset is loaded.
"""

import dataclasses
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections


class UserError(Exception):
  """An expected failure the user can fix (bad data, bad config, a missing prerequisite).

  Entry points print it as one line `error: <message>` and exit 2 (`camels_jax.cli`); the message says
  what is wrong, where (file, line, key), and what to do.
  """


class ConfigError(UserError, ValueError):
  """A config field (or several) outside its documented range."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """A check of one field's value: `test(value)` is true when valid; `doc` says what valid is."""

  test: Callable[[Any], bool]
  doc: str
  bad_example: Any = None  # a value the rule rejects (for the tests that every range is enforced)

  def __call__(self, value) -> bool:
    try:
      return bool(self.test(value))
    except (TypeError, ValueError):
      return False


def _is_number(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def at_least(lo, integer: bool = False) -> Rule:
  kind = _is_int if integer else _is_number
  return Rule(lambda x: kind(x) and x >= lo, f"{'an integer' if integer else 'a number'} >= {lo}",
              bad_example=lo - 1)


def greater_than(lo) -> Rule:
  return Rule(lambda x: _is_number(x) and x > lo, f"a number > {lo}", bad_example=lo)


def between(lo, hi) -> Rule:
  """A number strictly inside (lo, hi)."""
  return Rule(lambda x: _is_number(x) and lo < x < hi, f"a number in ({lo}, {hi}), both excluded", bad_example=hi)


def in_range(lo, hi, integer: bool = False) -> Rule:
  kind = _is_int if integer else _is_number
  return Rule(lambda x: kind(x) and lo <= x <= hi, f"{'an integer' if integer else 'a number'} in [{lo}, {hi}]",
              bad_example=hi + 1)


count = at_least(1, integer=True)  # how many of something: >= 1
count_or_zero = at_least(0, integer=True)  # >= 0 (0 usually means "none" or "all"; the field says which)
count_or_all = Rule(lambda x: _is_int(x) and (x >= 1 or x == -1), "an integer >= 1, or -1 for all",
                    bad_example=-2)
seed = at_least(0, integer=True)
positive = greater_than(0)  # learning rates, scales
non_negative = at_least(0)
fraction = in_range(0, 1)
any_number = Rule(_is_number, "a number", bad_example="x")
boolean = Rule(lambda x: isinstance(x, bool), "true or false", bad_example=2)
string = Rule(lambda x: isinstance(x, str), "a string", bad_example=1)
nonempty_string = Rule(lambda x: isinstance(x, str) and bool(x.strip()), "a non-empty string", bad_example="")


def one_of(*choices) -> Rule:
  return Rule(lambda x: x in choices, f"one of {', '.join(map(repr, choices))}", bad_example="?unknown?")


def subset_of(*choices, allow_empty: bool = False) -> Rule:
  """A comma-separated list of names from `choices`."""

  def test(x):
    if not isinstance(x, str):
      return False
    names = [n.strip() for n in x.split(",") if n.strip()]
    return (allow_empty or bool(names)) and all(n in choices for n in names)

  empty = " (may be empty)" if allow_empty else ""
  return Rule(test, f"a comma-separated subset of {', '.join(choices)}{empty}", bad_example="?unknown?")


def each(rule: Rule, min_len: int = 1) -> Rule:
  """A sequence of at least `min_len` values, each valid under `rule`."""
  return Rule(lambda xs: isinstance(xs, Sequence) and not isinstance(xs, str) and len(xs) >= min_len
              and all(rule(x) for x in xs), f"a list of >= {min_len} values, each {rule.doc}",
              bad_example=(rule.bad_example,))


def increasing(rule: Rule) -> Rule:
  """A strictly increasing sequence of at least one value, each valid under `rule`."""
  inner = each(rule)
  return Rule(lambda xs: inner(xs) and all(a < b for a, b in zip(xs, xs[1:])),
              f"a strictly increasing {inner.doc.removeprefix('a ')}", bad_example=inner.bad_example)


def either(a: Rule, b: Rule) -> Rule:
  return Rule(lambda x: a(x) or b(x), f"{a.doc}, or {b.doc}", bad_example=a.bad_example)


def equals(value, doc: str) -> Rule:
  return Rule(lambda x: x == value, doc, bad_example=None)


Rules = Mapping[str, Any]  # field -> Rule | nested Rules
Cross = Callable[..., list[str]]  # (config_section, at="") -> violations naming keys as f"{at}key"


def within(section: str, cross: Sequence[Cross]) -> list[Cross]:
  """The `cross` checks of sub-section `section`, as checks of the config holding it (messages name
  "<section>.key"); nothing is checked where the config has no such section."""

  def nest(fn: Cross) -> Cross:
    return lambda c, at="": fn(c[section], f"{at}{section}.") if section in c else []

  return [nest(fn) for fn in cross]


def _flatten(rules: Rules, prefix: str = "") -> dict[str, Rule]:
  flat = {}
  for key, rule in rules.items():
    if isinstance(rule, Mapping):
      flat |= _flatten(rule, f"{prefix}{key}.")
    else:
      flat[prefix + key] = rule
  return flat


def flat_rules(rules: Rules) -> dict[str, Rule]:
  """{dotted path: Rule} of a (nested) rules dict."""
  return _flatten(rules)


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """{dotted path: value} of every leaf field of `config` (sub-ConfigDicts and plain dicts descended)."""
  out = {}
  for key, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out |= leaves(value, f"{prefix}{key}.")
    else:
      out[prefix + key] = value
  return out


def violations(config: ml_collections.ConfigDict, rules: Rules, cross: Sequence[Cross] = ()) -> list[str]:
  """Every field of `config` that breaks its rule ("key=value: expected ..."), then every cross-field
  violation `cross` reports. Fields without a rule are not checked here (the tests require one for
  every numeric field)."""
  found = []
  values = leaves(config)
  for path, rule in flat_rules(rules).items():
    if path not in values:
      continue  # a section the entry point does not read
    if not rule(values[path]):
      found.append(f"{path}={values[path]!r}: expected {rule.doc}")
  if not found:  # cross-field checks assume every field is in range
    for fn in cross:
      found.extend(fn(config))
  return found


def validate(config: ml_collections.ConfigDict, rules: Rules, cross: Sequence[Cross] = (),
             where: str = "config") -> None:
  """Raises one `ConfigError` listing every violation of `rules` and `cross` in `config`."""
  found = violations(config, rules, cross)
  if found:
    raise ConfigError(f"{where}: {len(found)} invalid field(s): " + "; ".join(found))


def validate_section(name: str, section: ml_collections.ConfigDict, rules: Rules,
                     cross: Sequence[Cross] = ()) -> None:
  """`validate` of one job-config section on its own (a library call's safety net), naming keys as the
  whole config does ("<name>.key")."""
  validate(ml_collections.ConfigDict({name: section}), {name: rules}, within(name, cross))
