"""Token layouts of vision, video and diffusion models.

A site's sequence is read as ordered segments (ir/spec.py `TokenGrid.segments`): grid segments
(the tokens of an image or video, row-major) and global segments (text, class, register tokens)
at the front, the back or between, adding up to the sequence length. The segments come from a
backward trace of q's sequence axis (passes/token_trace.py): a patch embedding (a conv's spatial
output flattened, or patches packed by reshape/permute before a Linear) or rotary position ids
(Flux's img_ids) give grids; `torch.cat` along the sequence (text first in Flux and CogVideoX,
image first in SD3 and HunyuanVideo) gives their order.

Where the trace does not reach the sequence's origin (an op it does not know on the way), the
older rule applies: q descends from a convolution whose output [B, C, *grid] has prod(grid)
tokens plus at most MAX_LEADING_TOKENS leading ones. A site gets no layout, with a reason
(`AttentionSpec.token_grid_reason`), when its segments do not add up to its length or hold no grid.
"""
from __future__ import annotations

import math

import networkx as nx

from attnopt.ir import Graph, TokenGrid
from attnopt.ir.spec import TokenSegment
from attnopt.passes.token_trace import Run, TokenTrace

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
    """The token layout of a site whose queries are `q_node` (None when there is none)."""
    return infer_layout(graph, q_node, q_len, cache)[0]


def infer_layout(graph: Graph, q_node: str | None, q_len, cache: dict) -> tuple[TokenGrid | None, str]:
    """(layout, reason it is None). `cache` is shared by the sites of one graph."""
    if q_node is None:
        return None, "no query node"
    if not isinstance(q_len, int):
        return None, f"symbolic sequence length {q_len}"
    trace = cache.get("trace") or TokenTrace(graph)
    cache["trace"] = trace
    layout, reason = _traced(graph, trace, q_node, q_len)
    if layout is not None or reason:
        return layout, reason
    old = _conv_rule(graph, q_node, q_len, cache)
    if old is not None:
        return old, ""
    return None, (f"no token layout: the origin of {q_node}'s {q_len} tokens is not traced "
                  "(an op on the way the trace does not know) and no patch convolution feeds it")


def _seq_axes(graph: Graph, q_node: str, q_len: int) -> list[int]:
    shape = graph.shape(q_node)
    if shape is None:
        return []
    # the rows of q @ k^T: the axis before the head dim; where that is not the length (an
    # [S, B, E] MultiheadAttention), another axis of that length, never the head dim itself
    r = len(shape)
    if r >= 2 and shape[r - 2] == q_len:
        return [r - 2]
    return [a for a in range(r - 1) if shape[a] == q_len]


def _traced(graph: Graph, trace: TokenTrace, q_node: str, q_len: int) -> tuple[TokenGrid | None, str]:
    """A layout from the trace, or (None, reason) when the trace proves there is none, or
    (None, "") when it does not know."""
    reason = ""
    for ax in _seq_axes(graph, q_node, q_len):
        runs = trace.runs(q_node, ax)
        if runs is None:
            continue
        layout, why = layout_from_runs(runs, q_len)
        if layout is not None:
            return layout, ""
        reason = reason or why
    return None, reason


def layout_from_runs(runs: tuple[Run, ...], q_len: int) -> tuple[TokenGrid | None, str]:
    """Segments from traced runs: grids with two or more dims above 1 are grid segments, every
    other run is global; they must add up to `q_len` and hold at least one grid."""
    segs: list[TokenSegment] = []
    for r in runs:
        if r.kind in ("cut", "conflict"):
            what = "a slice keeps part of a grid" if r.kind == "cut" else "two readings disagree"
            return None, f"no token layout: {what} ({r.source}) in {describe_runs(runs)}"
        dims = tuple(d for d in r.dims if d > 1)
        if r.kind == "grid" and 2 <= len(dims) <= 3:
            segs.append(TokenSegment("grid", math.prod(dims), dims, r.source))
        elif segs and segs[-1].kind == "global":
            segs[-1] = TokenSegment("global", segs[-1].length + r.length, (), segs[-1].source)
        else:
            segs.append(TokenSegment("global", r.length, (), r.source))
    total = sum(s.length for s in segs)
    if total != q_len:
        return None, (f"no token layout: the segments {describe_runs(runs)} add up to {total} tokens, "
                      f"not the sequence's {q_len}")
    if not any(s.kind == "grid" for s in segs):
        return None, (f"no token layout: no grid among the segments {describe_runs(runs)} (no patch "
                      "embedding or position ids lay these tokens on a grid)")
    return TokenGrid.from_segments(segs), ""


def describe_runs(runs: tuple[Run, ...]) -> str:
    def one(r: Run) -> str:
        if r.kind == "grid":
            return "x".join(map(str, r.dims)) + f" grid ({r.source})"
        if r.kind == "tokens":
            return f"{r.length} tokens ({r.source})"
        return f"{r.length} tokens ({r.kind})"
    return "[" + ", ".join(one(r) for r in runs) + "]"


def _conv_rule(graph: Graph, q_node: str, q_len: int, cache: dict) -> TokenGrid | None:
    """The older rule, where the trace does not know: prod(conv grid) + a few leading tokens."""
    if "grids" not in cache:
        cache["grids"] = [(n, s, nx.descendants(graph.g, n)) for n, s in find_patch_grids(graph)]
    for _conv, spatial, below in cache["grids"]:
        n = math.prod(spatial)
        leading = q_len - n
        if 0 <= leading <= MAX_LEADING_TOKENS and q_node in below:
            return TokenGrid(shape=spatial, leading=leading)
    return None
