"""Views of the scores between the score matmul and the normalizer (patterns/decomposed.py).

Models reshape their scores to add a term in another layout and reshape them back:
  Swin (shifted windows)   [B_, H, N, N] -> [B_/nW, nW, H, N, N] + mask[1, nW, 1, N, N] -> back
  ViTDet / SAM rel-pos     [B*H, N, N]   -> [B*H, qh, qw, kh, kw] + rel_h[..., None] + rel_w[..., None, :]
The inner layout refines the outer one (each outer axis is a run of consecutive inner axes), so
a term broadcast to the inner shape and merged back is a term of the canonical scores; what it
needs expanded before the merge is what this module works out (a `ScoreView` per term).
"""
from __future__ import annotations

import dataclasses
import math

from attnopt.ir import Graph
from attnopt.patterns.match import ScoreView


def refine_groups(outer: tuple[int, ...], inner: tuple[int, ...]) -> tuple[tuple[int, ...], ...] | None:
    """For each outer axis the consecutive inner axes whose sizes multiply to it, or None when
    `inner` is not a refinement of `outer` (a view that mixes axes)."""
    groups, j = [], 0
    for o in outer:
        group, prod = [], 1
        while j < len(inner) and (prod != o or not group):
            prod *= inner[j]
            group.append(j)
            j += 1
            if prod > o:
                return None
        if prod != o:
            return None
        groups.append(group)
    if j != len(inner):
        if not groups or any(inner[x] != 1 for x in range(j, len(inner))):
            return None
        groups[-1] += list(range(j, len(inner)))
    return tuple(tuple(g) for g in groups)


def base_view(g: Graph, back: str, out: str) -> ScoreView | str:
    """The view `out` (outer -> inner) closed by `back` (inner -> outer), or why it is not one."""
    outer_node = g.inputs_of(out)[0]
    ev = g.evaluator
    try:
        outer, inner, back_shape = ev.probe_shape(outer_node), ev.probe_shape(out), ev.probe_shape(back)
    except Exception as e:  # noqa: BLE001 - unknown sizes: not provable
        return f"the sizes of the viewed scores are unknown ({e})"
    if outer is None or inner is None or tuple(back_shape or ()) != tuple(outer):
        return (f"the scores are viewed as {list(inner or ())} and then as {list(back_shape or ())}, "
                f"not back to their own shape {list(outer or ())}")
    groups = refine_groups(tuple(outer), tuple(inner))
    if groups is None:
        return f"the view of the scores as {list(inner)} mixes their {list(outer)} axes"
    shape = g.shape(out)
    if shape is None or len(shape) != len(inner):
        return "the viewed scores have no known rank"
    return ScoreView(tuple(shape), tuple(int(x) for x in inner), tuple(int(x) for x in outer), groups)


def term_view(g: Graph, view: ScoreView, term: str) -> ScoreView | str:
    """`view` with the expansions a term needs before the inner axes are merged back, or why
    it cannot be brought to the outer layout. A group the term spans in full, or not at all,
    merges as it is; otherwise its broadcast axes are expanded: to a static size, or (one
    symbolic axis per group: Swin's B_/nW) to the outer axis' run-time size over the rest."""
    shape = _term_shape(g, term)
    if shape is None:
        return f"the shape of {g.describe(term)} added to the viewed scores is unknown"
    rank = len(view.inner)
    if len(shape) > rank:
        return f"{g.describe(term)} has more axes than the viewed scores"
    shape = (1,) * (rank - len(shape)) + tuple(shape)
    expand: list = [None] * rank
    for oi, group in enumerate(view.groups):
        sizes = [shape[j] for j in group]
        full = [view.inner_probe[j] for j in group]
        if any(s not in (1, f) for s, f in zip(sizes, full)):
            return f"{g.describe(term)} does not broadcast against the viewed scores"
        if len(group) == 1 or all(s == 1 for s in sizes) or sizes == full:
            continue
        for j, s, f in zip(group, sizes, full):
            if s == 1 and f != 1:
                dim = view.inner[j]
                if isinstance(dim, int) or _static_inputs(g):
                    expand[j] = f  # == dim; or every size is fixed where every input is
                    continue
                # the other axes of the group: static in the view, or sized by the term itself
                # where it spans them with a static shape (Swin's mask buffer [nW, N, N])
                declared = _declared_sizes(g, term, shape)
                rest = [view.inner[x] if isinstance(view.inner[x], int) else declared[x] for x in group if x != j]
                if not all(isinstance(x, int) for x in rest):
                    return "a term broadcast over two symbolic axes of the viewed scores"
                expand[j] = ("outer", oi, math.prod(rest))
    return dataclasses.replace(view, expand=tuple(expand))


def _declared_sizes(g: Graph, term: str, probed: tuple[int, ...]) -> tuple[int | None, ...]:
    """The term's own graph sizes at the view's rank (`probed` is its probe shape there): an
    int where static and not a broadcast 1, None elsewhere."""
    rank = len(probed)
    own = g.shape(term)
    own = tuple(own) if own is not None and len(own) <= rank else probed
    own = (None,) * (rank - len(own)) + own
    return tuple(d if isinstance(d, int) and d != 1 else None for d in own)


def _term_shape(g: Graph, term: str) -> tuple[int, ...] | None:
    if g.ref(term) is None and g.scalar(term) is not None:
        return ()
    try:
        s = g.evaluator.probe_shape(term)
    except Exception:  # noqa: BLE001
        s = None
    if s is None:
        s = g.shape(term)
        if s is None or not all(isinstance(x, int) for x in s):
            return None
    return tuple(int(x) for x in s)


def _static_inputs(g: Graph) -> bool:
    """Whether every user input has a static shape: then every size in the graph is fixed
    (an exporter's shape inference may still have lost some: their probe value is their value)."""
    ins = [n for n in g.nodes() if g.op(n) == "input" and g.attr(n, "role", "user") == "user"]
    return bool(ins) and all(g.shape(n) is not None and all(isinstance(d, int) for d in g.shape(n))
                             for n in ins)
