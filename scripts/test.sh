#!/usr/bin/env bash
# The test suite, set-up included: bash scripts/test.sh [pytest args]
# On a machine without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py), the
# C++/CUDA extension is built (not run), every Triton config is compiled for sm_80/sm_90, and GPU tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
set -euo pipefail
python -m pytest tests -q -p no:cacheprovider "$@"
