"""Applying choices: a candidate onto a site's recipe, and a whole plan onto a graph.

`recipe_for` is shared by the search (each candidate it measures) and by applying a finished
plan (`split_recipes`, `add_approximate`: what Plan.split / Plan.add_approximate, the pipeline's
PlanApplication, run), so a plan applies exactly the recipes it was measured with.
"""
from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, Sequence

import torch.fx as fx

from attnopt.cost.variants import Candidate
from attnopt.ir import Graph, Site
from attnopt.passes.rewrite import Recipe
from attnopt.pipeline.validate import run_captured
from attnopt.planner.metrics import rel_l2, valid_rows, worst
from attnopt.planner.schema import check_plan_fits


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
    return replace(base, layout=v.layout, leading=c.leading, trailing=c.trailing, causal=False, masks=masks,
                   heads=tuple(c.heads))


def split_recipes(graph: Graph, sites: Sequence[Site], recipes: Sequence[Recipe], plan: Any
                  ) -> tuple[list[Recipe], list[Recipe], dict[str, str]]:
    """(exact recipes, approximate recipes in plan walk order, variant label per site) of a
    checked planner.plan.Plan (Plan.split coerces it first; not imported here: plan.py imports
    this module)."""
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
    refs = [run_captured(gm, b, set())[0] for b in variants]
    valids = [valid_rows(b, padding_positions) for b in variants]
    while kept:
        new_gm, _ = splice(gm, exact + kept)
        l2 = functools.reduce(worst, (rel_l2(ref, run_captured(new_gm, b, set())[0], valid)
                                      for ref, b, valid in zip(refs, variants, valids)), 0.0)
        if l2 <= max_error:
            return new_gm, kept, l2, reverted
        reverted.append((kept[-1].site, l2))
        kept.pop()
    new_gm = splice(gm, exact)[0] if exact else gm
    return new_gm, [], 0.0, reverted
