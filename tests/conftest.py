"""Shared pytest setup: make tests/ importable so `import zoo` works from any test."""
import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

# Kernel autotuning and the CPU profile write to $ATTNOPT_CACHE_DIR; keep tests out of the user's
# ~/.cache/attnopt (each test process gets its own empty cache).
if "ATTNOPT_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["ATTNOPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnopt-test-cache-")

# `ATTNOPT_TEST_TIMES=<file>`: append "<seconds> <phase> <test id>" per test phase as it ends, so a
# run cut short still says where the time went (make test's --durations prints only at the end).
_TIMES = os.environ.get("ATTNOPT_TEST_TIMES")


def pytest_runtest_logreport(report):
    if _TIMES and report.duration > 0.5:
        with open(_TIMES, "a") as f:
            f.write(f"{report.duration:.2f} {report.when} {report.nodeid}\n")
