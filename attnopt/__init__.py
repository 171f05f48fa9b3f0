"""attnopt: a compiler for attention.

Public API: `inspect()` finds and describes every attention site of a model; `optimize()`
replaces each one by a fused exact kernel and validates the result; `attention()` is the
kernels' functional API (dense, causal, GQA, windows, GNA over token grids). Importing attnopt
registers the `attnopt::attention` custom op and the torch.compile backend "attnopt".
"""
from __future__ import annotations

from attnopt.api import InspectReport, inspect, optimize
from attnopt.codegen import ops as _ops  # noqa: F401 - registers torch.ops.attnopt.attention
from attnopt.frontends.pt2 import trust_pickled_files
from attnopt.functional import attention
from attnopt.planner.plan import Plan
from attnopt.planner.search import plan_model as plan
from attnopt.pipeline.backend import register as _register_backend

_register_backend()

__all__ = ["attention", "inspect", "optimize", "plan", "Plan", "InspectReport",
           "trust_pickled_files"]
__version__ = "0.1.0"
