#!/usr/bin/env bash
# The main job, set-up included: the microbenchmarks (GPU when there is one, else CPU at small sizes), then the
# three seed models (example models in plain PyTorch: pydlx/bench/seed_models.py) trained as written and after
# pydlx.optimize (examples/train_seed_models.py).
# Benchmark results go to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
set -euo pipefail
python -m pydlx.bench --family all "$@"
python examples/train_seed_models.py
