"""Token grids of vision and video models.

A patch embedding is a convolution whose output [B, C, *grid] is flattened into the sequence;
a site whose sequence length is prod(grid) plus a few leading tokens (class, register or
distillation tokens) and whose q descends from that convolution attends over that grid.
"""
from __future__ import annotations

import networkx as nx

from attnopt.ir import Graph, TokenGrid

MAX_LEADING_TOKENS = 8
_CONV_NATIVE = ("conv", "Conv", "convolution")


def find_patch_grids(graph: Graph) -> list[tuple[str, tuple[int, ...]]]:
    """(conv node, spatial output shape) for every convolution with a static 2-D/3-D output."""
    grids = []
    for n in graph.nodes():
        native = str(graph.attr(n, "native") or "")
        if graph.op(n) != "other" or not any(c in native for c in _CONV_NATIVE):
            continue
        shape = graph.shape(n)
        if shape is None or len(shape) not in (4, 5):
            continue
        spatial = tuple(shape[2:])
        if all(isinstance(d, int) and d > 1 for d in spatial):
            grids.append((n, spatial))
    return grids


def assign_grid(graph: Graph, q_node: str | None, q_len, cache: dict) -> TokenGrid | None:
    if q_node is None or not isinstance(q_len, int):
        return None
    if "grids" not in cache:
        cache["grids"] = [(n, s, nx.descendants(graph.g, n)) for n, s in find_patch_grids(graph)]
    for _conv, spatial, below in cache["grids"]:
        n = 1
        for d in spatial:
            n *= d
        leading = q_len - n
        if 0 <= leading <= MAX_LEADING_TOKENS and q_node in below:
            return TokenGrid(shape=spatial, leading=leading)
    return None
