"""Two-operand contractions (matmul, bmm, einsum, baddbmm) described as einsum labels.

Detection proves what a contraction does from its labels, not from which op spelled it:
`a @ b` with a: [..., m, k] and b: [..., k, n] becomes labels a="..mk", b="..kn", out="..mn",
with the batch labels aligned from the right as matmul broadcasting does. An einsum keeps its
own labels. Then "which axis is contracted", "which free axis comes from which operand" and
"which axes are batch" are plain set questions on labels.
"""
from __future__ import annotations

from dataclasses import dataclass

from attnopt.ir import Graph

CONTRACTION_OPS = frozenset({"matmul", "einsum", "baddbmm"})
_BATCH_LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Contraction:
    node: str
    a: str  # IR id of the first operand
    b: str
    a_labels: str
    b_labels: str
    out_labels: str
    bias: str | None = None  # baddbmm's additive input
    alpha: float = 1.0
    beta: float = 1.0

    @property
    def contracted(self) -> set[str]:
        return (set(self.a_labels) & set(self.b_labels)) - set(self.out_labels)

    @property
    def batch(self) -> set[str]:
        return set(self.a_labels) & set(self.b_labels) & set(self.out_labels)

    def free_of(self, which: str) -> set[str]:
        mine, other = (self.a_labels, self.b_labels) if which == "a" else (self.b_labels, self.a_labels)
        return (set(mine) & set(self.out_labels)) - set(other)

    def operand(self, which: str) -> str:
        return self.a if which == "a" else self.b

    def labels(self, which: str) -> str:
        return self.a_labels if which == "a" else self.b_labels


def describe_contraction(graph: Graph, nid: str) -> Contraction | str:
    """Labels for a contraction node, or a reason why it is not a plain two-operand one."""
    op = graph.op(nid)
    ins = graph.inputs_of(nid)
    if op == "einsum":
        return _from_einsum(graph, nid, graph.attr(nid, "equation", ""), ins)
    if op in ("matmul", "baddbmm"):
        if len(ins) < 2:
            return f"{graph.describe(nid)} has fewer than two operands"
        ra, rb = graph.rank(ins[0]), graph.rank(ins[1])
        if ra is None or rb is None:
            return f"{graph.describe(nid)} has operands of unknown rank"
        if ra < 2 or rb < 2:
            return f"{graph.describe(nid)} is a vector product, not a batched matrix product"
        nb = max(ra, rb) - 2
        batch = _BATCH_LETTERS[:nb]
        a = batch[nb - (ra - 2):] + "mk"
        b = batch[nb - (rb - 2):] + "kn"
        out = batch + "mn"
        if op == "baddbmm":
            return Contraction(nid, ins[0], ins[1], a, b, out, bias=ins[2] if len(ins) > 2 else None,
                               alpha=graph.attr(nid, "alpha", 1.0), beta=graph.attr(nid, "beta", 1.0))
        return Contraction(nid, ins[0], ins[1], a, b, out)
    return f"{graph.describe(nid)} is not a contraction"


def _from_einsum(graph: Graph, nid: str, eq: str, ins: list[str]) -> Contraction | str:
    if "->" not in eq or len(ins) != 2:
        return f"{graph.describe(nid)}: einsum {eq!r} is not an explicit two-operand contraction"
    lhs, out = eq.split("->")
    parts = lhs.split(",")
    if len(parts) != 2:
        return f"{graph.describe(nid)}: einsum {eq!r} does not have two operands"
    if "..." in eq:
        # Expand the ellipsis to batch letters of the right rank (aligned from the right).
        ranks = [graph.rank(i) for i in ins]
        if None in ranks:
            return f"{graph.describe(nid)}: einsum with '...' on operands of unknown rank"
        n_ell = [r - (len(p) - 3) for r, p in zip(ranks, parts) if "..." in p]
        width = max(n_ell) if n_ell else 0
        letters = _BATCH_LETTERS[:width]
        parts = [p.replace("...", letters[width - (r - (len(p) - 3)):]) if "..." in p else p
                 for p, r in zip(parts, ranks)]
        out = out.replace("...", letters)
    for p in parts + [out]:
        if len(set(p)) != len(p):
            return f"{graph.describe(nid)}: einsum {eq!r} repeats a label (diagonal)"
    return Contraction(nid, ins[0], ins[1], parts[0], parts[1], out)
