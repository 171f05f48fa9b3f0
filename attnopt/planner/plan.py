"""The planner: choose a variant per attention site from the cost model and measured error.

For each site (torch models: nn.Module, ExportedProgram, .pt2):
  1. exact candidates (cost/variants.py): the site's own kernel and any sparsity its mask already
     implies; the cheapest on the target is taken (they change nothing numerically).
  2. policy "approx": approximate GNA candidates predicted to save at least MIN_APPROX_SAVING of
     their site's exact time; each one is spliced ALONE into the model and its error measured on
     calibration inputs (per-site output, end-to-end relative L2 and cosine).
  3. greedy walk: candidates sorted by predicted time saved per unit of end-to-end error (alone);
     each is tried together with those already accepted (replacing its site's earlier choice when
     it saves more) and kept if the measured end-to-end relative L2 stays within
     `SAFETY * max_error`. Every step is kept in `Plan.walk` (the speedup-vs-error curve).
  4. hold-out check: with two or more calibration batches the last one is held out of steps 2-3
     (choosing approximations by their error on the very inputs they are judged on overfits: a
     per-head plan measured 0.078 on its calibration batches and 0.105 on new text at a 0.1
     budget). The final plan is run on it; while its error there exceeds SAFETY * max_error (the
     held-out batch estimates the error on unseen inputs, so it keeps the same margin), the most
     recently accepted approximation is withdrawn (a walk step says so; the site goes back to
     the choice it had accepted before, if any, else to exact) and the plan re-checked.
Per-head choices: a candidate whose end-to-end error alone exceeds the budget is also tried on
a subset of the site's heads (the rest keep the exact kernel): heads (whole KV groups under GQA)
are ranked by their own error under the candidate (relative L2 of that head's output at the
site), and the best quarter, half and three quarters become candidates of their own, measured
and walked like the others. Heads differ (some attend locally, some far away), so a layout too
coarse for a whole site can still pay on the heads it suits.

Predicted end-to-end speedup = (other + attention dense) / (other + attention planned), where
"other" is the non-attention time estimated as 2 * (matrix parameters) * tokens FLOPs at the
target's peak * mma efficiency (a roofline guess: the planner times attention only).

Plan JSON (format "attnopt.plan", version 1), stable and editable by hand:
  {"format", "version", "policy", "max_error", "target", "hardware",
   "predicted": {"attention_dense_s", "attention_s", "other_s", "attention_speedup", "end_to_end_speedup"},
   "measured": {"rel_l2", "cosine", "calibration_batches", "holdout_rel_l2", "holdout_batches"},
   "sites": [{"site", "status" (planned|kept), "reason", "spec": {...},
              "choice": {"name", "family", "exact", "q_tile", "kv_tile", "layout": {"shape", "window",
                         "stride", "dilation", "causal"} | null, "leading", "window": [l, r] | null,
                         "heads": [query heads that run the layout] | null (null: all),
                         "predicted": {"time_s", "baseline_time_s", "speedup", "flops", "bytes", "bound"}} | null,
              "measured": {"site_rel_l2", "e2e_rel_l2", "e2e_cosine"} | null}],
   "walk": [{"step", "site", "candidate", "saved_s", "alone_rel_l2", "rel_l2", "cosine",
             "predicted_speedup", "accepted", "reason"}]}
`Plan.from_json(plan.to_json()) == plan`; `Plan.load(path)` / `plan.save(path)` (atomic).
A plan is input: `Plan.from_json`, `Plan.load` and `Plan.coerce` (what `attnopt.optimize(...,
plan=)` takes: a Plan, its JSON dict or a path) check every field (passes/plan_schema.py) and
raise attnopt.errors.BadArgument (exit 2) naming the bad one; applying a plan checks that each
choice fits its site (`split_recipes`). An unbounded error (NaN or Inf outputs) is written "inf".

Errors: NaN and Inf are infinite error wherever candidates or heads are scored (`rel_l2`,
`cosine`, `_head_errors`): a candidate output that is non-finite where the reference is finite,
or differs from a non-finite reference value, is an unbounded error (`max(0.0, nan)` is 0.0, so
a NaN-producing candidate used to score as error-free). Positions where the reference itself is
NaN (a fully masked query row: 0/0 in the original) are undefined output, as in validation
(passes/validate.py): matching NaN there is equal, and so is the zero attnopt's exact kernels put
there; +-Inf in the reference must be matched exactly.
"""
from __future__ import annotations

import functools
import json
import math
import os
import zipfile
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx

from attnopt.codegen.device import local_target
from attnopt.cost.hardware import HardwareProfile, get_profile
from attnopt.cost.roofline import resolve_dims
from attnopt.cost.variants import (Candidate, approx_candidates, baseline, candidate_from_json,
                                   candidate_to_json, exact_candidates, on_heads, static)
from attnopt.ir import Graph, Site
from attnopt.planner.schema import (FORMAT, INF, POLICIES, TARGETS, VERSION, BadPlan,  # noqa: F401
                                        check_plan_fits, check_plan_json, parse_plan_text,
                                        read_plan_file)
from attnopt.passes.rewrite import Recipe
from attnopt.pipeline.validate import padding_positions

SAFETY = 0.8  # approximations are accepted up to this fraction of max_error on calibration inputs
# Generated calibration: the example batch plus redrawn ones. The last batch is held out: the
# walk never sees it, and the final plan must stay within max_error on it.
CALIBRATION_BATCHES = 4
HEAD_SHARES = (0.25, 0.5, 0.75)  # per-head candidates: these shares of a site's heads
# An approximation must save at least this share of its site's predicted exact time: error for a
# 1% gain is a bad trade (a 4K Llama plan took a window on 1 of 4 heads for a predicted 0.7%).
MIN_APPROX_SAVING = 0.05


def _enc(x: Any) -> Any:
    """An error value for JSON: an unbounded one (inf) as the string "inf"."""
    return INF if isinstance(x, float) and math.isinf(x) and x > 0 else x


def _dec(x: Any) -> Any:
    return math.inf if x == INF else x


def _worst(a: float, b: float) -> float:
    """max() for errors that treats NaN as the worst value (max(0.0, nan) is 0.0)."""
    return math.inf if math.isnan(a) or math.isnan(b) else max(a, b)


# ---- plan objects --------------------------------------------------------------------------------

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

    def to_json(self) -> dict[str, Any]:
        return {"site": self.site, "status": self.status, "reason": self.reason, "spec": self.spec,
                "choice": None if self.choice is None else candidate_to_json(self.choice),
                "measured": None if self.measured is None else self.measured.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> "SitePlan":
        c = d.get("choice")
        return cls(d["site"], d["status"], None if c is None else candidate_from_json(c),
                   d.get("reason", ""), d.get("spec") or {}, Measured.from_json(d.get("measured")))


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
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
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
        return split_recipes(graph, sites, recipes, self)

    def add_approximate(self, gm: fx.GraphModule, exact: list[Recipe], approx: list[Recipe],
                        variants: Sequence[Sequence[Any]], padding_positions: Sequence[int] = ()):
        return add_approximate(gm, exact, approx, variants, self.max_error, padding_positions)

    def site(self, name: str) -> SitePlan | None:
        return next((s for s in self.sites if s.site == name), None)


# ---- errors --------------------------------------------------------------------------------------

def valid_rows(batch: Sequence[Any], padding_positions: Sequence[int]) -> torch.Tensor | None:
    """Real-token positions [B, S] of a batch, from its first key-padding input in the HF
    convention (integer/float, nonzero = real token), or None. Outputs at padded positions are
    meaningless to users (they pool with the same mask) yet an approximation moves them most:
    a padded query whose local window holds only padding keys sees nothing at all. Boolean masks
    are left alone (libraries disagree on whether True means keep or pad)."""
    for i in padding_positions:
        t = batch[i] if i < len(batch) else None
        if isinstance(t, torch.Tensor) and t.dim() == 2 and t.dtype != torch.bool:
            return t != 0
    return None


def _floats(x: Any, valid: torch.Tensor | None = None) -> torch.Tensor:
    flat, _ = torch.utils._pytree.tree_flatten(x)
    ts = []
    for t in flat:
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            continue
        if valid is not None and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(valid.shape):
            t = t[valid.to(t.device)]  # [B, S, ...] outputs: real tokens only
        ts.append(t.detach().double().reshape(-1))
    return torch.cat(ts) if ts else torch.zeros(1, dtype=torch.float64)


def compared(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unbounded, compared) masks of a reference `a` and a candidate `b` of one shape.

    unbounded: positions whose error is infinite: `b` non-finite where `a` is finite, or `a`
    +-Inf and `b` not the same infinity. compared: positions where both are finite. The rest
    are equal: `a` NaN (undefined output: a fully masked query row of the original; `b` NaN
    there too, or the zero attnopt's exact kernels put there, like validation), or `a` and
    `b` the same infinity."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    inf_a = torch.isinf(a)
    unbounded = (fa & ~fb) | (inf_a & (b != a))
    return unbounded, fa & fb


def rel_l2(ref: Any, new: Any, valid: torch.Tensor | None = None) -> float:
    """Relative L2 over every floating output (with `valid`: real-token rows of [B, S, ...] ones);
    inf when the candidate has NaN/Inf where the reference does not (see `compared`)."""
    a, b = _floats(ref, valid), _floats(new, valid)
    if a.shape != b.shape:
        return float("inf")
    unbounded, ok = compared(a, b)
    if bool(unbounded.any()):
        return float("inf")
    a, b = a[ok], b[ok]
    e = float((a - b).norm() / max(float(a.norm()), 1e-12))
    return math.inf if math.isnan(e) else e


def cosine(ref: Any, new: Any, valid: torch.Tensor | None = None) -> float:
    """Cosine similarity over every floating output; -1 (the worst) when the candidate has
    NaN/Inf where the reference does not (see `compared`)."""
    a, b = _floats(ref, valid), _floats(new, valid)
    if a.shape != b.shape:
        return 0.0
    unbounded, ok = compared(a, b)
    if bool(unbounded.any()):
        return -1.0
    a, b = a[ok], b[ok]
    c = float(torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-12))
    return -1.0 if math.isnan(c) else c


# ---- calibration inputs --------------------------------------------------------------------------

def generated_inputs(example: Sequence[Any], n: int, seed: int = 0) -> list[list[Any]]:
    """n batches like `example`: float tensors redrawn with the example's mean and std, integer
    ids redrawn in the example's range; 0/1 masks and bool tensors are kept."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        batch = []
        for x in example:
            if isinstance(x, torch.Tensor) and x.is_floating_point() and x.numel() > 1:
                std = float(x.float().std()) or 1.0
                y = torch.randn(x.shape, generator=g, dtype=torch.float32) * std + float(x.float().mean())
                batch.append(y.to(x.device, x.dtype))
            elif isinstance(x, torch.Tensor) and x.dtype in (torch.int64, torch.int32) and x.numel() > 1 \
                    and int(x.max()) > 1:
                lo, hi = int(x.min()), int(x.max())
                batch.append(torch.randint(lo, hi + 1, x.shape, generator=g, dtype=x.dtype).to(x.device))
            else:
                batch.append(x)
        out.append(batch)
    return out


def load_npz(path: str | os.PathLike, example: Sequence[Any]) -> list[list[Any]]:
    """Calibration batches from a .npz: arrays in stored order are the model's flat inputs; keys
    "b<i>_<anything>" group several batches (one batch per prefix). The file is data: no pickled
    objects, and every array must match its input's rank (else BadArgument, exit 2)."""
    from attnopt.errors import BadArgument, InputNotFound

    if not os.path.exists(path):
        raise InputNotFound(f"no such file: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):
            raise ValueError("not an .npz archive of named arrays")
        arrays_by_key = [(key, data[key]) for key in data.files]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise BadArgument(f"--calibration {path}: not a usable .npz of arrays ({first})") from None
    groups: dict[str, list] = {}
    for key, arr in arrays_by_key:
        if arr.dtype.kind not in "biuf":
            raise BadArgument(f"--calibration {path}: array {key!r} has dtype {arr.dtype}; "
                              "calibration inputs are numbers")
        prefix = key.split("_", 1)[0] if key.startswith("b") and "_" in key else ""
        groups.setdefault(prefix, []).append((key, torch.from_numpy(np.ascontiguousarray(arr))))
    if not groups:
        raise BadArgument(f"--calibration {path}: holds no arrays")
    batches = []
    for arrays in groups.values():
        if len(arrays) != len(example):
            raise BadArgument(f"--calibration {path}: {len(arrays)} arrays for a model with "
                              f"{len(example)} inputs")
        for (key, a), e in zip(arrays, example):
            if isinstance(e, torch.Tensor) and a.dim() != e.dim():
                raise BadArgument(f"--calibration {path}: array {key!r} has {a.dim()} dimensions, "
                                  f"its input has {e.dim()}")
        batches.append([a.to(e.dtype) if isinstance(e, torch.Tensor) else a for (_, a), e in zip(arrays, example)])
    return batches


def calibration_batches(example: Sequence[Any], calibration: Any = None, seed: int = 0) -> list[list[Any]]:
    if calibration is None:
        return [list(example)] + generated_inputs(example, CALIBRATION_BATCHES - 1, seed)
    if isinstance(calibration, (str, os.PathLike)):
        return load_npz(calibration, example)
    return [list(b) if isinstance(b, (list, tuple)) else [b] for b in calibration]


# ---- recipes -------------------------------------------------------------------------------------

def _constant_masks(graph: Graph, site: Site, r: Recipe) -> bool:
    from attnopt.patterns.values import user_inputs_reached

    return (not site.spec.mask.padding and not site.spec.score_mods and
            all(not user_inputs_reached(graph, m.node) for m in r.masks if m.literal is None))


def recipe_for(graph: Graph, site: Site, base: Recipe, c: Candidate) -> Recipe | str:
    """The base recipe carrying candidate `c`, or the reason it cannot."""
    v = c.variant
    if v.layout is None and c.window is None:
        return base
    if base.softcap is not None or base.normalizer != "softmax":
        return "softcap or non-softmax sites keep their kernel"
    if base.window is not None:
        return "the recipe already has a window"
    masks = base.masks
    if v.exact and _constant_masks(graph, site, base):
        masks = ()  # the mask allows exactly the variant's pairs
    if c.window is not None:
        return replace(base, window=tuple(c.window), masks=masks)
    if base.causal and not any(v.layout.causal):
        return "a causal site needs a causal layout"
    if c.heads and base.batch_rank != 2:
        return "per-head choices need a site with [B, H, S, D] operands"
    return replace(base, layout=v.layout, leading=c.leading, causal=False, masks=masks,
                   heads=tuple(c.heads))


# ---- planning ------------------------------------------------------------------------------------

def _program(model: Any, example_inputs: Any):
    from attnopt.frontends import fx as fx_front
    from attnopt.pipeline.optimize_torch import flat_example_inputs

    if isinstance(model, (str, os.PathLike)):
        from attnopt.frontends import _load_pt2_program

        model = _load_pt2_program(Path(model))
    ep = model if isinstance(model, torch.export.ExportedProgram) else \
        fx_front.export_module(model, example_inputs)
    gm = ep.module()
    return ep, gm, flat_example_inputs(ep, gm)


def other_time(gm: fx.GraphModule, sites: Sequence[Site], hw: HardwareProfile) -> float:
    """Roofline guess of the non-attention time: 2 * matrix parameters * tokens FLOPs."""
    params = sum(p.numel() for p in gm.parameters() if p.dim() >= 2)
    tokens = max((s.spec.batch * s.spec.q_len for s in sites
                  if isinstance(s.spec.batch, int) and isinstance(s.spec.q_len, int)), default=0)
    dt = str(next((s.spec.dtype for s in sites), "bf16") or "bf16")
    peak = hw.peak_flops.get("fp32" if "32" in dt else "bf16", max(hw.peak_flops.values()))
    return 2.0 * params * tokens / (peak * hw.mma_efficiency)


def _run(gm, inputs, names=()):
    from attnopt.pipeline.validate import run_captured

    return run_captured(gm, inputs, set(names))


def _check_runs(gm, batches) -> None:
    """The user's calibration batches are input: one that the model cannot run on (a guarded
    shape, a token id past the vocabulary) is a bad argument, said before any planning."""
    from attnopt.errors import BadArgument

    for i, b in enumerate(batches):
        try:
            with torch.no_grad():
                _run(gm, b)
        except Exception as e:  # noqa: BLE001 - whatever the model raises on this batch
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise BadArgument(f"calibration batch {i}: the model cannot run on it ({first})") from None


def make_plan(model: Any, example_inputs: Any = None, *, policy: str = "exact",
              max_error: float = 1e-2, target: str | None = None, calibration: Any = None) -> Plan:
    """Plan every attention site of a torch model (see the module header). target None: this
    machine's accelerator if it has a profile, else the CPU (codegen.device.local_target)."""
    from attnopt.frontends import fx as fx_front
    from attnopt.emit.fx import splice
    from attnopt.passes.detect import detect
    from attnopt.passes.rewrite import plan_all

    if policy not in POLICIES:
        raise BadPlan(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) \
            or not 0.0 < float(max_error) <= 1.0:
        raise BadPlan(f"max_error must be in (0, 1] (an end-to-end relative L2 budget), got {max_error!r}")
    if target is None:
        target = local_target()
    else:
        key = target.lower().replace("-", "_").replace(" ", "_") if isinstance(target, str) else None
        key = {"h100_sxm": "h100", "a100_sxm": "a100"}.get(key, key)  # get_profile's aliases
        if key not in TARGETS:
            raise BadPlan(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        target = key
    hw = get_profile(target)
    _ep, gm, inputs = _program(model, example_inputs)
    graph = fx_front.from_graph_module(gm, list(inputs), source="aten")
    sites, _rejected = detect(graph)
    recipes, reasons = plan_all(graph, sites)
    by_recipe = {r.site: r for r in recipes}
    site_by = {s.name: s for s in sites}

    chosen: dict[str, Candidate] = {}
    chosen_recipe: dict[str, Recipe] = {}
    base_time: dict[str, float] = {}
    why: dict[str, str] = dict(reasons)
    for s in sites:
        if not static(s.spec):
            why.setdefault(s.name, "symbolic sizes: no cost estimate")
            continue
        base_time[s.name] = baseline(s.spec, hw).time_s
        if s.name not in by_recipe:
            continue
        best, best_r = None, None
        for c in exact_candidates(s.spec, hw):
            r = recipe_for(graph, s, by_recipe[s.name], c)
            if isinstance(r, str):
                continue
            if best is None or c.time_s < best.time_s:
                best, best_r = c, r
        if best is not None:
            chosen[s.name], chosen_recipe[s.name] = best, best_r

    other = other_time(gm, sites, hw)
    dense_total = sum(base_time.values())

    def e2e_speedup(picks: dict[str, Candidate]) -> float:
        t = sum(picks[n].time_s if n in picks else base_time[n] for n in base_time)
        return (other + dense_total) / (other + t) if (other + t) > 0 else 1.0

    all_batches = calibration_batches(inputs, calibration)
    if calibration is not None:
        _check_runs(gm, all_batches)
    # approximations are never chosen on the batch they are checked on (step 4)
    batches, holdout = (all_batches[:-1], all_batches[-1:]) if len(all_batches) > 1 else (all_batches, [])
    positions = padding_positions(graph, sites)
    refs = [_run(gm, b, [s.output for s in sites]) for b in batches]
    valids = [valid_rows(b, positions) for b in batches]

    @functools.cache
    def held():
        """(batch, reference outputs, real rows) of the held-out batch, computed once on first use."""
        return [(b, _run(gm, b), valid_rows(b, positions)) for b in holdout]

    def measure(recs: dict[str, Recipe], site: str | None = None, on_holdout: bool = False):
        """(end-to-end rel L2, cosine, site rel L2, per-head site errors or None) on calibration
        (or on the held-out batch: end to end only)."""
        new_gm, nodes = splice(gm, list(recs.values()))
        worst_l2, worst_cos, worst_site = 0.0, 1.0, 0.0
        per_head = None
        for b, (ref, ref_vals), valid in (held() if on_holdout else zip(batches, refs, valids)):
            want = [nodes[site]] if site else []
            out, vals = _run(new_gm, b, want)
            worst_l2 = _worst(worst_l2, rel_l2(ref, out, valid))
            worst_cos = min(worst_cos, cosine(ref, out, valid))
            if site:
                a, o = ref_vals[site_by[site].output], vals[nodes[site]]
                worst_site = _worst(worst_site, rel_l2(a, o))
                if recs[site].batch_rank == 2 and not recs[site].heads:
                    e = _head_errors(a, o, recs[site].out_perm, valid)
                    per_head = e if per_head is None else np.maximum(per_head, e)
        return worst_l2, worst_cos, worst_site, per_head

    measured_site: dict[str, Measured] = {}
    walk: list[WalkStep] = []
    holdout_l2: float | None = None  # the final plan's error on the held-out batch
    if policy == "approx" and chosen_recipe:
        trials = []
        for name in chosen_recipe:
            s = site_by[name]
            worth = (1.0 - MIN_APPROX_SAVING) * chosen[name].time_s
            base = baseline(s.spec, hw)
            for c in approx_candidates(s.spec, hw):
                if c.time_s > worth:
                    continue
                r = recipe_for(graph, s, by_recipe[name], c)
                if isinstance(r, str):
                    continue
                l2, cos, se, errs = measure({**chosen_recipe, name: r}, name)
                trials.append((name, c, r, l2, cos, se))
                if l2 <= SAFETY * max_error or errs is None:
                    continue
                for sub in head_subsets(errs, resolve_dims(s.spec)["num_kv_heads"]):
                    ch = on_heads(c, base, sub, len(errs))
                    rh = recipe_for(graph, s, by_recipe[name], ch)
                    if isinstance(rh, str) or ch.time_s > worth:
                        continue
                    trials.append((name, ch, rh, *measure({**chosen_recipe, name: rh}, name)[:3]))
        saved = lambda t: chosen[t[0]].time_s - t[1].time_s  # noqa: E731
        trials.sort(key=lambda t: saved(t) / max(t[3], 1e-12), reverse=True)
        accepted: dict[str, Recipe] = {}
        acc_c: dict[str, Candidate] = {}
        history: list[tuple[str, Recipe, Candidate, Measured]] = []  # acceptances, in order
        for name, c, r, l2, cos, se in trials:
            step = len(walk) + 1
            picks = {**chosen, **acc_c, name: c}
            if name in accepted and saved((name, c)) <= saved((name, acc_c[name])):
                walk.append(WalkStep(step, name, c.name, saved((name, c)), l2, None, None,
                                     e2e_speedup(picks), False,
                                     "saves no more than the site's accepted approximation"))
                continue
            if l2 > SAFETY * max_error:
                walk.append(WalkStep(step, name, c.name, saved((name, c)), l2, None, None,
                                     e2e_speedup(picks), False, "alone exceeds the budget"))
                continue
            trial = {**chosen_recipe, **accepted, name: r}
            tl2, tcos = measure(trial)[:2] if accepted else (l2, cos)
            ok = tl2 <= SAFETY * max_error
            walk.append(WalkStep(step, name, c.name, saved((name, c)), l2, tl2, tcos,
                                 e2e_speedup(picks), ok, "" if ok else "combined error exceeds the budget"))
            if ok:  # a later, more aggressive choice at the same site replaces an earlier one
                accepted[name], acc_c[name] = r, c
                measured_site[name] = Measured(se, l2, cos)
                history.append((name, r, c, measured_site[name]))
        # step 4: the held-out batch; withdraw the latest acceptances while it is over budget. A
        # site whose withdrawn choice had replaced an earlier one gets that one back, and the
        # combination must then pass the calibration budget again too.
        restored = False
        while accepted and holdout:
            hl2, hcos = measure({**chosen_recipe, **accepted}, on_holdout=True)[:2]
            over = hl2 > SAFETY * max_error
            if not over and restored:
                cl2 = measure({**chosen_recipe, **accepted})[0]
                over = cl2 > SAFETY * max_error
            if not over:
                holdout_l2 = hl2  # the final plan's: not measured again below
                break
            name, _, c, m = history.pop()
            earlier = [h for h in history if h[0] == name]
            rest = {n: x for n, x in acc_c.items() if n != name}
            if earlier:
                rest[name] = earlier[-1][2]
            note = (f"withdrawn: the plan's error on the held-out batch, {hl2:.3g}, exceeds "
                    f"{SAFETY:g} x max_error {max_error:g}" if hl2 > SAFETY * max_error else
                    "withdrawn: with an earlier choice restored the calibration error exceeds the budget")
            if earlier:
                note += f"; the site's earlier choice {earlier[-1][2].name} is restored"
            walk.append(WalkStep(len(walk) + 1, name, c.name, saved((name, c)), m.e2e_rel_l2, hl2, hcos,
                                 e2e_speedup({**chosen, **rest}), False, note))
            if earlier:
                _, accepted[name], acc_c[name], measured_site[name] = earlier[-1]
                restored = True
            else:
                del accepted[name], acc_c[name], measured_site[name]
        chosen_recipe.update(accepted)
        chosen.update(acc_c)

    final_l2, final_cos = 0.0, 1.0
    if chosen_recipe:
        final_l2, final_cos = measure(chosen_recipe)[:2]
        if holdout and holdout_l2 is None:
            holdout_l2 = measure(chosen_recipe, on_holdout=True)[0]
    if holdout and holdout_l2 is None:
        holdout_l2 = 0.0  # nothing spliced: the model itself
    site_plans = []
    for s in sites:
        c = chosen.get(s.name)
        spec = s.spec.to_json()
        if c is None:
            site_plans.append(SitePlan(s.name, "kept", None, why.get(s.name, "no candidate"), spec))
        else:
            site_plans.append(SitePlan(s.name, "planned", c, "", spec, measured_site.get(s.name)))
    att = sum(chosen[n].time_s if n in chosen else base_time[n] for n in base_time)
    predicted = {"attention_dense_s": dense_total, "attention_s": att, "other_s": other,
                 "attention_speedup": dense_total / att if att else 1.0,
                 "end_to_end_speedup": e2e_speedup(chosen)}
    measured = {"rel_l2": final_l2, "cosine": final_cos, "calibration_batches": len(batches),
                "holdout_rel_l2": holdout_l2, "holdout_batches": len(holdout)}
    return Plan(policy, float(max_error), target, hw.name, tuple(site_plans), tuple(walk),
                predicted, measured)


def _head_errors(ref: torch.Tensor, new: torch.Tensor, out_perm: Sequence[int],
                 valid: torch.Tensor | None) -> np.ndarray:
    """Relative L2 per head of a site output (canonical [B, H, Sq, Dv] after undoing out_perm),
    at real-token query rows when `valid` [B, Sq] is known."""
    inv = [0] * len(out_perm)
    for i, p in enumerate(out_perm):
        inv[p] = i
    a = ref.detach().double().permute(inv)
    b = new.detach().double().permute(inv)
    if a.shape != b.shape:
        return np.full(a.shape[1], np.inf)
    unbounded, ok = compared(a, b)
    if valid is not None and tuple(valid.shape) == (a.shape[0], a.shape[2]):
        keep = valid.to(a.device)[:, None, :, None].expand_as(a)  # padded query rows: ignored
        unbounded, ok = unbounded & keep, ok & keep
    # a head whose output is NaN/Inf where the reference is not: infinite error (nan_to_num
    # used to zero it, ranking a NaN head best)
    bad_head = unbounded.transpose(0, 1).reshape(a.shape[1], -1).any(dim=1)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    a, b = torch.where(ok, a, zero), torch.where(ok, b, zero)
    num = (a - b).transpose(0, 1).reshape(a.shape[1], -1).norm(dim=1)
    den = a.transpose(0, 1).reshape(a.shape[1], -1).norm(dim=1).clamp_min(1e-12)
    err = (num / den).masked_fill(bad_head, math.inf)
    return err.masked_fill(torch.isnan(err), math.inf).cpu().numpy()


def head_subsets(errors: np.ndarray, num_kv_heads: int,
                 shares: Sequence[float] = HEAD_SHARES) -> list[tuple[int, ...]]:
    """Head subsets to try: the lowest-error `share` of the heads, whole KV groups at a time
    (a group's error is its worst head's), each subset a proper, non-empty one."""
    H = len(errors)
    if num_kv_heads <= 0 or H % num_kv_heads:
        return []
    g = H // num_kv_heads
    group_err = errors.reshape(num_kv_heads, g).max(axis=1)
    order = np.argsort(group_err, kind="stable")
    out: list[tuple[int, ...]] = []
    for share in shares:
        n = int(round(num_kv_heads * share))
        if not 0 < n < num_kv_heads:
            continue
        sub = tuple(sorted(int(grp) * g + j for grp in order[:n] for j in range(g)))
        if sub not in out:
            out.append(sub)
    return out


# ---- applying a plan -----------------------------------------------------------------------------

def split_recipes(graph: Graph, sites: Sequence[Site], recipes: Sequence[Recipe], plan: Plan
                  ) -> tuple[list[Recipe], list[Recipe], dict[str, str]]:
    """(exact recipes, approximate recipes in plan walk order, variant label per site)."""
    plan = Plan.coerce(plan)  # a plan is input, however it arrived (optimize_torch takes objects)
    check_plan_fits(plan, sites)  # every choice fits its site, before anything is spliced
    site_by = {s.name: s for s in sites}
    exact, approx, labels = [], [], {}
    for r in recipes:
        sp = plan.site(r.site)
        if sp is None or sp.choice is None:
            exact.append(r)
            continue
        new = recipe_for(graph, site_by[r.site], r, sp.choice)
        if isinstance(new, str):
            exact.append(r)
            continue
        labels[r.site] = sp.choice.name
        (exact if sp.choice.exact else approx).append(new)
    return exact, approx, labels


def add_approximate(gm: fx.GraphModule, exact: list[Recipe], approx: list[Recipe],
                    variants: Sequence[Sequence[Any]], max_error: float,
                    padding_positions: Sequence[int] = ()):
    """Splice the approximate recipes on top of the validated exact ones; drop the last added
    while the end-to-end relative L2 on `variants` exceeds max_error. Returns
    (module, kept approximate recipes, rel_l2, reverted [(site, rel_l2)])."""
    from attnopt.emit.fx import splice

    kept = list(approx)
    reverted = []
    refs = [_run(gm, b)[0] for b in variants]
    valids = [valid_rows(b, padding_positions) for b in variants]
    while kept:
        new_gm, _ = splice(gm, exact + kept)
        l2 = functools.reduce(_worst, (rel_l2(ref, _run(new_gm, b)[0], valid)
                                       for ref, b, valid in zip(refs, variants, valids)), 0.0)
        if l2 <= max_error:
            return new_gm, kept, l2, reverted
        reverted.append((kept[-1].site, l2))
        kept.pop()
    new_gm = splice(gm, exact)[0] if exact else gm
    return new_gm, [], 0.0, reverted


def plan_model(model: Any, example_inputs: Any = None, *, policy: str = "exact",
               max_error: float = 1e-2, target: str | None = None, calibration: Any = None) -> Plan:
    """`attnopt.plan(...)`: see make_plan."""
    return make_plan(model, example_inputs, policy=policy, max_error=max_error, target=target,
                     calibration=calibration)
