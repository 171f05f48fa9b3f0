"""attnopt: a compiler for attention.

Public API: `inspect()` finds and describes every attention site of a model.
"""
from __future__ import annotations

from attnopt.api import InspectReport, inspect

__all__ = ["inspect", "InspectReport"]
__version__ = "0.1.0"
