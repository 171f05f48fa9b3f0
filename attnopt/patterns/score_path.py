"""The score side of a decomposed match (patterns/decomposed.py): what may sit between the score
matmul and the normalizer, and how each op is read. `ScorePath` is a mixin of the matcher: it
reads `g` (the graph), `nodes` (the site's nodes so far), `choices` (which side of each
ambiguous add is the score path), `factors` (tensor factors met) and `normalizer`.

Terms: a scalar factor folds into the scale; a softcap is tanh(x / c) * c; a tensor factor
constant along queries and keys (a per-head scale) moves onto q; an add, sub or where adds a
mask term; a view of the scores closed by its inverse carries its terms' `ScoreView`
(patterns/score_views.py). An add whose both sides come from matrix products (scores + a bias
computed from q) is `Ambiguous`: the matcher's search tries each side.
"""
from __future__ import annotations

import dataclasses
import math

from attnopt.ir import Graph
from attnopt.patterns.contraction import CONTRACTION_OPS
from attnopt.patterns.heads import TRANSPARENT as _TRANSPARENT
from attnopt.patterns.match import MaskOperand
from attnopt.patterns.score_views import base_view, term_view
from attnopt.patterns.values import NotConstant, scalar_value


class Reject(Exception):
    def __init__(self, node: str, reason: str):
        super().__init__(reason)
        self.node, self.reason = node, reason


class Ambiguous(Exception):
    """An add on the scores whose both sides come from matrix products (the scores, and a
    bias computed from q: ViTDet/SAM's decomposed rel-pos, DeBERTa's position scores)."""

    def __init__(self, node: str):
        super().__init__(node)
        self.node = node


class ScorePath:
    g: Graph
    nodes: set[str]
    choices: dict[str, int]
    factors: list[str]
    normalizer: str

    def reject(self, node: str, reason: str) -> None:
        raise Reject(node, reason)

    def viewed_masks(self, back: str, out: str, masks: list[MaskOperand]) -> list[MaskOperand]:
        """The masks met between the view `out` of the scores and `back`, which undoes it, each
        with how it is brought to the scores' own layout (patterns/score_views.py)."""
        view = base_view(self.g, back, out)
        if isinstance(view, str):
            self.reject(back, f"{self.g.describe(back)} sits between the score matmul and the "
                              f"{self.normalizer}: {view}")
        done = []
        for m in masks:
            v = term_view(self.g, view, m.node)
            if isinstance(v, str):
                self.reject(back, v)
            done.append(dataclasses.replace(m, view=v))
        return done

    def outer_scale(self, nid: str, stage: int, scale: float, what: str) -> float:
        """The factor a mask term met at `nid` is multiplied by before the normalizer.

        Masks added before the scale (CodeGen: (scores + mask) / sqrt(d)) are the same attention
        with the mask scaled too: (s + m) * c = s * c + m * c (one rounding apart), and
        where(c, s, fill) * c' = where(c, s * c', fill * c'). Only a positive finite factor keeps
        a mask a mask; inside a softcap nothing can be moved past the tanh."""
        import math

        if stage == 1:
            self.reject(nid, f"{what} inside the softcap")
        if stage == 3:
            self.reject(nid, f"{what} before the scores are multiplied by a tensor")
        if stage == 2 and not (math.isfinite(scale) and scale > 0):
            self.reject(nid, f"{what} before the scores are scaled by {scale:g}")
        return scale

    def reaches_contraction(self, nid: str, depth: int = 12) -> bool:
        """Whether `nid` is (elementwise-)derived from a contraction: the score path."""
        g = self.g
        for _ in range(depth):
            op = g.op(nid)
            if op in CONTRACTION_OPS:
                return True
            if op in _TRANSPARENT or op in ("tanh", "reshape"):
                nid = g.inputs_of(nid)[0]
            elif op in ("mul", "div", "add", "sub"):
                return any(self.reaches_contraction(i, depth - 1) for i in g.inputs_of(nid))
            elif op == "where":
                return any(self.reaches_contraction(i, depth - 1) for i in g.inputs_of(nid)[1:])
            else:
                return False
        return False

    def split_score_path(self, nid: str, ins: list[str]) -> tuple[str, str]:
        a, b = ins
        ra, rb = self.reaches_contraction(a), self.reaches_contraction(b)
        if ra and not rb:
            return a, b
        if rb and not ra:
            return b, a
        if ra and rb:  # both come from matrix products: _search tries each as the scores
            if nid not in self.choices:
                raise Ambiguous(nid)
            return (a, b) if self.choices[nid] == 0 else (b, a)
        self.reject(nid, "an add on the scores has scores on both sides or on neither")
        raise AssertionError  # unreachable

    def check_factors(self, rank: int, q_axis: int, k_axis: int) -> None:
        """A tensor factor on the scores is a per-head (per-batch) scale only when it is
        constant along the query and key axes: then it multiplies q instead (one rounding apart)."""
        for f in self.factors:
            if self.split is not None:
                self.reject(f, "merged-head scores multiplied by a tensor")
            try:
                shape = self.g.evaluator.probe_shape(f)
            except Exception:  # noqa: BLE001
                shape = None
            if shape is None or len(shape) > rank:
                self.reject(f, f"{self.g.describe(f)} multiplies the scores by a tensor of unknown shape")
            shape = (1,) * (rank - len(shape)) + tuple(shape)
            if shape[q_axis] != 1 or shape[k_axis] != 1:
                self.reject(f, f"{self.g.describe(f)} multiplies the scores by a tensor that varies "
                               "along queries or keys, not a per-head scale")

    def tensor_factor(self, nid: str) -> tuple[str, str] | None:
        """scores * t with t a tensor that does not come from a matrix product: (t, scores).
        Only a t constant along the query and key axes is a per-head scale (checked in
        run() once the axes are known)."""
        a, b = self.g.inputs_of(nid)
        for t, path in ((b, a), (a, b)):
            if scalar_value(self.g, t) is None and (self.g.rank(t) or 0) > 0 \
                    and self.reaches_contraction(path) \
                    and not self.reaches_contraction(t):
                return t, path
        return None

    def scalar_factor(self, nid: str) -> tuple[float, str]:
        """For mul/div by a constant scalar: (factor, the other operand)."""
        g = self.g
        a, b = g.inputs_of(nid)
        op = g.op(nid)
        candidates = [(b, a)] if op == "div" else [(b, a), (a, b)]
        for s_node, path in candidates:
            s = scalar_value(g, s_node)
            if isinstance(s, NotConstant):
                self.reject(nid, f"non-constant scale: {s.reason}")
            if isinstance(s, float):
                if op == "div":
                    if s == 0:
                        self.reject(nid, "scores divided by zero")
                    return 1.0 / s, path
                return s, path
        if op == "div" and isinstance(scalar_value(g, a), float):
            self.reject(nid, "a constant divided by the scores is not a scale")
        self.reject(nid, f"{g.describe(nid)} multiplies the scores by a tensor, not a constant "
                         "scalar (non-constant scale)")
        raise AssertionError  # unreachable

    def softcap_at(self, nid: str) -> tuple[float, str] | None:
        """mul(tanh(x / c), c) -> (c, x)."""
        g = self.g
        a, b = g.inputs_of(nid)
        for t, c_node in ((a, b), (b, a)):
            if g.op(t) != "tanh":
                continue
            c = scalar_value(g, c_node)
            if not isinstance(c, float) or c <= 0:
                continue
            inner = g.inputs_of(t)[0]
            if g.op(inner) not in ("mul", "div") or g.num_uses(t) != 1 or g.num_uses(inner) != 1:
                continue
            try:
                f, x = self.scalar_factor(inner)
            except Reject:
                continue
            if math.isclose(f * c, 1.0, rel_tol=1e-5):
                self.nodes.update([nid, t, inner])
                return c, x
        return None

    # -- operands ------------------------------------------------------------------------------
