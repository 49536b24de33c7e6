#!/usr/bin/env bash
# Rehearse, without a GPU, what the GPU check (scripts/gpu_check.sh) will run on the target GPU machines, with their
# software versions (the H100/H200 machines this check is rehearsed for have torch 2.11.0 and triton 3.6.0), so that
# a version difference shows up here and not in the GPU check's time budget:
#   1. pydlx imports under those versions, and backends() reports;
#   2. the interpreter subset of the test suite passes under them;
#   3. every shipped Triton config compiles for sm_90 (and sm_80) with triton 3.6, spill-free (tests/aot_compile.py);
#      and pydlx's launches of the compiled kernels are Triton's own (tests/launch_cases.py, a stand-in driver);
#   4. the C++/CUDA extension builds against torch 2.11's headers for sm_90 only (what the GPU check builds), timed;
#   5. the GPU check's driver runs end to end (--dry-run).
# Then, with REHEARSE_NEWEST=1, the interpreter subset again on the newest triton a plain pip install gives beside a
# CPU build of torch (triton 3.9 today).
#   bash scripts/rehearse.sh [LOG]      (default bench/results/rehearsal-<date>.txt; commit it)
# The environments live in $REHEARSE_VENV (default .venv-rehearse) and .venv-newest; the first run installs them
# (torch 2.11 is a CUDA build: a few GB from PyPI).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${REHEARSE_VENV:-$ROOT/.venv-rehearse}
LOG=${1:-bench/results/rehearsal-$(date -u +%F).txt}
mkdir -p "$(dirname "$LOG")"
: > "$LOG"
say() { echo "[$(date -u +%T)] $*" | tee -a "$LOG"; }
run() {  # run "title" cmd...: output into the log, exit code and seconds after it
  local title=$1; shift
  say "== $title"
  local t=$(date +%s)
  "$@" >> "$LOG" 2>&1
  local rc=$?
  say "== $title: exit $rc after $(( $(date +%s) - t ))s"
  return $rc
}

if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV (torch 2.11.0, triton 3.6.0)"
  python3 -m venv "$VENV"
  # numpy < 2.4: Triton 3.6's interpreter fails with numpy >= 2.4 (triton-lang/triton#9171; pydlx.backends() says
  # so). The GPU machines have numpy 2.5 and never interpret; their compiled kernels do not care.
  "$VENV/bin/pip" install -q torch==2.11.0 triton==3.6.0 "numpy<2.4" pytest pytest-benchmark matplotlib \
    scikit-learn ninja >> "$LOG" 2>&1 || { say "install failed"; exit 1; }
fi
# the other test requirements (torchvision 0.26.0: the release built against torch 2.11.0); an environment made
# before they were added gets them here
"$VENV/bin/pip" install -q onnx onnxscript onnxruntime torchvision==0.26.0 >> "$LOG" 2>&1 || { say "install failed"; exit 1; }
PY="$VENV/bin/python"
export PYTHONPATH="$ROOT" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" PYTHONUNBUFFERED=1
say "commit $(git log -1 --format='%h %s')"
say "machine: $(uname -m), $(nproc) cores; nvcc $("$CUDA_HOME/bin/nvcc" --version | tail -2 | head -1)"
fails=0
run "1. import pydlx under the device's versions" "$PY" -c "
import sys, torch, triton, pydlx
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
      triton.__version__)
for k, v in pydlx.backends().items(): print('backend', k + ':', v)" || fails=$((fails + 1))
run "2. interpreter subset of the suite" env TRITON_INTERPRET=1 "$PY" -m pytest tests -m interpreter -q \
  -p no:cacheprovider || fails=$((fails + 1))
run "3. every shipped Triton config for sm_80/sm_90 with this triton (regs, shared memory, spills, MMA)" \
  env TRITON_INTERPRET=0 "$PY" tests/aot_compile.py || fails=$((fails + 1))
# the GPU machines are sm_90 (H100/H200): a spill there fails the rehearsal; sm_80 spills are reported (A100 users)
spills90=$(awk '/^[a-z][^ ]*-sm90-/ && $4 != 0' "$LOG" | wc -l)
spills80=$(awk '/^[a-z][^ ]*-sm80-/ && $4 != 0' "$LOG" | wc -l)
errors=$(grep -cE "^[a-z][^ ]* +ERROR" "$LOG")
say "   configs compiled: $(grep -cE '^[a-z][^ ]*-sm(80|90)-' "$LOG"); with spills: sm_90" \
  "$spills90, sm_80 $spills80; errors: $errors"
[ "$spills90" -eq 0 ] && [ "$errors" -eq 0 ] || fails=$((fails + 1))
run "3b. the compiled kernels' launches with this triton: pydlx's direct launch against Triton's own run" \
  env TRITON_INTERPRET=0 PYDLX_TRITON_AUTOTUNE=0 "$PY" tests/launch_cases.py || fails=$((fails + 1))
BUILD=$(mktemp -d)
run "4. the extension against this torch's headers, sm_90 only, MAX_JOBS=$(nproc)" env PYDLX_CUDA_ARCHS=90 \
  MAX_JOBS="$(nproc)" "$PY" -c "
import time; from pydlx import _ext
t = time.time(); print(_ext.jit_build('$BUILD')); print(f'built in {time.time() - t:.0f}s')" || fails=$((fails + 1))
rm -rf "$BUILD"
run "5. the GPU check's driver, dry run" "$PY" scripts/gpu_check.py --dry-run --minutes 2 --out "$(mktemp -d)" \
  || fails=$((fails + 1))
# the driver reports its steps' failures rather than exiting with them; in the dry run every kernel's smoke test
# runs under the interpreter and must pass (the later tiers run out of the dry run's small budget on purpose)
if grep -qE "== tier 0: every kernel once: exit [1-9]" "$LOG"; then
  say "   the dry run's tier 0 (every kernel once) failed: see its pytest output above"
  fails=$((fails + 1))
fi

if [ "${REHEARSE_NEWEST:-0}" = "1" ]; then
  NEW=$ROOT/.venv-newest
  if [ ! -x "$NEW/bin/python" ]; then
    python3 -m venv "$NEW" && "$NEW/bin/pip" install -q torch==2.13.0 triton numpy pytest pytest-benchmark \
      matplotlib scikit-learn >> "$LOG" 2>&1
  fi
  run "6. interpreter subset on the newest triton, CPU torch" env TRITON_INTERPRET=1 "$NEW/bin/python" -c \
    "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" || fails=$((fails + 1))
  run "   (tests)" env TRITON_INTERPRET=1 "$NEW/bin/python" -m pytest tests -m interpreter -q -p no:cacheprovider \
    || fails=$((fails + 1))
fi
say "rehearsal done: $fails step(s) failed; log $LOG"
exit $(( fails > 0 ))
