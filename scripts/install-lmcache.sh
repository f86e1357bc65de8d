#!/usr/bin/env bash
# Install LMCache 0.5.6 into its own venv, ./.venv-lmcache, for `kvpool bench node --lmcache`:
#   scripts/install-lmcache.sh
#   .venv/bin/kvpool bench node --lmcache .venv-lmcache/bin/python
# Never into ./.venv: LMCache's wheel declares CUDA packages (cupy-cuda13x, cuda-python,
# cufile-python, nvtx), any torch and numpy<=2.2.6, which pip's resolver would pull or change
# beside kvpool's vLLM and torch. So LMCache goes in --no-deps, with the two packages its lm://
# server and client import that kvpool's venv lacks (aiofile and its caio), and the new venv reads
# everything else (torch, numpy, msgspec, pyzmq, prometheus_client, ...) from kvpool's venv through
# a .pth file placed after its own site-packages: nothing is downloaded twice, and nothing in
# ./.venv changes. (numpy there may be newer than LMCache's pin; the bench checks every byte it
# gets back, so a break would show as an error, not as a figure.) Run scripts/install.sh first.
# Offline-friendly: pip fetches only these three wheels, from whatever index pip is set up to use.
# CI does not run this script; tests/server/test_bench_lmcache.py skips its LMCache run without it.
# Env: LMCACHE_VENV (default .venv-lmcache), KVPOOL_VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
# The repo root holds a folder named `operator`; never let Python put the current directory on
# sys.path, where it would shadow the standard library's operator module.
export PYTHONSAFEPATH=1
LMCACHE_VENV="${LMCACHE_VENV:-.venv-lmcache}"
KVPOOL_VENV="${KVPOOL_VENV:-.venv}"
LMCACHE="lmcache==0.5.6"

[[ -x "$KVPOOL_VENV/bin/python" ]] || { echo "error: no $KVPOOL_VENV; run scripts/install.sh first" >&2; exit 1; }
# The same interpreter as kvpool's venv: LMCache's wheel is built for CPython 3.11, and the .pth
# below only works for the same Python version.
BASE="$("$KVPOOL_VENV/bin/python" -c 'import sys; print(sys._base_executable)')"
"$BASE" -m venv "$LMCACHE_VENV"
KVPOOL_SITE="$("$KVPOOL_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
LMCACHE_SITE="$("$LMCACHE_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
# zz-: read after the venv's own packages, so what is installed here wins over kvpool's venv.
echo "$KVPOOL_SITE" >"$LMCACHE_SITE/zz-kvpool-venv.pth"
"$LMCACHE_VENV/bin/python" -m pip install --no-deps "$LMCACHE" aiofile caio
"$LMCACHE_VENV/bin/python" -c 'import lmcache.v1.server.__main__, lmcache.v1.storage_backend.remote_backend' \
  || { echo "error: LMCache's lm:// server or client does not import in $LMCACHE_VENV" >&2; exit 1; }
echo "LMCache installed: kvpool bench node --lmcache $LMCACHE_VENV/bin/python"
