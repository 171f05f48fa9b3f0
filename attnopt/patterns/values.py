"""Facts about values that patterns need: is it a constant, what scalar is it, where from.

A value is *constant* when it depends on no user input except through shape queries (an ONNX
`Shape`, an fx `sym_size`): weights, buffers and numbers computed from them or from static
sizes. Constants that are not literal in the IR (e.g. `1/sqrt(Cast(Gather(Shape(q))))`) are
computed with the front end's evaluator.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attnopt.ir import Graph

def is_shape_query(graph: Graph, nid: str) -> bool:
    """A value that depends on its input's shape only (ONNX Shape and Size, fx sym_size, size,
    dim, numel: the front ends translate them all to the IR's `shape`)."""
    return graph.op(nid) == "shape"


@dataclass(frozen=True)
class NotConstant:
    """Why a value is not a compile-time constant."""

    reason: str


def user_inputs_reached(graph: Graph, nid: str) -> list[str]:
    """User inputs whose *values* (not just shapes) flow into `nid`."""
    cache = graph.__dict__.setdefault("_value_deps", {})
    if nid in cache:
        return cache[nid]
    found: list[str] = []
    stack, seen = [nid], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        op = graph.op(n)
        if op == "input":
            if graph.attr(n, "role", "user") == "user":
                found.append(n)
            continue
        if is_shape_query(graph, n):
            continue
        stack.extend(graph.inputs_of(n))
    cache[nid] = sorted(found)
    return cache[nid]


def scalar_value(graph: Graph, nid: str) -> float | NotConstant | None:
    """The value of a one-element constant; NotConstant if it depends on user input; None if
    the value has more than one element (not a scalar)."""
    shape = graph.shape(nid)
    if shape is not None and any(isinstance(d, int) and d != 1 for d in shape):
        return None
    if graph.op(nid) == "const":
        v = graph.value(nid)
        if v is not None:
            return float(v.reshape(-1)[0]) if v.size == 1 else None
    deps = user_inputs_reached(graph, nid)
    if deps:
        return NotConstant(f"{graph.describe(nid)} depends on the input {deps[0]!r}")
    if graph.evaluator is None:
        return NotConstant(f"{graph.describe(nid)} cannot be evaluated")
    try:
        v = np.asarray(graph.evaluator.evaluate([nid])[nid])
    except Exception as e:  # noqa: BLE001 - report, do not crash detection
        return NotConstant(f"{graph.describe(nid)} could not be evaluated ({type(e).__name__})")
    if v.size != 1:
        return None
    return float(v.reshape(-1)[0])


def numel(shape) -> int | None:
    if shape is None or any(not isinstance(d, int) for d in shape):
        return None
    return int(np.prod(shape)) if shape else 1


def is_zero_constant(graph: Graph, nid: str) -> bool:
    """Whether `nid` is a constant whose every element is 0 (baddbmm's zeros bias)."""
    if user_inputs_reached(graph, nid) or graph.evaluator is None:
        return False
    try:
        return not np.any(graph.evaluator.evaluate([nid])[nid])
    except Exception:  # noqa: BLE001 - unknown: keep the bias
        return False
