#!/usr/bin/env bash
# The one-command GPU check, for any CUDA machine:
#   bash scripts/gpu_check.sh [--minutes 9] [--dry-run]
# Tiered and time-boxed (scripts/gpu_check.py): tier 0 = environment, ceilings, extension build, every kernel once
# against float64, the headline benchmarks; tier 1 = the full GPU test suite; tier 2 = the benchmark grid; last =
# the measured policy and summary.md. Every result lands under $OUT (default ./gpu-report) as it comes.
# Offline: uses the machine's python3 with its own torch/triton/pytest (nothing installed), PYTHONPATH=repo.
# Afterwards commit $OUT/bench.csv as bench/results/gpu_<card>.csv, summary.md and log.txt under bench/results/,
# and policy.json as pydlx/policies/<card>_sm<cc>.json.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
