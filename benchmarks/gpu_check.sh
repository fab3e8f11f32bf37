#!/usr/bin/env bash
# One command for a GPU machine: build fcnfast with its CUDA kernels against the installed torch,
# run the CUDA tests (compiled kernels, then the CuPy/NVRTC path when CuPy is installed) and
# compute-sanitizer (memcheck, racecheck) over every kernel, run the
# GPU benchmarks and write benchmarks/results/<gpu-name>.md.
#
#   bash benchmarks/gpu_check.sh            (from anywhere; PYTHON=... picks the interpreter)
#
# Logs go to benchmarks/results/gpu_check_*.log, and everything is also copied to $OUT when that
# is set (the lent device machine returns only $OUT). Exits non-zero when the build or a test fails;
# the benchmarks run even after a test failure, so one call yields both.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
export FCNFAST_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0

finish() {
  if [ -n "${OUT:-}" ]; then
    cp "$RESULTS"/*.md "$RESULTS"/gpu_check_*.log "$OUT"/ 2>/dev/null || true
  fi
  exit "$status"
}
trap finish EXIT

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || { status=1; exit; }

echo "== build (FCNFAST_CUDA=1, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}) =="
start=$(date +%s)
# --no-deps: the device machine has no network; the runtime dependencies are already there
if ! "$PY" -m pip install --no-build-isolation --no-deps -v . > "$RESULTS/gpu_check_build.log" 2>&1; then
  tail -40 "$RESULTS/gpu_check_build.log"
  echo "gpu_check: build FAILED (log: $RESULTS/gpu_check_build.log)"
  status=1
  exit
fi
echo "build: $(( $(date +%s) - start )) s"
(cd tests && "$PY" -c "import fcnfast, json; print(json.dumps(fcnfast.build_info(), indent=1))")

echo "== CUDA tests =="
# from tests/ so `import fcnfast` is the installed package, not the source tree. Every test that
# runs on the GPU carries the `cuda` marker: the per-op files' cuda cases (vs the CPU reference)
# and test_cuda.py's CUDA-only concerns (streams, guards, CuPy/NVRTC)
(cd tests && "$PY" -m pytest -q -p no:cacheprovider -rs -m cuda . 2>&1) | tee "$RESULTS/gpu_check_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: CUDA tests FAILED"; status=1; }

# compute-sanitizer over the fp64-oracle and empty-batch cases of every op (all kernels, all
# dtypes; the whole cuda suite would take hours under the sanitizer)
if command -v compute-sanitizer > /dev/null; then
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool =="
    (cd tests && compute-sanitizer --tool "$tool" --error-exitcode 99 \
       "$PY" -m pytest -q -p no:cacheprovider -m cuda -k "fp64_oracle or empty_batch" . 2>&1) \
      | tee "$RESULTS/gpu_check_sanitizer_$tool.log" | tail -5
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: compute-sanitizer $tool FAILED"; status=1; }
  done
else
  echo "gpu_check: compute-sanitizer not found, sanitizer runs skipped"
fi

echo "== GPU benchmarks =="
(cd tests && "$PY" ../benchmarks/bench_cuda.py --out "../$RESULTS" 2>&1) | tee "$RESULTS/gpu_check_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "gpu_check: benchmarks FAILED"; status=1; }
echo "gpu_check: done (status $status)"
