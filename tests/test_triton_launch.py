"""pydlx's launch of compiled Triton kernels (pydlx.triton.common ``Tuned``: a repeated launch skips Triton's
``JITFunction.run``), checked without a GPU: Triton compiles the kernels for sm_90 and a stand-in driver records
each launch. Every case is in tests/launch_cases.py, run once in a subprocess (it needs TRITON_INTERPRET=0); each is
one test here."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launch_cases  # noqa: E402  (the case names only; the cases run in the subprocess)

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch_cases.py")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, TRITON_INTERPRET="0", PYDLX_TRITON_AUTOTUNE="0")
    env.pop("PYDLX_TRITON_DIRECT", None)
    out = subprocess.run([sys.executable, SCRIPT, "--json"], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, f"launch_cases.py failed:\n{out.stderr[-4000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(launch_cases.CASES))
def test_launch(name, results):
    assert results[name] == "ok", f"{name}:\n{results[name]}"
