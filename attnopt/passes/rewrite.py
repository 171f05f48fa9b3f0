"""Plan the replacement of each site by one call of `attnopt::attention`, format-neutrally.

Each pattern family builds its own sites' recipes (patterns/registry.py; the `Recipe` type and
the rules every recipe obeys are in patterns/recipe.py); this pass asks the family that owns a
site's details, and turns masks proven to be a sliding window into the op's window arguments.
Recipes are lowered into neutral steps by passes/lower.py and emitted by emit/fx.py and
emit/onnx.py.
"""
from __future__ import annotations

from dataclasses import replace

from attnopt.ir import Graph, Site
from attnopt.patterns.recipe import MaskTerm, Operand, Recipe, structural_masks
from attnopt.patterns.registry import family_of

__all__ = ["MaskTerm", "Operand", "Recipe", "plan", "plan_all", "structural_windows"]


def plan_all(graph: Graph, sites: list[Site]) -> tuple[list[Recipe], dict[str, str]]:
    """Recipes for the sites that can be rewritten, and the reason for each that cannot."""
    recipes, reasons = [], {}
    for s in sites:
        r = plan(graph, s)
        if isinstance(r, str):
            reasons[s.name] = r
        else:
            recipes.append(r)
    return recipes, reasons


def plan(graph: Graph, site: Site) -> Recipe | str:
    """A recipe for the site, or the reason it cannot be rewritten exactly."""
    return family_of(site.details).recipe(graph, site)


def structural_windows(graph: Graph, sites: list[Site], recipes: list[Recipe]) -> list[Recipe]:
    """Recipes whose masks the analysis proved to be exactly a sliding window (evaluated: every
    allowed pair is in the band and every pair of the band is allowed), depend on no user input and
    carry no padding, with those masks replaced by the op's window arguments: the same pairs attend,
    and on CPU the exact window kernel computes only each query run's keys instead of the dense
    masked product (HF Mistral, 4K tokens, window 512: see bench/sliding_window_model.py). For
    the torch splice only: the ONNX splice has no window form and keeps the mask."""
    by_name = {s.name: s for s in sites}
    out = []
    for r in recipes:
        site = by_name.get(r.site)
        m = site.spec.mask if site is not None else None
        if (m is None or m.kind != "sliding_window" or r.window is not None or r.causal or r.layout is not None
                or not structural_masks(graph, site.spec, list(r.masks))):
            out.append(r)
            continue
        if m.right == 0:  # causal band: j - i - offset in [-left, 0] with the mask's own alignment
            out.append(replace(r, masks=(), causal=True, causal_alignment=m.alignment, window=(m.left, 0)))
        else:  # masks.py measures the band from the bottom-right diagonal (offset Skv - Sq)
            out.append(replace(r, masks=(), causal=False, causal_alignment="bottom_right",
                               window=(m.left, m.right)))
    return out
