"""The dynamic dimensions of an exported program, as `dynamic_shapes` for re-exporting it.

`optimize` re-exports the rewritten module of an ExportedProgram; exported with only its example
inputs, the result would be specialized to the example shape (range_constraints empty, "Guard
failed" at any other size). `dynamic_shapes_of` reads which user-input dimensions of the original
program are symbolic and their ranges, and returns the `dynamic_shapes` argument that keeps them:
one `Dim` per symbol (shared wherever the symbol recurs, with its min/max from range_constraints),
`Dim.AUTO` for a dimension that is an expression of symbols (export derives it again), None for
static dimensions and non-tensor inputs.
"""
from __future__ import annotations

import inspect
import logging
import sys
from typing import Any

import torch

log = logging.getLogger("attnopt")


def _bound(value: Any) -> int | None:
    try:
        v = int(value)
    except Exception:  # noqa: BLE001 - sympy's infinities raise OverflowError or AttributeError
        return None
    return v if abs(v) < sys.maxsize - 1 else None


def dynamic_shapes_of(ep: "torch.export.ExportedProgram", module: Any, args: tuple, kwargs: dict,
                      lenient: bool = False) -> Any:
    """`dynamic_shapes` for exporting `module` on (args, kwargs) with ep's dynamic dimensions, or
    None when ep has none (or its inputs cannot be matched to the example inputs). `lenient`:
    `Dim.DYNAMIC` for every symbolic dimension instead of named Dims with their ranges."""
    from torch.export import Dim

    if not ep.range_constraints:
        return None
    user_inputs = list(ep.graph_signature.user_inputs)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    flat, spec = torch.utils._pytree.tree_flatten((args, kwargs))
    if len(flat) != len(user_inputs):
        return None
    dims: dict[Any, Any] = {}
    leaves: list[Any] = []
    any_dynamic = False
    for name, value in zip(user_inputs, flat):
        val = placeholders[name].meta.get("val") if name in placeholders else None
        if not isinstance(value, torch.Tensor) or not isinstance(val, torch.Tensor):
            leaves.append(None)
            continue
        shape: dict[int, Any] = {}
        for i, size in enumerate(val.shape):
            if not isinstance(size, torch.SymInt):
                continue
            expr = size.node.expr
            if lenient:
                shape[i] = Dim.DYNAMIC
            elif getattr(expr, "is_Symbol", False):
                if expr not in dims:
                    vr = ep.range_constraints.get(expr)
                    lo = _bound(vr.lower) if vr is not None else None
                    hi = _bound(vr.upper) if vr is not None else None
                    dims[expr] = Dim(f"d_{expr}", min=lo, max=hi)
                shape[i] = dims[expr]
            else:
                shape[i] = Dim.AUTO
        any_dynamic = any_dynamic or bool(shape)
        leaves.append(shape or None)
    if not any_dynamic:
        return None
    args_ds, kwargs_ds = torch.utils._pytree.tree_unflatten(leaves, spec)
    try:
        bound = inspect.signature(module.forward).bind(*args_ds, **kwargs_ds)
    except (TypeError, ValueError):
        return None
    return dict(bound.arguments)


def reexport(ep: "torch.export.ExportedProgram", module: Any) -> "torch.export.ExportedProgram":
    """`module` (ep's rewritten module) exported on ep's example inputs, keeping ep's dynamic
    dimensions; specialized to the example shape, with a warning, if they cannot be kept.

    Named Dims first (symbols shared, ranges kept); if export's solver cannot prove a guard over
    such a range (a decoder step exported with `Dim.DYNAMIC` past length: `min(8 + 8*s, 16 + 16*s)
    == 8 + 8*s` is refused for a named Dim although it holds on the range), `Dim.DYNAMIC` for each
    symbolic dimension, as the original program was likely exported."""
    args, kwargs = ep.example_inputs
    args, kwargs = tuple(args), dict(kwargs)
    with torch.no_grad():
        for lenient in (False, True):
            dynamic = dynamic_shapes_of(ep, module, args, kwargs, lenient=lenient)
            if dynamic is None:
                break
            try:
                return torch.export.export(module, args, kwargs, strict=False, dynamic_shapes=dynamic)
            except Exception as e:  # noqa: BLE001 - fall back on the example shape, said below
                if not lenient:
                    continue
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                log.warning("attnopt: the optimized program keeps only the example input shapes "
                            "(re-exporting with the original dynamic dimensions failed: %s)", first)
        return torch.export.export(module, args, kwargs, strict=False)
