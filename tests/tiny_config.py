"""Loading the shipped job configs in tests (configs/tiny.py is what most tests run)."""

import os

from camels_jax import config_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str):
  return config_files.load(os.path.join(REPO, "configs", f"{name}.py"))


def tiny_default():
  """configs/tiny.py: the default job on a tiny random model."""
  return load_config("tiny")
