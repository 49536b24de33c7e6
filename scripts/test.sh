#!/usr/bin/env bash
# The test suite, set-up included: bash scripts/test.sh [pytest args]
# On a machine without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py), the
# C++/CUDA extension is built (not run), every Triton config is compiled for sm_80/sm_90, and GPU tests skip.
# Without arguments (the full suite, what CI runs) the drop-in tests then run again with `auto` deciding as it does
# on a GPU (pytest --auto-as-gpu, tests/conftest.py): on a CPU `auto` is plain eager, so only this shows what an
# optimized model does where `auto` picks pydlx's ops and kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
set -euo pipefail
python -m pytest tests -q -p no:cacheprovider "$@"
if [ $# -eq 0 ]; then
    # a GPU with no measured decision (each family's default) and one whose measurements chose the Triton kernels
    # (slow under the interpreter: the files whose models are small)
    python -m pytest -q -p no:cacheprovider --auto-as-gpu=unmeasured tests/test_dropin.py tests/test_optimize.py \
        tests/test_threads.py tests/test_conv_bn_train.py tests/test_linear_bn_train.py
    python -m pytest -q -p no:cacheprovider --auto-as-gpu=kernels tests/test_dropin.py tests/test_threads.py \
        tests/test_linear_bn_train.py tests/test_conv_bn_train.py
fi
