# Source me: creates .venv (once), installs requirements.txt and pydlx (editable), activates the venv.
# Re-installs only when requirements.txt or setup.py change. Python: $PYTHON, else python3.
set -e
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
stamp=".venv/.pydlx-installed-$(cat requirements.txt setup.py | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing requirements into .venv (first run: a few minutes)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements.txt
  # The C++/CUDA extension is built on first use (and by the test suite), not here.
  PYDLX_SKIP_CUDA_BUILD=1 python -m pip install -q --no-build-isolation --no-deps -e .
  rm -f .venv/.pydlx-installed-*
  touch "$stamp"
fi
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
set +e
