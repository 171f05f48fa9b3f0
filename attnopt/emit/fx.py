"""Execute rewrite recipes on a torch.fx GraphModule (dynamo torch-level or unlifted aten).

Each recipe is lowered into neutral steps (passes/lower.py); this module turns each step and view
op into torch-level calls (permute, unsqueeze, flatten, where, add) around one
`torch.ops.attnopt.attention` (or `gna_attention`) call, and the linear layers of a site that
projects its own operands (torch's multi_head_attention_forward); eager execution, inductor and a
re-export with torch.export accept them at either level. The input GraphModule is never
modified: a copy of its graph is rewritten and wrapped around the same parameters.
"""
from __future__ import annotations

import copy
import operator
from typing import Sequence

import torch
import torch.fx as fx

from attnopt.frontends.fx_nodes import ASSERT_OPS, arg, base_name, dead_nodes, is_sdpa, meta_val, sdpa_args
from attnopt.passes.lower import (Attend, Broadcast, CombineMasks, Expand, Flatten, Linear, LoadOperand,
                                  MaskInput, MergeAxes, MeanVOnDeadRows, Permute, SizeOf, Squeeze,
                                  SplitLead, StoreOutput, ToRank, Unflatten, Unsqueeze, View,
                                  ZeroNaNRows, lower)
from attnopt.passes.rewrite import Recipe

def splice(gm: fx.GraphModule, recipes: Sequence[Recipe]) -> tuple[fx.GraphModule, dict[str, str]]:
    """A new GraphModule with every recipe applied (sharing gm's parameters), and for each
    site the name of the node that now computes its output."""
    import attnopt.codegen.gna_op  # noqa: F401 - registers torch.ops.attnopt.gna_attention
    import attnopt.codegen.ops  # noqa: F401 - registers torch.ops.attnopt.attention

    graph = copy.deepcopy(gm.graph)
    by_name = {n.name: n for n in graph.nodes}
    touched: set[fx.Node] = set()
    results = {}
    for r in recipes:
        results[r.site] = _apply(graph, by_name, r, touched).name
    # Computations that reach no output (detection never saw them: frontends/fx_nodes.dead_nodes)
    # would keep a replaced attention alive.
    _remove_dead(graph, touched | dead_nodes(graph))
    graph.lint()
    new = fx.GraphModule(gm, graph)
    new.meta.update(getattr(gm, "meta", {}))
    return new, results


def _call(graph: fx.Graph, fn, *args) -> fx.Node:
    return graph.call_function(fn, args)


def _view(graph: fx.Graph, x: fx.Node, op: View, src: fx.Node | None = None) -> fx.Node:
    """One neutral view op (passes/lower.py) as torch calls. `src`: the value a mask term was
    read from (SplitLead keeps a size-1 lead broadcast)."""
    match op:
        case Permute(perm=perm):
            return _call(graph, torch.permute, x, list(perm))
        case Unsqueeze(axes=axes):
            for a in axes:
                x = _call(graph, torch.unsqueeze, x, a)
            return x
        case Squeeze(axes=axes):
            for a in sorted(axes, reverse=True):
                x = _call(graph, torch.squeeze, x, a)
            return x
        case Flatten(start=start, end=end):
            return _call(graph, torch.flatten, x, start, end)
        case Unflatten(axis=axis, sizes=sizes):
            return _call(graph, torch.unflatten, x, axis, tuple(sizes))
        case Expand(sizes=sizes):
            return _call(graph, torch.Tensor.expand, x, *sizes)
        case ToRank(rank=rank):
            return _unsqueezed(graph, x, rank)
        case MergeAxes(groups=groups):
            for g in reversed(groups):  # right to left: the axes before a group keep their index
                if len(g) > 1:
                    x = _call(graph, torch.flatten, x, g[0], g[-1])
            return x
        case SplitLead(heads=heads):
            val = meta_val(src) if src is not None else None
            lead = val.shape[0] if isinstance(val, torch.Tensor) and val.dim() == op.rank else 1
            if lead == 1:
                return _call(graph, torch.unsqueeze, x, 0)
            return _call(graph, torch.unflatten, x, 0, (-1, heads))
    raise TypeError(f"unknown view op {op!r}")


def _views(graph: fx.Graph, x: fx.Node, views, src: fx.Node | None = None) -> fx.Node:
    for op in views:
        x = _view(graph, x, op, src)
    return x


def _apply(graph: fx.Graph, by: dict, r: Recipe, touched: set) -> fx.Node:
    low = lower(r)
    out_node = by[r.output]
    ops: dict[str, fx.Node] = {}
    mask = attn = result = None
    loads = [s for s in low.steps if isinstance(s, LoadOperand)]
    products: dict[tuple, fx.Node] = {}
    with graph.inserting_before(out_node):
        for step in low.steps:
            match step:
                case LoadOperand():
                    x = _projected(graph, by, step, loads, products)
                    ops[step.role] = _scaled(graph, by, step, _views(graph, x, step.views))
                case CombineMasks():
                    mask = _combined_mask(graph, by, step, ops["q"])
                case Attend():
                    attn = _attend(graph, step, ops["q"], ops["k"], ops["v"], mask)
                case ZeroNaNRows():
                    pass  # attnopt's ops write zeros, never NaN, on rows with every key masked
                case MeanVOnDeadRows():
                    attn = _mean_v_on_dead_rows(graph, by, step, attn, ops["v"])
                case StoreOutput():
                    result = _views(graph, attn, step.views)
                    if step.linear is not None:
                        result = _linear(graph, by, step.linear, result, [], products)
    out_node.replace_all_uses_with(result)
    for name, path in low.bypass:
        by[name].replace_all_uses_with(by[path])
        touched.add(by[name])
    touched.update(by[n] for n in low.remove if n in by)
    touched.add(out_node)
    return result


def _projected(graph: fx.Graph, by: dict, step: LoadOperand, loads: list[LoadOperand],
               products: dict) -> fx.Node:
    """The operand's input through its linear layer, with the extra key rows appended along the
    sequence axis (a [1, 1, E] row broadcast over the batch, or zeros)."""
    x = by[step.node]
    if step.linear is None:
        return x
    peers = [s.linear for s in loads if s.node == step.node and s.linear is not None]
    x = _linear(graph, by, step.linear, x, peers, products)
    if not step.append:
        return x
    first = _call(graph, torch.narrow, x, 0, 0, 1)  # [1, B, E]: the shape of one appended row
    rows = [_call(graph, torch.zeros_like, first) if r is None else _call(graph, torch.Tensor.expand_as, by[r], first)
            for r in step.append]
    return _call(graph, torch.cat, [x, *rows], 0)


def _packed(lin: Linear) -> bool:
    return lin.weight_rows is not None and (lin.bias is None or lin.bias_rows == lin.weight_rows)


def _linear(graph: fx.Graph, by: dict, lin: Linear, x: fx.Node, peers: list[Linear], products: dict
            ) -> fx.Node:
    """x @ weight[rows]ᵀ + bias[rows]. Operands that read one input through rows of one packed
    weight (self-attention's in_proj_weight) share one product over the rows they need, sliced
    per operand: one matrix product, as torch's own in-projection computes it."""
    group = [p for p in peers if _packed(p) and (p.weight, p.bias) == (lin.weight, lin.bias)]
    if not _packed(lin) or len(group) < 2:
        w = _rows(graph, by[lin.weight], lin.weight_rows)
        b = None if lin.bias is None else _rows(graph, by[lin.bias], lin.bias_rows)
        return _call(graph, torch.nn.functional.linear, x, w, b)
    lo, hi = min(p.weight_rows[0] for p in group), max(p.weight_rows[1] for p in group)
    key = (x.name, lin.weight, lin.bias, lo, hi)
    if key not in products:
        rows = (lo, hi)
        b = None if lin.bias is None else _rows(graph, by[lin.bias], rows)
        products[key] = _call(graph, torch.nn.functional.linear, x, _rows(graph, by[lin.weight], rows), b)
    start, stop = lin.weight_rows
    return _call(graph, torch.narrow, products[key], -1, start - lo, stop - start)


def _rows(graph: fx.Graph, w: fx.Node, rows: tuple[int, int] | None) -> fx.Node:
    return w if rows is None else _call(graph, torch.narrow, w, 0, rows[0], rows[1] - rows[0])


def _scaled(graph: fx.Graph, by: dict, step: LoadOperand, x: fx.Node) -> fx.Node:
    """q times the per-head factors the model multiplied its scores by (in q's dtype)."""
    for f in step.factors:
        t = _views(graph, _mask_term(graph, by, f, None), step.factor_views)
        x = _call(graph, operator.mul, x, _call(graph, torch.Tensor.type_as, t, x))
    return x


def _attend(graph: fx.Graph, a: Attend, q: fx.Node, k: fx.Node, v: fx.Node, mask: fx.Node | None
            ) -> fx.Node:
    if a.layout is not None:  # a GNA layout (the planner's): causal/window come from it
        lay = a.layout
        return _call(graph, torch.ops.attnopt.gna_attention.default, q, k, v, mask,
                     float(a.scale), list(lay.shape), list(lay.window), list(lay.stride),
                     list(lay.dilation), [bool(c) for c in lay.causal], int(a.leading),
                     a.normalizer, [int(h) for h in a.heads],
                     *([int(a.trailing)] if a.trailing else []))
    wl, wr = (a.window or (None, None))
    return _call(graph, torch.ops.attnopt.attention.default, q, k, v, mask, float(a.scale),
                 bool(a.causal), a.causal_alignment, -1 if wl is None else int(wl),
                 -1 if wr is None else int(wr), float(a.softcap or 0.0), a.normalizer)


def _mean_v_on_dead_rows(graph: fx.Graph, by: dict, step: MeanVOnDeadRows, attn: fx.Node,
                         v: fx.Node) -> fx.Node:
    """See MeanVOnDeadRows: where no select keeps a key, the output is the mean of V."""
    keep = None
    for i in step.selects:
        x = _mask_term(graph, by, i, None)
        x = _call(graph, torch.Tensor.bool, x)
        x = x if i.term.how == "keep" else _call(graph, torch.logical_not, x)
        keep = x if keep is None else _call(graph, torch.logical_and, keep, x)
    keep = _views(graph, keep, step.views)
    dead = _call(graph, torch.logical_not, _call(graph, torch.any, keep, -1, True))
    v_mean = _call(graph, torch.mean, v, -2, True)
    if step.kv_repeat != 1:
        v_mean = _call(graph, torch.repeat_interleave, v_mean, step.kv_repeat, 1)
    return _call(graph, torch.where, dead, _call(graph, torch.Tensor.to, v_mean, attn), attn)


def _mask_term(graph: fx.Graph, by: dict, i: MaskInput, q: fx.Node | None) -> fx.Node:
    """A mask term at the score rank in canonical order (passes/lower.mask_input)."""
    t = i.term
    if t.literal is not None:  # a python scalar in the model: a one-element tensor here,
        # on q's device (a CPU [1, 1, 1, 1] tensor cannot meet CUDA scores)
        x = graph.call_function(torch.Tensor.new_full, (q, [1] * t.rank, float(t.literal)),
                                {"dtype": torch.float32})
        return _views(graph, x, i.views)
    x = by[t.node]
    for op in i.views:
        if isinstance(op, Broadcast):  # sizes of the scores' view, symbolic ones read at run time
            sizes = [-1 if e is None else e if isinstance(e, int) else _size_of(graph, by, e)
                     for e in op.sizes]
            x = _call(graph, torch.Tensor.expand, x, *sizes)
        else:
            x = _view(graph, x, op, by[t.node])
    return x


def _size_of(graph: fx.Graph, by: dict, s: SizeOf):
    n = by[s.node]
    val = meta_val(n)
    dim = val.shape[s.axis] if isinstance(val, torch.Tensor) else None
    if isinstance(dim, int):
        return dim // s.divisor
    size = _call(graph, torch.Tensor.size, n, s.axis)
    return size if s.divisor == 1 else _call(graph, operator.floordiv, size, s.divisor)


def _unsqueezed(graph: fx.Graph, x: fx.Node, rank: int) -> fx.Node:
    """Prepend size-1 axes up to `rank` (broadcasting, without naming any size)."""
    val = meta_val(x)
    if not isinstance(val, torch.Tensor):
        raise ValueError(f"mask {x.name} has no shape")
    for _ in range(rank - val.dim()):
        x = _call(graph, torch.unsqueeze, x, 0)
    return x


def _combined_mask(graph: fx.Graph, by: dict, step: CombineMasks, q: fx.Node) -> fx.Node | None:
    """One attn_mask: a bool mask when the step says the terms are exactly one (all selections
    with a -inf fill), else an additive float mask (sums reproduce the model's own additions)."""
    if not step.inputs:
        return None
    acc = None
    for i in step.inputs:
        t, x = i.term, _mask_term(graph, by, i, q)
        if step.boolean:
            term = x if t.how == "keep" else _call(graph, torch.logical_not, x)
            term = _call(graph, torch.Tensor.bool, term)
            acc = term if acc is None else _call(graph, torch.logical_and, acc, term)
            continue
        if t.how == "add":
            term = x if t.factor == 1.0 else _call(graph, operator.mul, x, t.factor)
        else:
            cond = x if t.how == "drop" else _call(graph, torch.logical_not, x)
            term = _call(graph, torch.where, _call(graph, torch.Tensor.bool, cond), float(t.fill), 0.0)
        acc = term if acc is None else _call(graph, operator.add, acc, term)
    acc = _views(graph, acc, step.views)
    if step.pad:  # the extra keys (bias_k, add_zero_attn) attend from every query
        acc = _call(graph, torch.nn.functional.pad, acc, (0, step.pad), "constant",
                    True if step.boolean else 0.0)
    return acc


def _remove_dead(graph: fx.Graph, start: set) -> None:
    """Erase nodes that the rewrite left without users, and the producers that only fed
    them; asserts that only checked a dead value go with it."""
    work = list(start)
    erased: set[fx.Node] = set()
    while work:
        n = work.pop()
        if n in erased or n.op not in ("call_function", "call_method", "call_module"):
            continue
        if any(base_name(u) not in ASSERT_OPS for u in n.users):
            continue
        if n.op == "call_function" and base_name(n) in ASSERT_OPS:
            continue
        if n.op == "call_module" or _impure(n):
            continue
        for u in list(n.users):
            graph.erase_node(u)
            erased.add(u)
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        erased.add(n)
        work.extend(inputs)


def _impure(n: fx.Node) -> bool:
    # fx calls every dropout impure (it draws random numbers), but an eval-mode dropout is the
    # identity: left in place it kept the whole replaced attention alive (computed twice).
    if base_name(n) in ("dropout", "feature_dropout", "alpha_dropout") and not _training(n):
        return False
    # fx calls SDPA impure too (the aten schemas carry the nondeterministic_seeded tag for their
    # dropout). Without dropout it is pure; left in place, the SDPA a site was rewritten from ran
    # next to the fused op and doubled the attention time (found timing an HF ViT with SDPA).
    if is_sdpa(n) and sdpa_args(n)[1] == 0.0:
        return False
    try:
        return n.is_impure()
    except Exception:  # noqa: BLE001 - unknown targets are kept
        return True


def _training(n: fx.Node) -> bool:
    return bool(arg(n, 2, "train", arg(n, 2, "training", False)))
