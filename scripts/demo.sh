#!/usr/bin/env bash
# Install kvpool with the vLLM CPU engine into ./.venv, then run `kvpool demo`:
# a tiny generated model, an embedded pool, the same long document read twice.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh vllm
exec .venv/bin/kvpool demo "$@"
