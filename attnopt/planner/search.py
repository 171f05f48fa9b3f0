"""Making a plan: choose a variant per attention site from the cost model and measured error.

For each site of a torch model (nn.Module, ExportedProgram, .pt2):
  1. exact candidates (cost/variants.py): the site's own kernel and any sparsity its mask already
     implies; the cheapest on the target is taken (they change nothing numerically).
  2. policy "approx": approximate GNA candidates predicted to save at least MIN_APPROX_SAVING of
     their site's exact time; each one is spliced ALONE into the model and its error measured on
     calibration inputs (calibration.py; per-site output, end-to-end relative L2 and cosine:
     measure.py). One whose error alone is over budget is also tried on subsets of the site's
     heads (heads.py).
  3. the greedy walk over them, then the hold-out check (walk.py).
A site's token layout (the grid approximate candidates lay out) is the inferred one unless the
caller gives one (`layout=`, planner/layout.py); every site left exact says why. With
`time_kernels` each site's chosen kernel is timed on this machine beside its exact kernel
(timing.py), so that the report shows measured speedups beside the predicted ones.

Predicted end-to-end speedup = (other + attention dense) / (other + attention planned), where
"other" is the non-attention time. For the cpu target (this machine) it is measured
(forward_time.py: the share s of one forward left when every site's output is replaced by an
uninitialized tensor, timed in alternating rounds) and expressed in the cost model's units, other = s / (1 - s) x the predicted dense attention
time, so that the prediction is this machine's attention share with the cost model's attention
speedup; elsewhere (and where the measurement fails) it is 2 * (matrix parameters) * tokens FLOPs
at the target's peak * mma efficiency (a roofline guess that leaves out elementwise ops: it
predicted 0.077 of a Wan-style forward on CPU where 0.15 is measured), and never less than that.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx

from attnopt.codegen.device import local_target
from attnopt.cost.hardware import HardwareProfile, get_profile
from attnopt.cost.roofline import resolve_dims
from attnopt.cost.variants import (Candidate, approx_candidates, approx_refusal, baseline, describe_grid,
                                   exact_candidates, on_heads, static)
from attnopt.ir import Graph, Site
from attnopt.passes.rewrite import Recipe
from attnopt.pipeline.validate import padding_positions
from attnopt.planner.apply import recipe_for
from attnopt.planner.calibration import calibration_batches, check_runs
from attnopt.planner.forward_time import other_share
from attnopt.planner.heads import head_subsets
from attnopt.planner.layout import TokenLayout, assign_layouts, parse_layouts
from attnopt.planner.measure import Measure
from attnopt.planner.plan import Plan, SitePlan
from attnopt.planner.schema import POLICIES, TARGETS, BadPlan
from attnopt.planner.timing import time_sites
from attnopt.planner.walk import SAFETY, Trial, greedy_walk

# An approximation must save at least this share of its site's predicted exact time: error for a
# 1% gain is a bad trade (a 4K Llama plan took a window on 1 of 4 heads for a predicted 0.7%).
MIN_APPROX_SAVING = 0.05


def _program(model: Any, example_inputs: Any):
    from attnopt.frontends import fx as fx_front
    from attnopt.pipeline.optimize_torch import flat_example_inputs

    if isinstance(model, (str, os.PathLike)):
        from attnopt.frontends import load_pt2_program

        model = load_pt2_program(Path(model))
    # at the example's sizes: the cost model and the measurements need them (optimize with a
    # plan exports the same way)
    ep = model if isinstance(model, torch.export.ExportedProgram) else \
        fx_front.export_module(model, example_inputs, dynamic=False)
    gm = ep.module()
    return ep, gm, flat_example_inputs(ep, gm)


def _checked_target(policy: str, max_error: Any, target: str | None) -> str:
    """The target's profile name after checking the arguments (BadPlan, exit 2, otherwise)."""
    if policy not in POLICIES:
        raise BadPlan(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) \
            or not 0.0 < float(max_error) <= 1.0:
        raise BadPlan(f"max_error must be in (0, 1] (an end-to-end relative L2 budget), got {max_error!r}")
    if target is None:
        return local_target()
    key = target.lower().replace("-", "_").replace(" ", "_") if isinstance(target, str) else None
    key = {"h100_sxm": "h100", "a100_sxm": "a100"}.get(key, key)  # get_profile's aliases
    if key not in TARGETS:
        raise BadPlan(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    if key == "cuda" and local_target() != "cuda":
        raise BadPlan(f"target 'cuda' is this machine's GPU described by its properties, but this "
                      f"machine's target is {local_target()!r}")
    return key


def other_time(gm: fx.GraphModule, sites: Sequence[Site], hw: HardwareProfile) -> float:
    """Roofline guess of the non-attention time: 2 * matrix parameters * tokens FLOPs."""
    params = sum(p.numel() for p in gm.parameters() if p.dim() >= 2)
    tokens = max((s.spec.batch * s.spec.q_len for s in sites
                  if isinstance(s.spec.batch, int) and isinstance(s.spec.q_len, int)), default=0)
    dt = str(next((s.spec.dtype for s in sites), "bf16") or "bf16")
    peak = hw.peak_flops.get("fp32" if "32" in dt else "bf16", max(hw.peak_flops.values()))
    return 2.0 * params * tokens / (peak * hw.mma_efficiency)


def _approx_trials(graph: Graph, site_by: dict[str, Site], by_recipe: dict[str, Recipe],
                   chosen: dict[str, Candidate], chosen_recipe: dict[str, Recipe],
                   hw: HardwareProfile, measure: Measure, max_error: float,
                   no_trial: dict[str, str], given: dict[str, TokenLayout]) -> list[Trial]:
    """Steps 2 and per-head: every approximate candidate worth its error, measured alone.
    `no_trial` receives, for each site that got no trial, the reason; `given`: the sites whose
    token layout is the user's."""
    trials = []
    for name in chosen_recipe:
        s = site_by[name]
        worth = (1.0 - MIN_APPROX_SAVING) * chosen[name].time_s
        base = baseline(s.spec, hw)
        cands = approx_candidates(s.spec, hw, given=name in given)
        no_trial[name] = approx_refusal(s.spec) or _nothing_cheaper(s, cands, chosen[name], hw,
                                                                    name in given)
        for c in cands:
            if c.time_s > worth:
                continue
            r = recipe_for(graph, s, by_recipe[name], c)
            if isinstance(r, str):
                no_trial[name] = f"no approximate candidate: {r}"
                continue
            no_trial.pop(name, None)
            l2, cos, se, errs = measure({**chosen_recipe, name: r}, name)
            trials.append(Trial(name, c, r, l2, cos, se))
            if l2 <= SAFETY * max_error or errs is None:
                continue
            for sub in head_subsets(errs, resolve_dims(s.spec)["num_kv_heads"]):
                ch = on_heads(c, base, sub, len(errs))
                rh = recipe_for(graph, s, by_recipe[name], ch)
                if isinstance(rh, str) or ch.time_s > worth:
                    continue
                trials.append(Trial(name, ch, rh, *measure({**chosen_recipe, name: rh}, name)[:3]))
    return trials


def _nothing_cheaper(s: Site, cands: list[Candidate], exact: Candidate, hw: HardwareProfile,
                     given: bool) -> str:
    """Why a site that may be approximated got no candidate worth trying."""
    grid = describe_grid(s.spec, given)
    if not cands:
        return (f"no approximate candidate: no GNA layout over {grid} is predicted faster than "
                f"the exact kernel on {hw.name}")
    saved = 1.0 - min(c.time_s for c in cands) / exact.time_s if exact.time_s else 0.0
    return (f"no approximate candidate: over {grid} the best GNA layout is predicted to save "
            f"{max(saved, 0.0):.0%} of the exact kernel's time on {hw.name} (an approximation "
            f"must save at least {MIN_APPROX_SAVING:.0%})")


def _with_layouts(sites: list[Site], given: dict[str, TokenLayout]) -> list[Site]:
    """The sites, each given layout replacing the inferred token grid."""
    return [replace(s, spec=replace(s.spec, token_grid=given[s.name].token_grid(), token_grid_reason=""))
            if s.name in given else s for s in sites]


def make_plan(model: Any, example_inputs: Any = None, *, policy: str = "exact",
              max_error: float = 1e-2, target: str | None = None, calibration: Any = None,
              layout: Any = None, time_kernels: bool = False) -> Plan:
    """Plan every attention site of a torch model (see the module header). target None: this
    machine's accelerator if it has a profile, else the CPU (codegen.device.local_target).
    layout: token layouts that override the inferred ones (planner/layout.py: a SPEC string such
    as "text:512,grid:64x64" or "blocks.0=cls:1,grid:16x16", a list of them, or a dict {site name
    | sequence length | None (every site): segments}); BadArgument (exit 2) when malformed or
    when they do not fit the model's sites. time_kernels: time each site's chosen kernel and
    its exact kernel on this machine (planner/timing.py; the target must be this machine)."""
    from attnopt.frontends import fx as fx_front
    from attnopt.passes.detect import detect
    from attnopt.passes.rewrite import plan_all

    target = _checked_target(policy, max_error, target)
    request = parse_layouts(layout)  # malformed layouts fail before the model is exported
    if time_kernels and target != local_target():
        raise BadPlan(f"time_kernels (--time) times kernels on this machine ({local_target()}), "
                      f"but the target is {target}: plan for {local_target()} to time")
    hw = get_profile(target)
    _ep, gm, inputs = _program(model, example_inputs)
    graph = fx_front.from_graph_module(gm, list(inputs), source="aten")
    sites, _rejected = detect(graph)
    given = assign_layouts(request, sites)
    sites = _with_layouts(sites, given)
    recipes, reasons = plan_all(graph, sites)
    by_recipe = {r.site: r for r in recipes}
    site_by = {s.name: s for s in sites}

    # step 1: the cheapest exact candidate per site
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
    share = other_share(gm, inputs, sites) \
        if target == "cpu" and base_time else None
    if share is not None and share < 1.0:
        other = max(other, dense_total * share / (1.0 - share))

    def e2e_speedup(picks: dict[str, Candidate]) -> float:
        t = sum(picks[n].time_s if n in picks else base_time[n] for n in base_time)
        return (other + dense_total) / (other + t) if (other + t) > 0 else 1.0

    all_batches = calibration_batches(inputs, calibration)
    if calibration is not None:
        check_runs(gm, all_batches)
    # approximations are never chosen on the batch they are checked on (walk.py)
    batches, holdout = (all_batches[:-1], all_batches[-1:]) if len(all_batches) > 1 else (all_batches, [])
    measure = Measure(gm, sites, batches, holdout, padding_positions(graph, sites))

    measured_site = {}
    no_trial: dict[str, str] = {}  # approx policy: why a site got no approximate trial
    walk = []
    holdout_l2: float | None = None  # the final plan's error on the held-out batch
    if policy == "approx" and chosen_recipe:
        trials = _approx_trials(graph, site_by, by_recipe, chosen, chosen_recipe, hw, measure,
                                max_error, no_trial, given)
        walked = greedy_walk(trials, chosen, chosen_recipe, measure, e2e_speedup, max_error)
        measured_site, walk, holdout_l2 = walked.measured, walked.steps, walked.holdout_l2
        chosen_recipe.update(walked.recipes)
        chosen.update(walked.choices)

    final_l2, final_cos = 0.0, 1.0
    if chosen_recipe:
        final_l2, final_cos = measure(chosen_recipe)[:2]
        if holdout and holdout_l2 is None:
            holdout_l2 = measure(chosen_recipe, on_holdout=True)[0]
    if holdout and holdout_l2 is None:
        holdout_l2 = 0.0  # nothing spliced: the model itself
    timed = time_sites({s.name: s.spec for s in sites}, chosen, "cpu" if target == "cpu" else "cuda") \
        if time_kernels else {}
    site_plans = []
    for s in sites:
        c = chosen.get(s.name)
        spec = s.spec.to_json()
        tl = given.get(s.name) or (None if s.spec.token_grid is None else TokenLayout.inferred(s.spec.token_grid))
        if c is None:
            site_plans.append(SitePlan(s.name, "kept", None, why.get(s.name, "no candidate"), spec,
                                       token_layout=tl))
            continue
        # a site left exact says why: it cannot be approximated, approximations were not asked
        # for, no candidate was worth trying, or none held within the budget
        if not c.exact:
            why_exact = ""
        elif policy != "approx":
            why_exact = approx_refusal(s.spec) or "policy exact: approximations were not considered"
        else:
            why_exact = no_trial.get(s.name, f"no approximation held within max_error {max_error:g}")
        site_plans.append(SitePlan(s.name, "planned", c, why_exact, spec, measured_site.get(s.name), tl,
                                   timed.get(s.name)))
    att = sum(chosen[n].time_s if n in chosen else base_time[n] for n in base_time)
    predicted = {"attention_dense_s": dense_total, "attention_s": att, "other_s": other,
                 "attention_speedup": dense_total / att if att else 1.0,
                 "end_to_end_speedup": e2e_speedup(chosen)}
    if share is not None:
        predicted["other_share_measured"] = share
    measured = {"rel_l2": final_l2, "cosine": final_cos, "calibration_batches": len(batches),
                "holdout_rel_l2": holdout_l2, "holdout_batches": len(holdout)}
    if timed:  # measured beside predicted: the timed sites' exact kernels over their chosen ones
        measured["attention_speedup"] = (sum(t.baseline_time_s for t in timed.values()) / max(
            sum(t.baseline_time_s / t.speedup for t in timed.values()), 1e-12))
        measured["timed_sites"] = len(timed)
    return Plan(policy, float(max_error), target, hw.name, tuple(site_plans), tuple(walk),
                predicted, measured)


def plan_model(model: Any, example_inputs: Any = None, *, policy: str = "exact",
               max_error: float = 1e-2, target: str | None = None, calibration: Any = None,
               layout: Any = None, time_kernels: bool = False) -> Plan:
    """`attnopt.plan(...)`: see make_plan."""
    return make_plan(model, example_inputs, policy=policy, max_error=max_error, target=target,
                     calibration=calibration, layout=layout, time_kernels=time_kernels)
