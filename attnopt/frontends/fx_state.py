"""State a graph run may change, and putting it back: the tensors an fx graph writes in place.

attnopt runs a user's graph more than once (the evaluator's probe runs, validation's reference and
rewritten runs, padded variants, the planner's measurements), while the caller expects exactly
the runs it asked for: a static KV cache written with `index_copy_`, a counter bumped with
`add_`, BatchNorm's running statistics. Every such extra run is wrapped in `preserved(gm,
inputs)`, which clones what the graph may write before the run and copies it back afterwards, so
each run starts from the caller's state and leaves it as it found it.

What the graph may write is read from the graph: in-place methods and ops (`x.index_copy_(...)`,
`aten.copy_`, any op whose schema marks an argument written, an `out=` argument,
`operator.setitem`), functional batch/instance norm with running statistics, and submodule calls
(whose buffers are all kept). Each written value is followed back through view ops to the graph
input or attribute it aliases; a write whose origin cannot be followed keeps every tensor input.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Any, Collection, Iterator, Sequence

import torch
import torch.fx as fx

from attnopt.frontends.fx_nodes import base_name

# Ops whose result may alias their (first) tensor argument: a write to the result writes the input.
_VIEWS = {"view", "reshape", "_unsafe_view", "view_as", "reshape_as", "transpose", "swapaxes",
          "swapdims", "permute", "t", "T", "mT", "slice", "select", "narrow", "getitem",
          "__getitem__", "expand", "expand_as", "broadcast_to", "unsqueeze", "squeeze", "flatten",
          "unflatten", "as_strided", "diagonal", "movedim", "moveaxis", "split", "chunk",
          "unbind", "tensor_split", "split_with_sizes", "unfold", "alias", "detach", "detach_",
          "contiguous", "to", "type", "type_as", "float", "half", "double", "bfloat16", "real",
          "imag", "view_as_real", "view_as_complex", "data", "indices", "values", "lift_fresh",
          "lift_fresh_copy", "identity", "getattr"}
_NORMS = {"batch_norm", "instance_norm", "_native_batch_norm_legit", "native_batch_norm",
          "cudnn_batch_norm", "miopen_batch_norm", "_batch_norm_impl_index"}


def _written_args(node: fx.Node) -> list[Any]:
    """The arguments `node` writes in place (fx nodes or other values), empty for a pure op."""
    if node.op not in ("call_function", "call_method"):
        return []
    name = base_name(node)
    t = node.target
    out: list[Any] = []
    if isinstance(t, torch._ops.OpOverload):
        args = t._schema.arguments
        for i, a in enumerate(args):
            if a.alias_info is not None and a.alias_info.is_write:
                if a.kwarg_only or i >= len(node.args):
                    out.append(node.kwargs.get(a.name))
                else:
                    out.append(node.args[i])
    elif name.endswith("_") and not name.endswith("__") and node.args:
        out.append(node.args[0])  # x.add_(...), torch.Tensor.index_copy_(x, ...)
    elif t is operator.setitem and node.args:
        out.append(node.args[0])
    elif name in _NORMS:
        out.extend(a for a in list(node.args[1:5]) + [node.kwargs.get("running_mean"),
                                                        node.kwargs.get("running_var")])
    if "out" in node.kwargs:
        out.append(node.kwargs["out"])
    if name.startswith("i") and name[1:] in ("add", "sub", "mul", "truediv", "floordiv", "and",
                                             "or", "xor", "pow", "mod", "lshift", "rshift"):
        out.append(node.args[0] if node.args else None)  # operator.iadd on a tensor is in place
    return [a for a in out if isinstance(a, (fx.Node, list, tuple))]


def _roots(value: Any, seen: set[fx.Node]) -> Iterator[fx.Node | None]:
    """The placeholders / get_attrs a written value may alias; None when it cannot be told."""
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _roots(v, seen)
        return
    if not isinstance(value, fx.Node) or value in seen:
        return
    seen.add(value)
    if value.op in ("placeholder", "get_attr"):
        yield value
        return
    if value.op == "call_module":
        if not _torch_module(value):
            yield None  # a user's leaf module may return (a view of) anything
            return
        yield from _roots(value.args[0] if value.args else None, seen)  # Identity, Flatten, eval Dropout
        return
    if value.op in ("call_function", "call_method"):
        name = base_name(value)
        if name in _VIEWS or _written_args(value):
            # a view (or an in-place op, which returns its input): its first tensor argument
            first = next((a for a in value.args if isinstance(a, (fx.Node, list, tuple))), None)
            yield from _roots(first, seen)
        # otherwise a fresh tensor: writing it changes nothing the caller holds


def _attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _torch_module(node: fx.Node) -> bool:
    sub = _attr(node.graph.owning_module, str(node.target))
    return isinstance(sub, torch.nn.Module) and type(sub).__module__.startswith("torch.")


def mutable_tensors(gm: fx.GraphModule, inputs: Sequence[Any],
                    only: Collection[fx.Node] | None = None) -> list[torch.Tensor]:
    """The caller's tensors a run of `gm` on `inputs` may write (graph inputs, buffers, params);
    `only`: the nodes a partial run executes (the evaluator's), else the whole graph."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found: dict[int, torch.Tensor] = {}
    unknown = False

    def keep(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            found[id(t)] = t

    for node in gm.graph.nodes:
        if only is not None and node not in only:
            continue
        if node.op == "call_module":
            sub = _attr(gm, str(node.target))
            if isinstance(sub, torch.nn.Module):
                for b in sub.buffers():
                    keep(b)
            # torch's modules (nn layers, export's guard) write only their own buffers (BatchNorm's statistics)
            written: list[Any] = [] if _torch_module(node) else list(node.args) + list(node.kwargs.values())
        else:
            written = _written_args(node)
        for w in written:
            for root in _roots(w, set()):
                if root is None:
                    unknown = True
                elif root.op == "placeholder":
                    i = placeholders.index(root)
                    if i < len(inputs):
                        keep(inputs[i])
                else:
                    keep(_attr(gm, str(root.target)))
    if unknown:
        for x in torch.utils._pytree.tree_flatten(list(inputs))[0]:
            keep(x)
    return list(found.values())


@contextlib.contextmanager
def preserved(gm: fx.GraphModule, inputs: Sequence[Any],
              only: Collection[fx.Node] | None = None) -> Iterator[None]:
    """Run the body, then put back every tensor the graph (or the nodes `only`) may have written."""
    tensors = [t for t in mutable_tensors(gm, inputs, only) if not isinstance(t, torch._subclasses.FakeTensor)]
    with torch.no_grad():
        saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.detach().copy_(s)
