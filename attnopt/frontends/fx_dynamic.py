"""The `dynamic_shapes` that lets torch.export keep an nn.Module's input sizes symbolic.

`optimize(module, example_inputs)` exports the module before rewriting it. Exported with the
example inputs alone, the program (and so the optimized module) accepts only the example's
shapes ("Guard failed: x.size()[0] == 2" at any other batch). `auto_dynamic_shapes` marks every
dimension of every tensor input `Dim.AUTO`: export makes a dimension symbolic where the model
allows it (batch, sequence length, spatial sizes a convolution accepts) and keeps it static where
the model fixes it (an image size tied to position embeddings, a hidden size a weight fixes), with
no error either way.

Limits, all torch's: a dimension of size 0 or 1 in the example is specialized to that size (0/1
specialization), so a module optimized at batch 1 runs only at batch 1 and one optimized at
sequence length 1 only at length 1; optimize at a batch and length of at least 2 to keep them
dynamic. Non-tensor inputs (ints, bools, None, strings) are always static: export burns their
example values into the program, as it always did.
"""
from __future__ import annotations

import inspect
from typing import Any, Collection, Mapping

import torch


def auto_dynamic_shapes(module: torch.nn.Module, args: tuple, kwargs: dict,
                        static: Mapping[int, Collection[int]] | None = None) -> dict[str, Any] | None:
    """`dynamic_shapes` for exporting `module` on (args, kwargs): `Dim.AUTO` for every dimension
    of every tensor, None for every other leaf, mirroring the inputs' pytree structure the way
    export matches it (a registered user class by its flattened children). `static`: dimensions
    to keep at their example size, by the id of the example tensor. None when no dimension is
    left dynamic, or the inputs cannot be bound to `module.forward`."""
    from torch.export import Dim
    from torch.export.dynamic_shapes import _tree_map_with_path

    marked: list[int] = []

    def leaf(_path: Any, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return None
        fixed = static.get(id(value), ()) if static else ()
        dims = {i: Dim.AUTO for i in range(value.dim()) if i not in fixed}
        marked.extend(dims)
        return dims or None

    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return None
    shapes = {name: _tree_map_with_path(leaf, value, tree_name=name) for name, value in bound.items()}
    return shapes if marked else None
