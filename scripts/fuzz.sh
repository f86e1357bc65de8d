#!/usr/bin/env bash
# The long fuzz run (issue 22): the property tests of tests/fuzz and the lying-server tests with
# many more examples (hypothesis profile fuzz-long), then atheris, coverage-guided, on each pure
# decoder. The suite runs the same property tests with a few hundred examples each.
#
#   scripts/fuzz.sh                      # 20000 examples a property, 60 s of atheris a target
#   KVPOOL_FUZZ_EXAMPLES=2000 KVPOOL_FUZZ_SECONDS=10 scripts/fuzz.sh -x
#
# Extra arguments go to pytest. Exit status: non-zero when a property test or a target failed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONSAFEPATH=1
python=.venv/bin/python
examples="${KVPOOL_FUZZ_EXAMPLES:-20000}"
seconds="${KVPOOL_FUZZ_SECONDS:-60}"

# The `fuzz` extra of pyproject.toml (atheris): installed on its own, not through an editable
# reinstall of kvpool.
mapfile -t extra < <("$python" -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["fuzz"], sep="\n")')
"$python" -m pip install -q "${extra[@]}" \
  || echo "warning: could not install ${extra[*]}: the atheris run is skipped" >&2

status=0
started=$(date +%s)
HYPOTHESIS_PROFILE=fuzz-long KVPOOL_FUZZ_EXAMPLES="$examples" \
  "$python" -m pytest tests/fuzz tests/client -p no:cacheprovider -q "$@" || status=1
echo "property tests: ${examples} examples a property, $(( $(date +%s) - started )) s"

if "$python" -c 'import atheris' 2>/dev/null; then
  corpus=$(mktemp -d)
  trap 'rm -rf "$corpus"' EXIT
  for target in $("$python" tests/fuzz/atheris_targets.py --list 2>/dev/null); do
    mkdir -p "$corpus/$target"
    if "$python" tests/fuzz/atheris_targets.py "$target" -max_total_time="$seconds" -rss_limit_mb=2048 \
        -timeout=10 -print_final_stats=1 "$corpus/$target" 2>"$corpus/$target.log"; then
      echo "atheris $target: $(grep -E '^stat::number_of_executed_units' "$corpus/$target.log" | awk '{print $2}') runs in ${seconds} s, no crash"
    else
      status=1
      echo "atheris $target: FAILED" >&2
      tail -40 "$corpus/$target.log" >&2
    fi
  done
else
  echo "atheris is not importable here: only the property tests ran" >&2
fi
exit "$status"
