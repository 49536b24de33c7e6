#!/usr/bin/env bash
# The binary wheel: pydlx with the C++/CUDA extension pydlx._C compiled in, for sm_80 and sm_90 machine code plus
# PTX for newer GPUs. Installs and imports on a machine with no compiler and no CUDA toolkit; one wheel for every
# Python (py3-none-<platform>: the extension has no Python bindings).
#   bash scripts/build_wheel.sh [OUT_DIR]          (default dist/)
# Needs what building the extension needs: a CUDA build of torch (the test environment's, scripts/setup_env.sh) and
# nvcc (CUDA_HOME, else /usr/local/cuda); fails rather than build a wheel without pydlx._C. MAX_JOBS sets the
# parallel compile jobs (default: the cores).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-dist}
source scripts/setup_env.sh
set -euo pipefail
mkdir -p "$OUT"
export PYDLX_REQUIRE_CUDA_BUILD=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}"
rm -rf build/lib* build/bdist* build/temp*  # (a stale build tree would be packed as it is)
python -m pip wheel . --no-build-isolation --no-deps -w "$OUT" -v 2>&1 | grep -E "^pydlx:|error|Error" || true
wheel=$(ls -t "$OUT"/pydlx-*-py3-none-*.whl 2>/dev/null | head -1)
if [ -z "$wheel" ]; then
  echo "build_wheel: no binary wheel was written (run: python -m pip wheel . --no-build-isolation -v)" >&2
  exit 1
fi
python - "$wheel" <<'PY'
import json, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
names = z.namelist()
assert "pydlx/_C.so" in names, f"{sys.argv[1]} holds no pydlx/_C.so"
print(f"{sys.argv[1]}: pydlx/_C.so ({z.getinfo('pydlx/_C.so').file_size / 2**20:.1f} MiB)",
      json.loads(z.read("pydlx/_build.json")))
PY
