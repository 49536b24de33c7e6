#!/usr/bin/env bash
# The main job, set-up included: the microbenchmarks (GPU when there is one, else CPU at small sizes), then the
# swap demo (pydlx.optimize on the seed document's autoencoder). Results go to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
set -euo pipefail
python -m pydlx.bench --family all "$@"
python examples/swap_demo.py
