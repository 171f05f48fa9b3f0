"""Shared pytest setup: make tests/ importable so `import zoo` works from any test."""
import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
