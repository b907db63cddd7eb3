"""Config files (configs/*.py) loaded by path: one config building on another, and tests reading them."""

import importlib.util
import os

import ml_collections


def load(path: str) -> ml_collections.ConfigDict:
  """get_config() of the config file at `path`."""
  name = "_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def sibling(here: str, name: str) -> ml_collections.ConfigDict:
  """get_config() of configs/<name>.py beside the file `here` (a config's __file__), whatever the cwd."""
  return load(os.path.join(os.path.dirname(os.path.abspath(here)), f"{name}.py"))
