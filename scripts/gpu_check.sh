#!/usr/bin/env bash
# One-command GPU check (shared/VERIFY.md rung 5), for the lent GPU machine or any CUDA machine:
#   1. the GPU tests: every backend against the float64 reference (pytest -m gpu), the extension JIT-built first;
#   2. the benchmarks (python -m pydlx.bench --family all), time-boxed so the whole check ends within ~8 minutes.
# Offline: uses the machine's python3 with its own torch/triton/pytest (nothing installed), PYTHONPATH=repo.
# Writes env.txt, gpu-tests.txt/.xml, bench.txt, the CSV/PNG and the measured policy (policy.txt, <card>.json) under
# $OUT (default ./gpu-report); copy the CSV into bench/results/ and the JSON into pydlx/policies/, and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-report}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TRITON_INTERPRET=0
export PYDLX_BUILD_DIR="$PWD/build/jit-test"  # the extension is built once, here, and loaded from here
PY="${PYTHON:-python3}"
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || {
  echo "gpu_check: no CUDA device here; run it on a GPU machine (the tests run on the CPU with scripts/test.sh)"
  exit 2
}
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }

{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  git log -1 --format='commit %H %s' 2>/dev/null
  "$PY" - <<'PY'
import torch, pydlx
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f"none ({e})"
print(f"torch {torch.__version__} cuda {torch.version.cuda} triton {tv} device {torch.cuda.get_device_name()}")
print("backends before build:", pydlx.backends())
PY
} 2>&1 | tee "$OUT/env.txt"

echo "== ceilings ($(elapsed)s)" | tee -a "$OUT/env.txt"
timeout 60 "$PY" bench/ceilings.py 2>&1 | tee -a "$OUT/env.txt"
echo "== building pydlx._C ($(elapsed)s)" | tee -a "$OUT/env.txt"
"$PY" -c "from pydlx import _ext; print(_ext.jit_build())" 2>&1 | tail -5 | tee -a "$OUT/env.txt"

echo "== GPU tests ($(elapsed)s)"
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
# -v: every result is printed as it lands, so a run cut short by the time limit still reports what it covered
PYDLX_TRITON_AUTOTUNE=0 timeout 300 "$PY" -m pytest tests -m gpu $XDIST -v -rf -p no:cacheprovider \
  --junitxml="$OUT/gpu-tests.xml" > "$OUT/gpu-tests.txt" 2>&1
echo "pytest exit $? after $(elapsed)s" >> "$OUT/gpu-tests.txt"
grep -E "FAILED|ERROR" "$OUT/gpu-tests.txt" | head -40
tail -5 "$OUT/gpu-tests.txt"

left=$(( (450 - $(elapsed)) / 60 ))
[ "$left" -lt 1 ] && left=1
echo "== benchmarks, at most ${left} min ($(elapsed)s)"
timeout $(( left * 60 + 60 )) "$PY" -m pydlx.bench --family all --device cuda --max-minutes "$left" \
  --out-dir "$OUT" > "$OUT/bench.txt" 2>&1   # writes $OUT/gpu_<card>.csv and .png
echo "bench exit $? after $(elapsed)s" >> "$OUT/bench.txt"
tail -40 "$OUT/bench.txt"
echo "== measured policy ($(elapsed)s)"
# only implementations whose GPU tests passed above are eligible; writes $OUT/<card>_sm<cc>.json: commit it under
# pydlx/policies/
"$PY" -m pydlx.bench --make-policy "$OUT"/gpu_*.csv --tests "$OUT/gpu-tests.xml" --policy-dir "$OUT" \
  > "$OUT/policy.txt" 2>&1
echo "make-policy exit $?" >> "$OUT/policy.txt"
tail -30 "$OUT/policy.txt"
echo "== done in $(elapsed)s; report in $OUT"
