"""Loading the shipped job configs in tests (configs/tiny.py is what most tests run)."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_default():
  """configs/tiny.py: the default job on a tiny random model."""
  return load_config("tiny")
