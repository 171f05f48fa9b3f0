"""A plan: the variant chosen per attention site, with what was predicted and measured.

The data types (Plan, SitePlan, WalkStep, Measured), their JSON and files, and the two methods
the pipeline applies a plan through (its PlanApplication: `split`, `add_approximate`; see
apply.py). search.make_plan makes plans.

Plan JSON (format "attnopt.plan", version 1), stable and editable by hand:
  {"format", "version", "policy", "max_error", "target", "hardware",
   "predicted": {"attention_dense_s", "attention_s", "other_s", "attention_speedup", "end_to_end_speedup",
                 "other_share_measured" (cpu target: forward_time.py)},
   "measured": {"rel_l2", "cosine", "calibration_batches", "holdout_rel_l2", "holdout_batches",
                "attention_speedup", "timed_sites" (with timing: over the timed sites)},
   "sites": [{"site", "status" (planned|kept), "reason" (why kept, or why no approximation), "spec": {...},
              "token_layout": {"source": "inferred" | "given", "segments": [{"kind": "global", "name",
                               "tokens"} | {"kind": "grid", "shape"}, ...]} | null (planner/layout.py;
                               an approximate choice's grid, leading and trailing agree with it, and
                               are taken from it where the choice leaves them out),
              "choice": {"name", "family", "exact", "q_tile", "kv_tile", "layout": {"shape", "window",
                         "stride", "dilation", "causal"} | null, "leading", "trailing" (optional,
                         global tokens after the grid; 0 when absent), "window": [l, r] | null,
                         "heads": [query heads that run the layout] | null (null: all),
                         "predicted": {"time_s", "baseline_time_s", "speedup", "flops", "bytes", "bound"}} | null,
              "measured": {"site_rel_l2", "e2e_rel_l2", "e2e_cosine"} | null,
              "timed": {"time_s", "baseline_time_s", "speedup", "device"} | null (planner/timing.py)}],
   "walk": [{"step", "site", "candidate", "saved_s", "alone_rel_l2", "rel_l2", "cosine",
             "predicted_speedup", "accepted", "reason"}]}
`Plan.from_json(plan.to_json()) == plan`; `Plan.load(path)` / `plan.save(path)` (atomic).
A plan is input: `Plan.from_json`, `Plan.load` and `Plan.coerce` (what `attnopt.optimize(...,
plan=)` takes: a Plan, its JSON dict or a path) check every field (schema.py) and raise
attnopt.errors.BadArgument (exit 2) naming the bad one; applying a plan checks that each
choice fits its site (`split_recipes`). An unbounded error (NaN or Inf outputs) is written "inf".
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch.fx as fx

from attnopt.cost.variants import Candidate, candidate_from_json, candidate_to_json
from attnopt.ir import Graph, Site
from attnopt.passes.rewrite import Recipe
from attnopt.pipeline.outputs import write_bytes_atomically
from attnopt.planner.apply import add_approximate, split_recipes
from attnopt.planner.layout import TokenLayout
from attnopt.planner.timing import Timed
from attnopt.planner.schema import (FORMAT, INF, VERSION, BadPlan, check_plan_json, layout_applies,
                                    layout_parts, parse_plan_text, read_plan_file)


def _enc(x: Any) -> Any:
    """An error value for JSON: an unbounded one (inf) as the string "inf"."""
    return INF if isinstance(x, float) and math.isinf(x) and x > 0 else x


def _dec(x: Any) -> Any:
    return math.inf if x == INF else x


@dataclass(frozen=True)
class Measured:
    site_rel_l2: float | None
    e2e_rel_l2: float
    e2e_cosine: float

    def to_json(self) -> dict[str, Any]:
        return {"site_rel_l2": _enc(self.site_rel_l2), "e2e_rel_l2": _enc(self.e2e_rel_l2),
                "e2e_cosine": self.e2e_cosine}

    @classmethod
    def from_json(cls, d: dict | None) -> "Measured | None":
        return None if d is None else cls(_dec(d.get("site_rel_l2")), float(_dec(d["e2e_rel_l2"])),
                                          float(d["e2e_cosine"]))


@dataclass(frozen=True)
class SitePlan:
    site: str
    status: str  # planned | kept
    choice: Candidate | None
    reason: str = ""
    spec: dict = field(default_factory=dict, compare=True)
    measured: Measured | None = None
    token_layout: TokenLayout | None = None  # the site's tokens: inferred, given, or unknown (None)
    timed: Timed | None = None  # its kernels timed on this machine (planner/timing.py), if asked

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "status": self.status, "reason": self.reason, "spec": self.spec,
                "token_layout": None if self.token_layout is None else self.token_layout.to_json(),
                "choice": None if self.choice is None else candidate_to_json(self.choice),
                "measured": None if self.measured is None else self.measured.to_json(),
                "timed": None if self.timed is None else self.timed.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> "SitePlan":
        """From checked JSON (schema.py). An approximate choice's global tokens not written in it
        are the site's token layout's (a hand-edited layout is applied with its own segments)."""
        c, tl = d.get("choice"), d.get("token_layout")
        if c is not None and layout_applies(c, tl):
            _, before, after = layout_parts(tl)
            c = {"leading": before, "trailing": after, **c}
        return cls(d["site"], d["status"], None if c is None else candidate_from_json(c),
                   d.get("reason", ""), d.get("spec") or {}, Measured.from_json(d.get("measured")),
                   None if tl is None else TokenLayout.from_json(tl), Timed.from_json(d.get("timed")))


@dataclass(frozen=True)
class WalkStep:
    step: int
    site: str
    candidate: str
    saved_s: float
    alone_rel_l2: float
    rel_l2: float | None       # combined with what was accepted before (None: not tried)
    cosine: float | None
    predicted_speedup: float   # end-to-end, if accepted
    accepted: bool
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["alone_rel_l2"], d["rel_l2"] = _enc(self.alone_rel_l2), _enc(self.rel_l2)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "WalkStep":
        return cls(**{**d, "alone_rel_l2": _dec(d["alone_rel_l2"]), "rel_l2": _dec(d["rel_l2"])})


@dataclass(frozen=True)
class Plan:
    policy: str
    max_error: float
    target: str
    hardware: str
    sites: tuple[SitePlan, ...]
    walk: tuple[WalkStep, ...] = ()
    predicted: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "policy": self.policy,
                "max_error": self.max_error, "target": self.target, "hardware": self.hardware,
                "predicted": dict(self.predicted),
                "measured": {k: _enc(v) for k, v in self.measured.items()},
                "sites": [s.to_json() for s in self.sites], "walk": [w.to_json() for w in self.walk]}

    @classmethod
    def from_json(cls, d: dict | str) -> "Plan":
        """The plan of a JSON dict (or its text), every field checked first: BadPlan (a
        BadArgument, exit 2, and a ValueError) naming the first bad one."""
        if isinstance(d, (str, bytes)):
            d = parse_plan_text(d)
        return cls._checked(d)

    @classmethod
    def _checked(cls, d: Any) -> "Plan":
        check_plan_json(d)
        try:
            return cls(d["policy"], float(d["max_error"]), d["target"], d["hardware"],
                       tuple(SitePlan.from_json(s) for s in d["sites"]),
                       tuple(WalkStep.from_json(w) for w in d.get("walk") or []),
                       dict(d.get("predicted") or {}),
                       {k: _dec(v) for k, v in (d.get("measured") or {}).items()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # the schema should stop these
            raise BadPlan(f"not a valid attnopt plan: {type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0][:200]}") from None

    @classmethod
    def coerce(cls, plan: Any) -> "Plan":
        """A checked Plan from a Plan object, its JSON dict or a plan file path (what
        `attnopt.optimize(..., plan=)` accepts); BadPlan naming the bad field otherwise."""
        if isinstance(plan, Plan):
            try:
                d = plan.to_json()
            except Exception as e:  # noqa: BLE001 - a hand-built object with wrong field types
                raise BadPlan(f"plan object cannot be read: {type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0][:200]}") from None
            return cls.from_json(d)
        if isinstance(plan, dict):
            return cls.from_json(plan)
        if isinstance(plan, (str, os.PathLike)):
            return cls.load(plan)
        raise BadPlan(f"plan must be an attnopt.Plan, its JSON dict or a plan file path, not "
                      f"{type(plan).__name__}")

    @property
    def approximate_sites(self) -> list[str]:
        """The sites whose choice is approximate."""
        return [s.site for s in self.sites if s.choice is not None and not s.choice.exact]

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, allow_nan=False)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        text = self.dumps()
        Plan.from_json(text)  # never write what cannot be read back
        write_bytes_atomically((text + "\n").encode(), path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read and check a plan file: InputNotFound (exit 3) when it does not exist, BadPlan
        (exit 2, one line naming the file and the bad field) for anything else wrong."""
        d = read_plan_file(path)
        try:
            return cls._checked(d)
        except BadPlan as e:
            raise BadPlan(f"{path}: {e}") from None

    # The pipeline's PlanApplication (optimize_torch): how a plan is applied to a graph.
    def split(self, graph: Graph, sites: Sequence[Site], recipes: Sequence[Recipe]
              ) -> tuple[list[Recipe], list[Recipe], dict[str, str]]:
        # a plan is input, however it arrived (optimize_torch takes objects)
        return split_recipes(graph, sites, recipes, Plan.coerce(self))

    def add_approximate(self, gm: fx.GraphModule, exact: list[Recipe], approx: list[Recipe],
                        variants: Sequence[Sequence[Any]], padding_positions: Sequence[int] = ()):
        return add_approximate(gm, exact, approx, variants, self.max_error, padding_positions)

    def site(self, name: str) -> SitePlan | None:
        return next((s for s in self.sites if s.site == name), None)
