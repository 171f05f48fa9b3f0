"""Detection: run every pattern family at its anchors, analyze masks and grids, name the sites."""
from __future__ import annotations

from dataclasses import replace

from attnopt.ir import AttentionSpec, Graph, Rejection, Site
from attnopt.passes.grid import infer_layout
from attnopt.passes.masks import MaskAnalysis, analyze_masks
from attnopt.patterns.match import Match
from attnopt.patterns.registry import FAMILIES



def detect(graph: Graph) -> tuple[list[Site], list[Rejection]]:
    matches: list[Match] = []
    rejected: list[Rejection] = []
    for family in FAMILIES:
        for anchor in family.anchors(graph):
            result = family.match(graph, anchor)
            if result is None:
                continue
            if isinstance(result, Rejection):
                rejected.append(result)
            else:
                matches.append(result)
    order = {n: i for i, n in enumerate(graph.nodes())}
    matches.sort(key=lambda m: order[m.output])
    mask_cache: dict = {}
    grid_cache: dict = {}
    sites, names = [], set()
    for m in matches:
        key = (m.mask_operands, m.score_axes, m.structural_causal, m.window, m.causal_alignment,
               m.softcap, m.key_padding_input or "")
        try:
            if key not in mask_cache:
                mask_cache[key] = analyze_masks(graph, m)
        except Exception as e:  # noqa: BLE001 - a site we cannot analyze is rejected, not fatal
            rejected.append(Rejection(m.anchor, f"mask analysis failed: {type(e).__name__}: {e}",
                                      m.pattern))
            continue
        masks: MaskAnalysis = mask_cache[key]
        grid, grid_reason = infer_layout(graph, m.q, m.q_len, grid_cache)
        spec = AttentionSpec(
            normalizer=m.normalizer, batch=m.batch, num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads, q_len=m.q_len, kv_len=m.kv_len, head_dim=m.head_dim,
            v_head_dim=m.v_head_dim, scale=m.scale, mask=masks.mask, score_mods=masks.score_mods,
            token_grid=grid, dtype=m.dtype, layout=m.layout, token_grid_reason=grid_reason)
        name = _unique(_site_name(graph, m, len(sites)), names)
        details = replace(m.details, mask_operands=m.mask_operands, mask_reason=masks.reason)
        sites.append(Site(
            name=name, spec=spec, output=m.output, q=m.q, k=m.k, v=m.v,
            mask=tuple(op.node for op in m.mask_operands), nodes=m.nodes, pattern=m.pattern,
            details=details))
    return sites, rejected


def _site_name(graph: Graph, m: Match, index: int) -> str:
    scope = graph.attr(m.anchor, "scope") or graph.attr(m.output, "scope") or ""
    return scope or f"attention_{index}"


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 2
    while out in taken:
        out = f"{name}#{i}"
        i += 1
    taken.add(out)
    return out
