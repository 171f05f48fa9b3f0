"""Plan the replacement of each site by one call of `attnopt::attention`, format-neutrally.

Each pattern family builds its own sites' recipes (patterns/registry.py; the `Recipe` type and
the rules every recipe obeys are in patterns/recipe.py); this pass asks the family that owns a
site's details, and turns masks proven to be a sliding window into the op's window arguments.
Recipes are lowered into neutral steps by passes/lower.py and emitted by emit/fx.py and
emit/onnx.py.
"""
from __future__ import annotations

from dataclasses import replace

import math

from attnopt.ir import Graph, Site
from attnopt.passes.masks import exact_key_padding
from attnopt.patterns.recipe import MaskTerm, Operand, Recipe, structural_masks
from attnopt.patterns.registry import family_of

__all__ = ["MaskTerm", "Operand", "Recipe", "key_padding_flags", "plan", "plan_all", "structural_windows"]


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
        out.append(replace(r, masks=(), **_flags(m)))
    return out


def _flags(m) -> dict:
    """The op's causal / window arguments for a causal or sliding-window MaskSpec (the same pairs)."""
    if m.kind == "causal":
        return dict(causal=True, causal_alignment=m.alignment, window=None)
    if m.right == 0:  # causal band: j - i - offset in [-left, 0] with the mask's own alignment
        return dict(causal=True, causal_alignment=m.alignment, window=(m.left, 0))
    # masks.py measures the band from the bottom-right diagonal (offset Skv - Sq)
    return dict(causal=False, causal_alignment="bottom_right", window=(m.left, m.right))


def key_padding_flags(graph: Graph, sites: list[Site], recipes: list[Recipe], windows: bool = True
                      ) -> list[Recipe]:
    """Recipes whose masks are exactly a causal / sliding-window pattern AND a key-padding input
    (HF's attention_mask on a padded batch; passes/masks.exact_key_padding proves it on every row)
    get the pattern as the op's flags and the input, viewed [B, 1, 1, Skv] (nonzero attends), as the
    only mask: the same pairs attend, but the kernels see the structure, so tiles above the diagonal
    or outside the window are skipped and no [B, 1, Sq, Skv] mask is built or read (it cost a padded
    causal batch twice the work of the unpadded one). Sites with a layout, projections, merged heads
    or symbolic lengths keep their masks; so do windowed ones unless `windows` (the ONNX splice has
    no window form)."""
    by_name = {s.name: s for s in sites}
    out = []
    for r in recipes:
        site = by_name.get(r.site)
        spec = site.spec if site is not None else None
        rank = r.masks[0].rank if r.masks else 0
        if (spec is None or (not windows and spec.mask.kind != "causal") or r.causal or r.window is not None or r.layout is not None or r.split_heads
                or r.projections is not None or r.dead_rows_mean_v or not isinstance(spec.q_len, int)
                or not isinstance(spec.kv_len, int) or not 1 <= r.batch_rank <= 2
                or any(t.rank != rank for t in r.masks) or rank != r.batch_rank + 2):
            out.append(r)
            continue
        key = exact_key_padding(graph, spec.mask, list(r.masks), spec.q_len, spec.kv_len)
        if key is None:
            out.append(r)
            continue
        # [B, Skv] at the score rank is [1, ..., B, Skv]: move B to the front
        perm = (rank - 2,) + tuple(range(rank - 2)) + (rank - 1,)
        term = MaskTerm(node=key, how="keep", fill=-math.inf, factor=1.0, rank=rank, perm=perm)
        out.append(replace(r, masks=(term,), **_flags(spec.mask)))
    return out
