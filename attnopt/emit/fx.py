"""Execute rewrite recipes on a torch.fx GraphModule (dynamo torch-level or unlifted aten).

The replacement is emitted with torch-level calls (permute, unsqueeze, reshape, where, add)
around one `torch.ops.attnopt.attention` call; both eager execution, inductor and a re-export
with torch.export accept them at either level. The input GraphModule is never modified: a
copy of its graph is rewritten and wrapped around the same parameters.
"""
from __future__ import annotations

import copy
import operator
from typing import Sequence

import torch
import torch.fx as fx

from attnopt.frontends.fx_nodes import ASSERT_OPS, arg, base_name, is_sdpa, meta_val, sdpa_args
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
    _remove_dead(graph, touched)
    graph.lint()
    new = fx.GraphModule(gm, graph)
    new.meta.update(getattr(gm, "meta", {}))
    return new, results


def _call(graph: fx.Graph, fn, *args) -> fx.Node:
    return graph.call_function(fn, args)


def _permute(graph: fx.Graph, x: fx.Node, perm: tuple[int, ...]) -> fx.Node:
    if perm == tuple(range(len(perm))):
        return x
    return _call(graph, torch.permute, x, list(perm))


def _to_4d(graph: fx.Graph, x: fx.Node, r: Recipe, role: str = "q") -> fx.Node:
    """Canonical [batch..., S, D] (or a mask's [batch..., Sq, Skv]) -> [B, H, ...].

    role: "q", "kv" (a rank-3 batch with k broadcast over its last batch axis keeps that axis
    as GQA groups) or "mask" (broadcast axes are expanded before the merge). Merged-head
    recipes (`split_heads`) view [B*H, S, D] as [B, H, S, D]; their masks are 4-D already."""
    if r.split_heads:
        return x if role == "mask" else _call(graph, torch.unflatten, x, 0, (-1, r.split_heads))
    if r.batch_rank == 2:
        return x
    if r.batch_rank == 1:
        return _call(graph, torch.unsqueeze, x, 1)
    if r.batch_rank == 0:
        return _call(graph, torch.unsqueeze, _call(graph, torch.unsqueeze, x, 0), 0)
    if role == "kv" and r.k_group_broadcast:
        return _call(graph, torch.squeeze, x, 2)
    if role == "mask":
        b1, b2 = r.batch_sizes[1:3]
        x = _call(graph, torch.Tensor.expand, x, -1, b1, b2, -1, -1)
    return _call(graph, torch.flatten, x, 1, 2)


def _apply(graph: fx.Graph, by: dict, r: Recipe, touched: set) -> fx.Node:
    out_node = by[r.output]
    with graph.inserting_before(out_node):
        q = _to_4d(graph, _permute(graph, by[r.q.node], r.q.perm), r)
        k = _to_4d(graph, _permute(graph, by[r.k.node], r.k.perm), r, "kv")
        v = _to_4d(graph, _permute(graph, by[r.v.node], r.v.perm), r, "kv")
        mask = _combined_mask(graph, by, r, q)
        if r.layout is not None:  # a GNA layout (passes/plan.py): causal/window come from it
            lay = r.layout
            attn = _call(graph, torch.ops.attnopt.gna_attention.default, q, k, v, mask,
                         float(r.scale), list(lay.shape), list(lay.window), list(lay.stride),
                         list(lay.dilation), [bool(c) for c in lay.causal], int(r.leading),
                         r.normalizer, [int(h) for h in r.heads])
        else:
            wl, wr = (r.window or (None, None))
            attn = _call(graph, torch.ops.attnopt.attention.default, q, k, v, mask, float(r.scale),
                         bool(r.causal), r.causal_alignment, -1 if wl is None else int(wl),
                         -1 if wr is None else int(wr), float(r.softcap or 0.0), r.normalizer)
        if r.dead_rows_mean_v:
            attn = _mean_v_on_dead_rows(graph, by, r, attn, v)
        if r.split_heads:
            attn = _call(graph, torch.flatten, attn, 0, 1)
        elif r.batch_rank == 1:
            attn = _call(graph, torch.squeeze, attn, 1)
        elif r.batch_rank == 0:
            attn = _call(graph, torch.squeeze, _call(graph, torch.squeeze, attn, 0), 0)
        elif r.batch_rank == 3:
            attn = _call(graph, torch.unflatten, attn, 1, tuple(r.batch_sizes[1:3]))
        result = _permute(graph, attn, r.out_perm)
    out_node.replace_all_uses_with(result)
    for name, path in r.bypass:
        by[name].replace_all_uses_with(by[path])
        touched.add(by[name])
    touched.update(by[n] for n in r.remove if n in by)
    touched.add(out_node)
    return result


def _mean_v_on_dead_rows(graph: fx.Graph, by: dict, r: Recipe, attn: fx.Node, v: fx.Node
                         ) -> fx.Node:
    """Rows whose keys are all masked by a finite fill are softmax(constant) = mean of V in the
    model; the kernel gives zeros there. Only the where-selects decide which rows are dead:
    additive terms beside them are biases that never mask (rewrite._dead_row_rule)."""
    keep = None
    for t in (t for t in r.masks if t.how in ("keep", "drop")):
        x = _term(graph, by, t, _unsqueezed(graph, by[t.node], t.rank))
        x = _call(graph, torch.Tensor.bool, x)
        x = x if t.how == "keep" else _call(graph, torch.logical_not, x)
        keep = x if keep is None else _call(graph, torch.logical_and, keep, x)
    keep = _to_4d(graph, keep, r, "mask")
    dead = _call(graph, torch.logical_not, _call(graph, torch.any, keep, -1, True))
    v_mean = _call(graph, torch.mean, v, -2, True)
    if r.q_heads and r.k_heads and r.q_heads != r.k_heads:
        v_mean = _call(graph, torch.repeat_interleave, v_mean, r.q_heads // r.k_heads, 1)
    return _call(graph, torch.where, dead, _call(graph, torch.Tensor.to, v_mean, attn), attn)


def _term(graph: fx.Graph, by: dict, t, x: fx.Node) -> fx.Node:
    """A mask term at the score rank, permuted to canonical order; a merged-head term's
    [B*H, Sq, Skv] viewed as [B, H, Sq, Skv] (a size-1 batch axis stays broadcast)."""
    x = _permute(graph, x, t.perm)
    if not t.merged_heads:
        return x
    val = meta_val(by[t.node]) if t.literal is None else None
    lead = val.shape[0] if isinstance(val, torch.Tensor) and val.dim() == t.rank else 1
    if lead == 1:
        return _call(graph, torch.unsqueeze, x, 0)
    return _call(graph, torch.unflatten, x, 0, (-1, t.merged_heads))


def _unsqueezed(graph: fx.Graph, x: fx.Node, rank: int) -> fx.Node:
    """Prepend size-1 axes up to `rank` (broadcasting, without naming any size)."""
    val = meta_val(x)
    if not isinstance(val, torch.Tensor):
        raise ValueError(f"mask {x.name} has no shape")
    for _ in range(rank - val.dim()):
        x = _call(graph, torch.unsqueeze, x, 0)
    return x


def _combined_mask(graph: fx.Graph, by: dict, r: Recipe, q: fx.Node) -> fx.Node | None:
    """One attn_mask from the recipe's terms: a bool mask if all terms are selections with a
    -inf fill, else an additive float mask (sums reproduce the model's own additions)."""
    if not r.masks:
        return None
    parts = []
    for t in r.masks:
        if t.literal is not None:  # a python scalar in the model: a one-element tensor here,
            # on q's device (a CPU [1, 1, 1, 1] tensor cannot meet CUDA scores)
            x = graph.call_function(torch.Tensor.new_full, (q, [1] * t.rank, float(t.literal)),
                                    {"dtype": torch.float32})
        else:
            x = _unsqueezed(graph, by[t.node], t.rank)
        parts.append((t, _term(graph, by, t, x)))
    all_bool = all(t.how in ("keep", "drop") and t.fill == float("-inf") for t, _ in parts)
    acc = None
    for t, x in parts:
        if all_bool:
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
    return _to_4d(graph, acc, r, "mask")


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
