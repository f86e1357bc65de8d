#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite. Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
# The repo root holds a folder named `operator` (package kvpool.operator); never let Python put the
# current directory on sys.path, where it would shadow the standard library's operator module.
export PYTHONSAFEPATH=1

# Commands the tests run: redis-server from Debian (built with TLS, for the TLS tier tests; valkey-server
# comes in a wheel), openssl (test certificates) and shellcheck (scripts/*.sh). A test that finds one
# missing skips locally and fails under CI=true (tests/needs.py); pytest's -ra lists every skip.
missing_cmds=()
for cmd in redis-server openssl shellcheck; do
  command -v "$cmd" >/dev/null 2>&1 || missing_cmds+=("$cmd")
done
if [ "${#missing_cmds[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_cmds[@]}" >/dev/null) \
    || echo "warning: could not install ${missing_cmds[*]}; their tests will fail under CI=true" >&2
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
