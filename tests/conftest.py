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
