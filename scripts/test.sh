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

scripts/install.sh test,tiers,operator,vllm

set +e
.venv/bin/python -m pytest "$@"
code=$?
set -e
if [ "$code" = 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$code"
