"""The graph fuzzer in CI: a fixed, derandomized hypothesis run over the grammar (torch and
ONNX), bounded in time, plus the driver's command line. Any failure here is a bug: replay its
choices with `python -m attnopt.testing.fuzz --replay` and add it to test_regressions.py."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnopt.testing import fuzz

# Hard cap for the hypothesis run: 45 s in `make test` (CI: 2 cores, a 20-minute suite), longer with
# ATTNOPT_FUZZ_BUDGET_S (`make test-long` sets 600); `python -m attnopt.testing.fuzz` for real sweeps.
BUDGET_S = float(os.environ.get("ATTNOPT_FUZZ_BUDGET_S", "45"))
_start: list[float] = []


@settings(max_examples=300, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2 ** 31 - 1), kind=st.sampled_from(["torch", "onnx"]))
def test_fuzz_invariant(seed, kind):
    if not _start:
        _start.append(time.time())
    if time.time() - _start[0] > BUDGET_S:
        return
    c = fuzz.sample(random.Random(seed), kind)
    o = fuzz.run_case(c)
    assert o.ok, f"{o.message}\nchoices: {json.dumps(c)}"


def test_cli_summary_and_case_files(tmp_path):
    out = tmp_path / "failures"
    p = subprocess.run([sys.executable, "-m", "attnopt.testing.fuzz", "--cases", "6", "--seed", "3",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode in (0, 1), p.stderr
    line = p.stdout.strip().splitlines()[-1]
    assert line.startswith("fuzz: 6 cases") and "forms exercised" in line and "failures" in line
    failures = int(line.split(" failures")[0].rsplit(" ", 1)[-1])
    assert failures == len(list(out.glob("*.json"))) if out.exists() else failures == 0


def test_cases_are_reproducible():
    a = fuzz.sample(random.Random("5-17"), "torch")
    b = fuzz.sample(random.Random("5-17"), "torch")
    assert a == b and fuzz.torch_source(a) == fuzz.torch_source(b)
    assert fuzz.onnx_model(fuzz.sample(random.Random(3), "onnx")).SerializeToString() == \
        fuzz.onnx_model(fuzz.sample(random.Random(3), "onnx")).SerializeToString()
