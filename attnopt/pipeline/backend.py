"""torch.compile backend "attnopt": rewrite attention in the dynamo graph, then hand the
result to inductor (or run it eagerly), so users get inductor's fusions for the rest of the
model plus ours for attention.

    torch.compile(model, backend="attnopt")
    torch.compile(model, backend=attnopt.pipeline.backend.make_backend(inner="eager"))
    make_backend(inner="aot_eager"): AOTAutograd without inductor (a training step's joint graph,
    partitioned into forward and backward, run eagerly: fast to compile, for tests and debugging)

A graph the front end cannot read or splice (optimize_graph_module), or whose rewritten form the
inner compiler refuses, runs as it came, with one warning giving the reason.

Symbolic graphs (dynamic=True, automatic dynamic's recompile) are rewritten once per graph
compile with batch and sequence lengths left symbolic; what a rewrite must fix (head sizes, a
float it folds) is pinned by a dynamo guard, logged with its reason (pipeline/symbolic.py).

Training graphs (grad enabled and an input requiring grad) are rewritten the same way, before
AOTAutograd: the ops carry their autograd formulas (codegen/autograd.py), so inductor's joint
graph holds attnopt::attention (or gna_attention) and its backward op. Validation runs the
forward only (under no_grad); the gradients are the ops' exact ones. A site whose attention
probabilities pass through an active dropout is not matched (the ops have no dropout), so it
stays as the model wrote it.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

log = logging.getLogger("attnopt")
INNER = ("inductor", "eager", "aot_eager")


def _inner_compile(inner: str, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, list(example_inputs))
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs))


def _unit_axis_index(index: Any) -> int | None:
    """The axis `x[index]` inserts when the index is full slices, one None and at most one
    Ellipsis (a view with one new unit axis: x.unsqueeze(axis)), else None."""
    items = list(index) if isinstance(index, tuple) else [index]
    full = slice(None, None, None)
    if items.count(None) != 1 or items.count(Ellipsis) > 1 or any(
            i is not None and i is not Ellipsis and i != full for i in items):
        return None
    pos = items.index(None)
    if Ellipsis in items and items.index(Ellipsis) < pos:
        return pos - len(items)  # counted from the end: the axes after the Ellipsis are the last ones
    return pos


def unit_axis_views(gm: fx.GraphModule) -> int:
    """Spell dynamo's `x[:, :, None]` (operator.getitem inserting one unit axis) as
    `x.unsqueeze(2)`: the same view, which the front end reads as a reshape, so a value built
    from it stays readable (transformers' repeat_kv is `x[:, :, None].expand(...).reshape(...)`:
    read as grouped KV heads, patterns/heads.kv_group_source). Returns how many were changed."""
    import operator

    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
            continue
        src, index = node.args
        val = src.meta.get("example_value") if isinstance(src, fx.Node) else None
        axis = _unit_axis_index(index)
        if axis is None or not isinstance(val, torch.Tensor):
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_method("unsqueeze", (src, axis))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed += 1
    if changed:
        gm.recompile()
    return changed


def _rewrite(gm: fx.GraphModule, example_inputs: Sequence[Any], validate: bool):
    """optimize_graph_module on a dynamo graph, once per graph compile (never per call). A graph
    with symbolic sizes or unspecialized floats first gets the few values a rewrite must fix
    (head sizes, folded floats) pinned by guards, and what the rewrite added is run on the
    symbolic sizes so any size it assumes becomes a guard too (pipeline/symbolic.py); batch and
    sequence lengths stay dynamic."""
    from attnopt.pipeline import symbolic
    from attnopt.pipeline.optimize_torch import optimize_graph_module

    unit_axis_views(gm)  # the same views, spelled as ops the front end reads (in place)
    floats = symbolic.symbolic_floats(gm)
    work = symbolic.float_literals(gm, floats) if floats else gm
    dynamic = symbolic.is_symbolic(example_inputs)
    if dynamic:
        symbolic.pin_head_sizes(work, example_inputs)
    new_gm, result = optimize_graph_module(work, list(example_inputs), validate=validate)
    if new_gm is work:  # nothing rewritten: the graph as it came, no float pinned
        return gm, result
    consumed = symbolic.keep_consumed(work, new_gm, floats) if floats else []
    if dynamic:
        try:
            symbolic.check_rewritten(gm, new_gm)
        except Exception as e:  # noqa: BLE001 - the graph as it came holds for every size
            why = f"the rewrite does not hold for symbolic sizes ({type(e).__name__}: {e})"
            log.warning("attnopt: graph left unoptimized: %s", why)
            result.sites = [replace(s, status="kept", reason=why) if s.status == "rewritten" else s
                            for s in result.sites]
            result.model = gm
            return gm, result
    symbolic.pin_floats(consumed)
    return new_gm, result


def make_backend(inner: str = "inductor", validate: bool = True) -> Callable:
    if inner not in INNER:
        raise ValueError(f"inner must be one of {INNER}, got {inner!r}")

    def attnopt_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **_: Any) -> Callable:
        new_gm, result = _rewrite(gm, example_inputs, validate)
        log.info("attnopt: %d/%d attention sites rewritten (error %.2g, %s)",
                 result.sites_rewritten, result.sites_found, result.rel_error, result.error_metric)
        if new_gm is gm:
            return _inner_compile(inner, gm, example_inputs)
        try:
            return _inner_compile(inner, new_gm, example_inputs)
        except torch._dynamo.exc.RestartAnalysis:
            # dynamo's control flow, not a failure: inductor asks for a retrace (e.g. with a float
            # the rewrite pinned specialized, TensorifyScalarRestartAnalysis); the retraced graph
            # comes back here and is rewritten as it then is.
            raise
        except Exception as e:  # noqa: BLE001 - the graph as it came still compiles
            log.warning("attnopt: graph left unoptimized: %s could not compile the rewritten graph "
                        "(%s: %s)", inner, type(e).__name__, e)
            return _inner_compile(inner, gm, example_inputs)

    return attnopt_backend


def register() -> None:
    from torch._dynamo import list_backends, register_backend

    if "attnopt" not in list_backends(exclude_tags=()):
        register_backend(name="attnopt")(make_backend())
