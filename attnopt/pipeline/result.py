"""What optimize() returns: the optimized model and a per-site account."""
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
    rel_error: float = 0.0
    output: str | None = None

    @property
    def sites_found(self) -> int:
        return len(self.sites)

    @property
    def sites_rewritten(self) -> int:
        return sum(1 for s in self.sites if s.status == "rewritten")

    def to_json(self) -> dict[str, Any]:
        return {"sites_found": self.sites_found, "sites_rewritten": self.sites_rewritten,
                "max_abs_error": self.max_abs_error, "rel_error": self.rel_error,
                "output": self.output, "sites": [s.to_json() for s in self.sites]}
