"""Which axes of an ONNX tensor can vary: a static proof that a value is constant along an axis.

Used by the splice to prove an attention mask depends on the batch and key positions only
(a key-padding mask, however the exporter broadcast it to [B, 1, Sq, Skv]), so the fused node can
take it in a cheaper form than a materialized [B, H, Sq, Skv] bias.

Axes are counted from the right (-1 = last), which is how ONNX broadcasting aligns operands.
`varying(name)` is the set of right-aligned axes along which the tensor may take different
values, or None when nothing is known (every axis may vary). Sound, not complete: an unknown op
or an unknown shape gives None. Rules:
  * constants (the IR's small constants: initializers and Constant nodes as the frontend read them,
    external data included; Shape of a static shape; and small subgraphs of those, folded with
    onnx's reference evaluator): measured from the value;
  * ConstantOfShape: varies along no axis;
  * element-wise ops: the union of their inputs' varying axes (broadcasting never adds any);
  * Expand: its input's (expanding repeats values along broadcast axes);
  * Unsqueeze / Squeeze / Transpose with constant axes and known ranks: the axes moved;
  * Reshape: only output axes whose size is not 1 (static shape or folded target) may vary;
  * x >= c, x > c, c <= x, c < x with a proven lower bound of x (Range from a constant start with
    a positive constant step, through shape ops and casts): all true, varies along no axis (the
    "query index >= 0" term of exporters' masks at dynamic lengths);
  * graph inputs and anything else: every axis whose static size is not 1.

`zero_or_masked(name)`: True when every value is 0 or a fill that masks exactly (-inf, or finite
<= -1e30 like finfo(float32).min): such a mask adds nothing to kept scores and sends masked
scores so low that any other encoding of it gives the same softmax, rows with every key masked
included (all such scores are equal). Moderate fills (-1e4) are not: there the model's own
rounding of score + fill is part of its result.
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import onnx

from attnopt.ir.vocab import EXACT_FILL
from attnopt.ir import Graph

ELEMENTWISE = {
    "Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Floor",
    "Ceil", "Sign", "Relu", "Sigmoid", "Tanh", "Erf", "Min", "Max", "Mod", "Where", "Cast",
    "CastLike", "Identity", "Not", "And", "Or", "Xor", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "IsNaN", "IsInf", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot",
}


FOLDABLE = ELEMENTWISE | {"Expand", "ConstantOfShape", "Concat", "Gather", "Slice", "Unsqueeze",
                          "Squeeze", "Reshape", "Range", "Transpose", "Flatten"}
FOLD_MAX_ELEMENTS = 1 << 16


class AxisFacts:
    def __init__(self, model: onnx.ModelProto, rank_of: Callable[[str], int | None],
                 shape_of: Callable[[str], tuple | None], dtype_of: Callable[[str], str | None],
                 const_of: Callable[[str], np.ndarray | None]):
        self.producer = {o: n for n in model.graph.node for o in n.output if o}
        self.rank_of = rank_of
        self.shape_of = shape_of  # sizes: ints, or symbols (str) for unknown sizes
        self.dtype_of = dtype_of  # numpy dtype names
        self.const_of = const_of  # value of a small constant (initializer or Constant), else None
        self.memo: dict[str, frozenset[int] | None] = {}
        self.values: dict[str, np.ndarray | None] = {}

    @classmethod
    def of_graph(cls, graph: Graph) -> "AxisFacts":
        """Facts about an IR graph loaded from ONNX (graph.native_model), with its shapes, dtypes
        and constants."""
        known = lambda n: n in graph  # noqa: E731
        return cls(graph.native_model,
                   rank_of=lambda n: graph.rank(n) if known(n) else None,
                   shape_of=lambda n: tuple(graph.shape(n)) if known(n) and graph.shape(n) is not None else None,
                   dtype_of=lambda n: graph.dtype(n) if known(n) else None,
                   const_of=lambda n: graph.value(n) if known(n) and graph.op(n) == "const" else None)

    # -- helpers --------------------------------------------------------------------------
    def _value(self, name: str, depth: int = 0) -> np.ndarray | None:
        if name in self.values:
            return self.values[name]
        self.values[name] = None
        self.values[name] = v = self._fold(name, depth) if depth < 50 else None
        return v

    def _fold(self, name: str, depth: int) -> np.ndarray | None:
        v = self.const_of(name)
        if v is not None:
            return np.asarray(v)
        n = self.producer.get(name)
        if n is None or n.domain not in ("", "ai.onnx") or n.op_type == "Constant":
            return None  # graph inputs, large or external constants, other domains: unknown
        if n.op_type == "Shape" and not n.attribute:
            shape = self.shape_of(n.input[0])
            if shape is not None and all(isinstance(d, int) for d in shape):
                return np.asarray(shape, dtype=np.int64)
            return None
        if n.op_type not in FOLDABLE or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                            for a in n.attribute):
            return None
        ins = [self._value(x, depth + 1) if x else None for x in n.input]
        if any(x and v is None for x, v in zip(n.input, ins)):
            return None
        if sum(int(np.asarray(v).size) for v in ins if v is not None) > FOLD_MAX_ELEMENTS:
            return None
        try:
            from onnx.reference import ReferenceEvaluator

            node = onnx.helper.make_node(n.op_type, [f"i{j}" if x else "" for j, x in enumerate(n.input)],
                                         ["out"], **{a.name: onnx.helper.get_attribute_value(a)
                                                     for a in n.attribute})
            with warnings.catch_warnings(), np.errstate(all="ignore"):
                warnings.simplefilter("ignore")
                out = ReferenceEvaluator(node).run(
                    None, {f"i{j}": v for j, (x, v) in enumerate(zip(n.input, ins)) if x})[0]
        except Exception:  # noqa: BLE001 - anything the evaluator cannot do stays unknown
            return None
        out = np.asarray(out)
        return out if out.size <= FOLD_MAX_ELEMENTS else None

    def _all_axes(self, name: str) -> frozenset[int] | None:
        shape = self.shape_of(name)
        if shape is not None:
            return frozenset(i - len(shape) for i, d in enumerate(shape) if d != 1)
        r = self.rank_of(name)
        return None if r is None else frozenset(range(-r, 0))

    def _ints(self, n: onnx.NodeProto, pos: int, attr: str) -> list[int] | None:
        if len(n.input) > pos and n.input[pos]:
            v = self._value(n.input[pos])
            return None if v is None else [int(x) for x in np.asarray(v).reshape(-1)]
        for a in n.attribute:
            if a.name == attr:
                return list(a.ints)
        return None

    # -- the analysis ---------------------------------------------------------------------
    def varying(self, name: str, depth: int = 0) -> frozenset[int] | None:
        if name in self.memo:
            return self.memo[name]
        self.memo[name] = None  # cycles and depth cut-offs: unknown
        res = self._varying(name, depth) if depth < 200 else None
        self.memo[name] = res
        return res

    def _varying(self, name: str, depth: int) -> frozenset[int] | None:
        v = self._value(name)
        if v is not None:
            v = np.asarray(v)
            return frozenset(a - v.ndim for a in range(v.ndim)
                             if v.shape[a] > 1 and not (np.take(v, [0], axis=a) == v).all())
        n = self.producer.get(name)
        if n is None:
            return self._all_axes(name)
        op = n.op_type if n.domain in ("", "ai.onnx") else None
        if op == "ConstantOfShape":
            return frozenset()
        if op in ("GreaterOrEqual", "Greater", "LessOrEqual", "Less") and self._always_true(n):
            return frozenset()
        if op in ELEMENTWISE or op == "Expand":
            ins = [x for x in (n.input[:1] if op == "Expand" else n.input) if x]
            acc: frozenset[int] = frozenset()
            for x in ins:
                s = self.varying(x, depth + 1)
                if s is None:
                    return None
                acc |= s
            return acc
        if op in ("Unsqueeze", "Squeeze", "Transpose"):
            return self._moved(n, op, depth)
        if op == "Reshape":
            return self._reshaped(n, depth)
        return self._all_axes(name)

    def _always_true(self, n: onnx.NodeProto) -> bool:
        x, c = (n.input[0], n.input[1]) if n.op_type.startswith("Greater") else (n.input[1], n.input[0])
        lo, cv = self._lower_bound(x), self._value(c)
        if lo is None or cv is None or np.asarray(cv).size == 0:
            return False
        top = float(np.max(cv))
        return lo >= top if n.op_type in ("GreaterOrEqual", "LessOrEqual") else lo > top

    def _lower_bound(self, name: str, depth: int = 0) -> float | None:
        v = self._value(name)
        if v is not None:
            return float(np.min(v)) if np.asarray(v).size else None
        n = self.producer.get(name)
        if n is None or depth > 20 or n.domain not in ("", "ai.onnx"):
            return None
        if n.op_type in ("Reshape", "Unsqueeze", "Squeeze", "Expand", "Identity", "Flatten", "Cast",
                         "Transpose"):
            return self._lower_bound(n.input[0], depth + 1)
        if n.op_type == "Range":
            start, delta = self._value(n.input[0]), self._value(n.input[2])
            if start is not None and delta is not None and float(np.asarray(delta)) > 0:
                return float(np.asarray(start))
        return None

    def _reshaped(self, n: onnx.NodeProto, depth: int) -> frozenset[int] | None:
        """Values only move, so an output axis of size 1 cannot vary; the sizes come from the
        folded target shape (0 copies the input's size) or the output's static shape."""
        src = self.varying(n.input[0], depth + 1)
        if src is not None and not src:
            return frozenset()
        target = self._value(n.input[1]) if len(n.input) > 1 else None
        in_shape = self.shape_of(n.input[0])
        if target is not None:
            sizes = []
            for i, d in enumerate(np.asarray(target).reshape(-1).tolist()):
                if d == 0 and not any(a.name == "allowzero" and a.i for a in n.attribute):
                    d = in_shape[i] if in_shape is not None and i < len(in_shape) else "?"
                sizes.append(d)
        else:
            sizes = self.shape_of(n.output[0])
            if sizes is None:
                return None
        return frozenset(i - len(sizes) for i, d in enumerate(sizes) if d != 1)

    def _moved(self, n: onnx.NodeProto, op: str, depth: int) -> frozenset[int] | None:
        src = self.varying(n.input[0], depth + 1)
        r_in, r_out = self.rank_of(n.input[0]), self.rank_of(n.output[0])
        if src is None or r_in is None or r_out is None:
            return None
        pos_in = {a + r_in for a in src}  # left-aligned positions in the input
        if op == "Transpose":
            perm = self._ints(n, 99, "perm") or list(reversed(range(r_in)))
            out = {i for i, p in enumerate(perm) if p in pos_in}
        else:
            axes = self._ints(n, 1, "axes")
            if axes is None:
                return None
            if op == "Unsqueeze":
                new = {a % r_out for a in axes}
                keep = [i for i in range(r_out) if i not in new]  # output positions of input axes
            else:
                gone = {a % r_in for a in axes}
                keep_in = [i for i in range(r_in) if i not in gone]
                if pos_in & gone:
                    return None  # squeezing an axis that varies: it was not size 1
                out = {keep_in.index(p) for p in pos_in}
                return frozenset(i - r_out for i in out)
            out = {keep[p] for p in pos_in}
        return frozenset(i - r_out for i in out)


    # -- value sets -----------------------------------------------------------------------
    def zero_or_masked(self, name: str, depth: int = 0) -> bool:
        return self._values_in(name, _zero_or_masked, depth)

    def zero_or_one(self, name: str, depth: int = 0) -> bool:
        return self._values_in(name, lambda a: ((a == 0) | (a == 1)).all(), depth)

    def _values_in(self, name: str, test, depth: int) -> bool:
        if depth > 100:
            return False
        v = self._value(name)
        if v is not None:
            return bool(test(np.asarray(v, dtype=np.float64)))
        if self.dtype_of(name) == "bool" and test is not _zero_or_masked:
            return True
        n = self.producer.get(name)
        if n is None or n.domain not in ("", "ai.onnx"):
            return False
        op = n.op_type
        rec = lambda x, t=test: self._values_in(x, t, depth + 1)  # noqa: E731
        if op in ("Identity", "Expand", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Flatten"):
            return rec(n.input[0])
        if op == "Cast":
            return rec(n.input[0]) or (test is not _zero_or_masked and self.dtype_of(n.input[0]) == "bool")
        if op == "Where":
            return rec(n.input[1]) and rec(n.input[2])
        if test is _zero_or_masked:
            if op == "Add":
                return rec(n.input[0]) and rec(n.input[1])
            if op == "Mul":
                a, b = n.input[:2]
                return (rec(a) and self.zero_or_one(b, depth + 1)) or (rec(b) and self.zero_or_one(a, depth + 1))
            return False
        if op in ("Not", "And", "Or", "Xor", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
                  "IsNaN", "IsInf"):
            return True  # boolean results
        if op == "Sub":  # 1 - x for x in {0, 1}
            one = self._value(n.input[0])
            return one is not None and np.asarray(one).size == 1 and float(one) == 1.0 and rec(n.input[1])
        if op in ("Mul", "And"):
            return rec(n.input[0]) and rec(n.input[1])
        return False


def _zero_or_masked(a: np.ndarray) -> bool:
    return bool(((a == 0) | (a <= EXACT_FILL)).all())


__all__ = ["AxisFacts", "ELEMENTWISE"]
