"""What optimize() returns: the optimized model and a per-site account.

Errors: `max_abs_error` is max |new - ref| over every output; `max_abs_rel_error` the same over
max |ref| (validation's measure for exact rewrites, pipeline/validate.py). `rel_error` is the
error the run was held to, named by `error_metric`: "max_abs/max_ref" (= max_abs_rel_error) for
exact rewrites; "rel_l2" when an approximate plan's sites were kept: the end-to-end relative L2
over real tokens that the plan was built against and checked with (planner/metrics.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from attnopt.ir import AttentionSpec, Rejection


@dataclass(frozen=True)
class SiteResult:
    name: str
    pattern: str
    status: str  # rewritten | kept | reverted
    error: float | None  # relative to the site output's scale
    reason: str = ""
    spec: AttentionSpec | None = None
    variant: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "pattern": self.pattern, "status": self.status,
                "variant": self.variant, "error": self.error, "reason": self.reason}


@dataclass
class OptimizeResult:
    model: Any
    sites: list[SiteResult]
    rejected: list[Rejection] = field(default_factory=list)
    max_abs_error: float = 0.0
    rel_error: float = 0.0          # in error_metric (module header)
    output: str | None = None
    max_abs_rel_error: float | None = None  # None: rel_error (it is in that metric)
    error_metric: str = "max_abs/max_ref"   # | "rel_l2"

    def __post_init__(self) -> None:
        if self.max_abs_rel_error is None:
            self.max_abs_rel_error = self.rel_error

    @property
    def sites_found(self) -> int:
        return len(self.sites)

    @property
    def sites_rewritten(self) -> int:
        return sum(1 for s in self.sites if s.status == "rewritten")

    def to_json(self) -> dict[str, Any]:
        return {"sites_found": self.sites_found, "sites_rewritten": self.sites_rewritten,
                "max_abs_error": self.max_abs_error, "rel_error": self.rel_error,
                "error_metric": self.error_metric, "max_abs_rel_error": self.max_abs_rel_error,
                "output": self.output, "sites": [s.to_json() for s in self.sites]}
