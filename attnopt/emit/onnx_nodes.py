"""ONNX realizations of the lowering's view ops and steps (passes/lower.py), for both fused targets.

Layouts are the lowering's: operands canonical [batch..., S, D] then the op's [B, H, S, D]; mask
terms [batch..., Sq, Skv] then [B|1, H|1, Sq, Skv]. Both ONNX fused ops take float masks, so the
terms are always combined additively (-inf where the model filled -inf: its own arithmetic), and
both reject a mask broadcast over queries, so the combined mask is expanded to Sq and Skv in full.
Sizes the targets need as constants come from the IR (`SiteFacts`); where an exporter left them
symbolic they are read at run time (Shape) or, for head counts and head dims, taken from what
detection proved (passes/lower.Attend).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from attnopt.ir import Graph
from attnopt.passes.lower import (Attend, Broadcast, CombineMasks, Expand, Flatten, LoadOperand,
                                  Lowered, MaskInput, MergeAxes, MeanVOnDeadRows, Permute, SizeOf,
                                  Squeeze, SplitLead, ToRank, Unflatten, Unsqueeze, View)


class Skip(Exception):
    """The target cannot express this site: the splice leaves it as it is, with the reason."""


def np_dtype(name: str | None) -> np.dtype:
    if name in (None, "bfloat16"):
        return np.dtype(np.float32)
    return np.dtype(name)


def is_identity(p: Sequence[int]) -> bool:
    return tuple(p) == tuple(range(len(p)))


class Block:
    """The nodes replacing one site, with names unique in the model (`prefix`/hint)."""

    def __init__(self, prefix: str, taken: set[str], opset: int):
        self.prefix = prefix
        self.taken = taken
        self.opset = opset  # the model's default-domain opset (reductions changed at 18)
        self.nodes: list[onnx.NodeProto] = []

    def fresh(self, hint: str) -> str:
        base = f"{self.prefix}/{hint}"
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str | None = None, domain: str = "",
             **attrs) -> str:
        out = self.fresh(hint or op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=self.fresh(f"{op}_node"),
                                           domain=domain, **attrs))
        return out

    def const(self, value, hint: str = "const") -> str:
        arr = np.asarray(value)
        out = self.fresh(hint)
        self.nodes.append(helper.make_node("Constant", [], [out], name=self.fresh("Constant_node"),
                                           value=numpy_helper.from_array(arr, out)))
        return out

    def ints(self, values: Sequence[int], hint: str = "ints") -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), hint)

    def transpose(self, x: str, perm: Sequence[int], hint: str = "transpose") -> str:
        if is_identity(perm):
            return x
        return self.node("Transpose", [x], hint, perm=list(perm))

    def reshape(self, x: str, shape: Sequence[int], hint: str = "reshape") -> str:
        return self.node("Reshape", [x, self.ints(shape, hint + "_shape")], hint)

    def unsqueeze(self, x: str, axes: Sequence[int], hint: str = "unsqueeze") -> str:
        if not axes:
            return x
        return self.node("Unsqueeze", [x, self.ints(axes, hint + "_axes")], hint)

    def squeeze(self, x: str, axes: Sequence[int], hint: str = "squeeze") -> str:
        return self.node("Squeeze", [x, self.ints(axes, hint + "_axes")], hint)

    def dim(self, x: str, axis: int, static, hint: str) -> str:
        """A 1-element int64 tensor holding x's size on `axis` (a constant when static)."""
        if isinstance(static, int):
            return self.ints([static], hint)
        shp = self.node("Shape", [x], hint + "_shape")
        return self.node("Gather", [shp, self.ints([axis], hint + "_axis")], hint, axis=0)

    def reduce(self, op: str, x: str, axes: list[int], hint: str, keepdims: int = 0) -> str:
        """A reduction over `axes` in the model's opset (axes became an input at 18, at 13 for
        ReduceSum)."""
        if self.opset >= (13 if op == "ReduceSum" else 18):
            return self.node(op, [x, self.ints(axes, hint + "_axes")], hint, keepdims=keepdims)
        return self.node(op, [x], hint, keepdims=keepdims, axes=axes)

    def relead(self, x: str, lead: list[int], keep_from: int, hint: str) -> str:
        """x reshaped to `lead` + its own sizes from axis `keep_from` on (read at run time, so
        symbolic sequence lengths stay symbolic)."""
        shp = self.node("Shape", [x], hint + "_shape")
        rest = self.node("Slice", [shp, self.ints([keep_from], hint + "_from"),
                                   self.ints([keep_from + 2], hint + "_to")], hint + "_rest")
        return self.node("Reshape", [x, self.node("Concat", [self.ints(lead, hint + "_lead"), rest],
                                                  hint + "_dims", axis=0)], hint)

    def unmerge(self, x: str, h: int, hint: str) -> str:
        """[B*H, A, C] -> [B, H, A, C]."""
        return self.relead(x, [-1, h], 1, hint)

    def merge(self, x: str, hint: str) -> str:
        """[B, H, A, C] -> [B*H, A, C]."""
        return self.relead(x, [-1], 2, hint)


def canonical_perm(load: LoadOperand, rank: int) -> tuple[int, ...]:
    first = load.views[0] if load.views else None
    return first.perm if isinstance(first, Permute) else tuple(range(rank))


@dataclass
class SiteFacts:
    """Static facts about one site's values, from the IR (ints, symbolic strings or None)."""

    g: Graph
    low: Lowered
    q: LoadOperand
    k: LoadOperand
    v: LoadOperand
    q_perm: tuple[int, ...]  # each operand's permutation to canonical order
    k_perm: tuple[int, ...]
    v_perm: tuple[int, ...]
    sq: object
    skv: object
    d: object  # q/k head dim (detection's where the IR's is symbolic)
    dv: object
    heads: tuple  # (query heads, kv heads) of the loaded 4-D operands: ints or None
    dtype: np.dtype

    def shape(self, nid: str):
        return self.g.shape(nid) if nid in self.g else None

    @classmethod
    def of(cls, g: Graph, low: Lowered) -> SiteFacts:
        q, k, v = low.operand("q"), low.operand("k"), low.operand("v")
        att: Attend = low.step(Attend)
        shapes = [g.shape(x.node) if x.node in g else None for x in (q, k, v)]
        if any(s is None for s in shapes):
            raise Skip("q/k/v shapes are unknown")
        qp, kp, vp = (canonical_perm(x, len(s)) for x, s in zip((q, k, v), shapes))
        qc, kc, vc = ([s[p] for p in perm] for s, perm in zip(shapes, (qp, kp, vp)))
        # Head dims are structural: where shape inference lost them, detection probed them.
        d = qc[-1] if isinstance(qc[-1], int) else (att.head_dims[0] or qc[-1])
        dv = vc[-1] if isinstance(vc[-1], int) else (att.head_dims[1] or vc[-1])
        return cls(g, low, q, k, v, qp, kp, vp, qc[-2], kc[-2], d, dv, _heads(low, att, k, qc, kc),
                   np_dtype(g.dtype(q.node)))


def _heads(low: Lowered, att: Attend, k: LoadOperand, qc, kc) -> tuple:
    """(query heads, kv heads) after the canonical views to 4-D (ints or None)."""
    rb = low.batch_rank
    if rb == 2:
        h = qc[1] if isinstance(qc[1], int) else att.q_heads
        kh = kc[1] if isinstance(kc[1], int) else att.k_heads
        return h, kh
    if low.merged_heads:
        return low.merged_heads, low.merged_heads
    if rb == 3:
        h = qc[1] * qc[2] if isinstance(qc[1], int) and isinstance(qc[2], int) else None
        if any(isinstance(x, Squeeze) for x in k.views):  # kv broadcast over the last group axis
            return h, kc[1]
        kh = kc[1] * kc[2] if isinstance(kc[1], int) and isinstance(kc[2], int) else None
        return h, kh
    return 1, 1


# ---- view ops ------------------------------------------------------------------------------

def view(b: Block, x: str, op: View, f: SiteFacts, hint: str, *, last=None, src: str | None = None,
         perm_hint: str | None = None) -> str:
    """One view op as nodes. `last`: the static last size of a 4-D operand (flattening batch
    axes into heads reshapes to constants); `src`: the value a mask term was read from."""
    if isinstance(op, Permute):
        return b.transpose(x, op.perm, perm_hint or hint)
    if isinstance(op, Unsqueeze):
        return b.unsqueeze(x, list(op.axes), hint)
    if isinstance(op, Squeeze):
        return b.squeeze(x, list(op.axes), hint)
    if isinstance(op, Flatten) and (op.start, op.end) == (0, 1):
        return b.merge(x, hint)
    if isinstance(op, Flatten):  # [B, H1, H2, S, X] -> [B, H1*H2, S, X]
        n = int(np.prod(op.sizes))
        if last is None:  # a mask: both trailing sizes, read from q and k where symbolic
            rb = f.low.batch_rank
            return b.node("Reshape", [x, b.node("Concat", [
                b.ints([0, n], f"{hint}_lead"), b.dim(f.q.node, f.q_perm[rb], f.sq, f"{hint}_sq"),
                b.dim(f.k.node, f.k_perm[rb], f.skv, f"{hint}_skv")], f"{hint}_shape", axis=0)], hint)
        if not isinstance(last, int):
            raise Skip("symbolic head dim with three batch axes")
        return b.reshape(x, [0, n, -1, last], hint)
    if isinstance(op, Unflatten) and op.axis == 0:
        return b.unmerge(x, op.sizes[1], hint)
    if isinstance(op, Unflatten):  # the output: [B, H1*H2, Sq, Dv] -> [B, H1, H2, Sq, Dv]
        return b.reshape(x, [0, *op.sizes, -1, f.dv], hint)
    if isinstance(op, Expand):  # a mask's batch axes, expanded before they are flattened
        b1, b2 = op.sizes[1:3]
        rb = f.low.batch_rank
        full = b.node("Concat", [b.ints([1, b1, b2], f"{hint}_heads"),
                                 b.dim(f.q.node, f.q_perm[rb], f.sq, f"{hint}_sq"),
                                 b.dim(f.k.node, f.k_perm[rb], f.skv, f"{hint}_skv")],
                      f"{hint}_expand_shape", axis=0)
        return b.node("Expand", [x, full], hint)
    if isinstance(op, ToRank):
        s = f.shape(src)
        if s is None:
            raise Skip(f"mask {src} has unknown rank")
        return b.unsqueeze(x, list(range(op.rank - len(s))), hint)
    if isinstance(op, SplitLead):  # [B*H | 1, Sq, Skv] -> [B | 1, H | 1, Sq, Skv]
        s = f.shape(src) if src is not None else None
        lead = s[0] if s is not None and len(s) == op.rank else 1
        return b.unsqueeze(x, [0], hint) if lead == 1 else b.unmerge(x, op.heads, hint)
    if isinstance(op, Broadcast):  # Expand broadcasts: 1 keeps an axis
        parts = [b.ints([1 if e is None else e], f"{hint}_b{i}") if not isinstance(e, SizeOf)
                 else _size_of(b, e, f"{hint}_b{i}") for i, e in enumerate(op.sizes)]
        return b.node("Expand", [x, b.node("Concat", parts, f"{hint}_bshape", axis=0)], hint)
    if isinstance(op, MergeAxes):  # each run merged by a Reshape that reads the other sizes
        rank = sum(len(g) for g in op.groups)
        for g in reversed(op.groups):
            if len(g) == 1:
                continue
            shp = b.node("Shape", [x], hint + "_shape")
            head = b.node("Slice", [shp, b.ints([0], hint + "_s0"), b.ints([g[0]], hint + "_s1")], hint + "_head")
            tail = b.node("Slice", [shp, b.ints([g[-1] + 1], hint + "_t0"), b.ints([rank], hint + "_t1")],
                          hint + "_tail")
            x = b.node("Reshape", [x, b.node("Concat", [head, b.ints([-1], hint + "_m"), tail],
                                              hint + "_dims", axis=0)], hint)
            rank -= len(g) - 1
        return x
    raise Skip(f"no ONNX form for the view {op!r}")


def _size_of(b: Block, s: SizeOf, hint: str) -> str:
    """A run-time size (lower.SizeOf) as a 1-element int64 tensor."""
    d = b.dim(s.node, s.axis, None, hint)
    return d if s.divisor == 1 else b.node("Div", [d, b.ints([s.divisor], hint + "_div")], hint + "_q")


def load(b: Block, step: LoadOperand, f: SiteFacts) -> str:
    """q, k or v as the op's 4-D [B, H, S, D]."""
    x, w = step.node, step.role
    last = f.dv if w == "v" else f.d
    for op in step.views:
        x = view(b, x, op, f, f"{w}_4d", last=last, perm_hint=f"{w}_canon")
    for i, fi in enumerate(step.factors):  # per-head factors of the scores, moved onto q
        t = mask_term(b, fi, f, f"{w}_factor{i}")
        for op in step.factor_views:
            t = view(b, t, op, f, f"{w}_factor{i}_4d")
        if f.g.dtype(fi.term.node) != f.dtype.name:
            t = b.node("Cast", [t], f"{w}_factor{i}_cast", to=helper.np_dtype_to_tensor_dtype(f.dtype))
        x = b.node("Mul", [x, t], f"{w}_scaled")
    return x


def mask_term(b: Block, i: MaskInput, f: SiteFacts, hint: str) -> str:
    """A term at the score rank in canonical order (a merged-head term viewed as [B, H, Sq, Skv])."""
    x = i.term.node
    for op in i.views:
        h = {ToRank: f"{hint}_rank", Permute: f"{hint}_perm"}.get(type(op), f"{hint}_4d")
        x = view(b, x, op, f, h, src=i.term.node)
    return x


def additive_mask(b: Block, step: CombineMasks, f: SiteFacts) -> str | None:
    """The terms as one additive float mask in canonical [batch..., Sq, Skv] (None: no terms)."""
    acc = None
    dtype = f.dtype
    for i, inp in enumerate(step.inputs):
        t = inp.term
        x = mask_term(b, inp, f, f"mask{i}")
        mdt = f.g.dtype(t.node)
        if t.how == "add":
            if mdt != dtype.name:
                x = b.node("Cast", [x], f"mask{i}_cast", to=helper.np_dtype_to_tensor_dtype(dtype))
            if t.factor != 1.0:
                x = b.node("Mul", [x, b.const(np.asarray(t.factor, dtype), f"mask{i}_factor")],
                           f"mask{i}_scaled")
        elif t.how in ("keep", "drop"):
            if t.fill is None:
                raise Skip(f"mask {t.node}: a where without a fill value")
            if mdt != "bool":
                x = b.node("Cast", [x], f"mask{i}_bool", to=TensorProto.BOOL)
            fill = b.const(np.asarray(t.fill, dtype), f"mask{i}_fill")
            zero = b.const(np.asarray(0, dtype), f"mask{i}_zero")
            x = b.node("Where", [x, fill, zero] if t.how == "drop" else [x, zero, fill],
                       f"mask{i}_additive")
        else:
            raise Skip(f"unknown mask term kind {t.how!r}")
        acc = x if acc is None else b.node("Add", [acc, x], f"mask{i}_sum")
    return acc


def causal_mask(b: Block, att: Attend, f: SiteFacts) -> str:
    """The causal pattern as an additive constant [1..., Sq, Skv] (static lengths only), for
    where a target's causal flag cannot say it (alignment)."""
    sq, skv = f.sq, f.skv
    if not (isinstance(sq, int) and isinstance(skv, int)):
        raise Skip("causal with symbolic, unequal query and key lengths")
    off = skv - sq if att.causal_alignment == "bottom_right" else 0
    allowed = np.arange(skv)[None, :] <= np.arange(sq)[:, None] + off
    m = np.where(allowed, 0.0, -np.inf).astype(f.dtype)
    m = m.reshape((1,) * f.low.batch_rank + m.shape)
    return b.const(m, "causal_mask")


def mask4(b: Block, step: CombineMasks, m: str, f: SiteFacts) -> str:
    """Canonical mask -> [B|1, H|1, Sq, Skv] with Sq and Skv in full (both ops reject a mask
    broadcast over queries)."""
    for op in step.views:
        m = view(b, m, op, f, "mask_5d" if isinstance(op, Expand) else "mask_4d")
    rb = f.low.batch_rank
    full = b.node("Concat", [b.ints([1, 1], "mask_one"), b.dim(f.q.node, f.q_perm[rb], f.sq, "sq"),
                             b.dim(f.k.node, f.k_perm[rb], f.skv, "skv")], "mask_full_shape", axis=0)
    return b.node("Expand", [m, full], "attn_mask")


def zero_nan_rows(b: Block, x: str, f: SiteFacts) -> str:
    """where(isnan(x), 0, x): the model's guard on rows with every key masked (all-NaN there)."""
    zero = b.const(np.zeros((), f.dtype), "zero")
    return b.node("Where", [b.node("IsNaN", [x], "isnan"), zero, x], "nan_guard")


def mean_v_on_dead_rows(b: Block, step: MeanVOnDeadRows, out4: str, v4: str, f: SiteFacts) -> str:
    """passes/lower.MeanVOnDeadRows on the op's 4-D output: where no select keeps a key, the
    mean of V over the keys."""
    if step.kv_repeat != 1:
        raise Skip("rows with every key masked average V, and grouped kv heads would need "
                   "V repeated for that")
    keep = None
    for i, inp in enumerate(step.selects):
        x = mask_term(b, inp, f, f"dead{i}")
        if f.g.dtype(inp.term.node) != "bool":
            x = b.node("Cast", [x], f"dead{i}_bool", to=TensorProto.BOOL)
        if inp.term.how == "drop":
            x = b.node("Not", [x], f"dead{i}_keep")
        keep = x if keep is None else b.node("And", [keep, x], f"dead{i}_and")
    for op in step.views:
        keep = view(b, keep, op, f, "dead_keep_5d" if isinstance(op, Expand) else "dead_keep_4d")
    live = b.reduce("ReduceMax", b.node("Cast", [keep], "dead_keep_f", to=TensorProto.FLOAT), [3],
                    "dead_live", keepdims=1)
    dead = b.node("Less", [live, b.const(np.asarray(0.5, np.float32), "dead_half")], "dead_rows")
    v_mean = b.reduce("ReduceMean", v4, [2], "dead_v_mean", keepdims=1)
    return b.node("Where", [dead, v_mean, out4], "dead_fixed")
