#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite. Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
# The repo root holds a folder named `operator` (package kvpool.operator); never let Python put the
# current directory on sys.path, where it would shadow the standard library's operator module.
export PYTHONSAFEPATH=1

# Real servers the tests start on loopback: redis-server from Debian (valkey-server comes in a wheel).
if ! command -v redis-server >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
    || echo "warning: could not install redis-server; its tests will be skipped" >&2
fi

# npm, through which scripts/install.sh fetches a real helm for the chart tests (tests/chart).
if ! command -v npm >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null) \
    || echo "warning: could not install npm; the chart tests will fail under CI=true" >&2
fi

scripts/install.sh test,tiers,operator,vllm

set +e
# Three workers (one runs every vLLM engine test, in turn; tests/conftest.py groups them): most
# other tests wait on the servers they start, so a 2-core machine runs them beside the engines.
.venv/bin/python -m pytest -n "${KVPOOL_TEST_WORKERS:-3}" --durations=30 "$@"
code=$?
set -e
if [ "$code" = 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$code"
