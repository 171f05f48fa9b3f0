"""Which normalizers are worth matching (patterns/decomposed.py): a softmax or sigmoid near a
matrix product, and not a gated activation (SiLU / QuickGELU as ONNX spells them)."""
from __future__ import annotations

from attnopt.ir import Graph
from attnopt.patterns.contraction import CONTRACTION_OPS
from attnopt.patterns.heads import TRANSPARENT as _TRANSPARENT


def is_gated_activation(graph: Graph, anchor: str) -> bool:
    """x * sigmoid(x) or x * sigmoid(c * x): SiLU / QuickGELU as ONNX spells them, next to the MLP
    matmuls but not attention (nothing to report)."""
    if graph.op(anchor) != "sigmoid":
        return False
    x = graph.inputs_of(anchor)[0]
    sources = {x}
    if graph.op(x) in ("mul", "div"):
        sources.update(graph.inputs_of(x))
    users = graph.users(anchor)
    return bool(users) and all(
        graph.op(u) == "mul" and any(i != anchor and i in sources for i in graph.inputs_of(u)) for u in users)


def near_contractions(graph: Graph, anchor: str) -> bool:
    """Whether the normalizer's output flows (through layout/cast ops) into a contraction, or,
    for softmax, its input comes from one: only then can it be attention or a near miss."""
    frontier, seen = [anchor], set()
    for _ in range(4):
        nxt = []
        for n in frontier:
            for u in graph.users(n):
                if u in seen:
                    continue
                seen.add(u)
                if graph.op(u) in CONTRACTION_OPS:
                    return True
                if graph.op(u) in _TRANSPARENT or graph.op(u) in ("transpose", "where", "isnan",
                                                                  "dropout", "mul", "reshape"):
                    nxt.append(u)
        frontier = nxt
    if graph.op(anchor) != "softmax":
        return False
    cur = graph.inputs_of(anchor)[0]
    for _ in range(8):
        op = graph.op(cur)
        if op in CONTRACTION_OPS:
            return True
        ins = graph.inputs_of(cur)
        if op not in _TRANSPARENT and op not in ("mul", "div", "add", "sub", "where", "tanh", "reshape") \
                or not ins:
            return False
        cur = ins[0] if op != "where" else ins[1]
    return False
