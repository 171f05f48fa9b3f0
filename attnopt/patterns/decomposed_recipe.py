"""The recipe of a decomposed site (patterns/decomposed.py): its einsum labels give the
permutations into the op's canonical layouts.

Canonical orders: q [batch..., Sq, D], k [batch..., Skv, D], v [batch..., Skv, Dv], the output
[batch..., Sq, Dv], mask terms [batch..., Sq, Skv], with the batch axes in the order the scores
have them (at most 3: passes/lower.py views them as the op's [B, H]).
"""
from __future__ import annotations

from attnopt.ir import Graph, Site
from attnopt.ir.score_mods import softcap_of
from attnopt.patterns.details import DecomposedDetails
from attnopt.patterns.recipe import (MaskTerm, Operand, Recipe, dead_row_rule,
                                     simplify_constant_masks)


def decomposed_recipe(graph: Graph, site: Site) -> Recipe | str:
    """A recipe for the site, or the reason it cannot be rewritten exactly."""
    d: DecomposedDetails = site.details
    spec = site.spec
    s_labels = d.score_labels
    ql, kl, hl = d.query_label, d.key_label, d.head_label
    batch = [l for l in s_labels if l not in (ql, kl)]
    if len(batch) > 3:
        return f"{len(batch)} batch axes (at most 3 are supported)"
    q_lab, k_lab = d.q_labels, d.k_labels
    q = Operand(d.q_operand, tuple(q_lab.index(l) for l in batch + [ql, hl]))
    k = Operand(d.k_operand, tuple(k_lab.index(l) for l in batch + [kl, hl]))
    # C2 labels its operands itself; P's labels in C2 line up with the score labels by position.
    p_lab, v_lab, out_lab = d.p_labels, d.v_labels, d.out_labels
    p_perm = d.p_perm or tuple(range(len(p_lab)))
    to_c2 = {s_labels[p_perm[i]]: p_lab[i] for i in range(len(p_lab))}
    c2_batch = [to_c2[l] for l in batch]
    v = Operand(site.v, tuple(v_lab.index(l) for l in c2_batch + [to_c2[kl], d.value_label]))
    canon_out = c2_batch + [to_c2[ql], d.value_label]
    if sorted(out_lab) != sorted(canon_out):
        return "the output matmul's labels do not match the canonical layout"
    out_perm = tuple(canon_out.index(l) for l in out_lab)

    qs = graph.shape(q.node)
    batch_sizes = tuple(qs[q_lab.index(l)] for l in batch)
    ks = graph.shape(k.node)
    k_group_broadcast = len(batch) == 3 and ks[k_lab.index(batch[2])] == 1 and batch_sizes[2] != 1
    if len(batch) == 3 and not all(isinstance(x, int) for x in batch_sizes):
        return "symbolic sizes on a rank-3 batch"

    rank = len(s_labels)
    qpos, kpos = s_labels.index(ql), s_labels.index(kl)
    score_perm = tuple([i for i in range(rank) if i not in (qpos, kpos)] + [qpos, kpos])
    split = d.split_heads
    if split and (len(batch) != 1 or score_perm != (0, 1, 2)):
        return "merged-head scores not in [B*H, Sq, Skv] order"
    masks = []
    for op in d.mask_operands:
        literal = graph.scalar(op.node) if graph.ref(op.node) is None else None
        if op.view is not None and (op.merged_heads or split):
            return "a term added in a view of merged-head scores"
        if op.merged_heads:  # in the [B*H, Sq, Skv] layout of a bmm, before the model's view
            masks.append(MaskTerm(op.node, op.how, op.fill, op.scale, 3, (0, 1, 2), literal,
                                  merged_heads=op.merged_heads))
        elif split:  # in the model's [B, H, Sq, Skv] view of the scores
            masks.append(MaskTerm(op.node, op.how, op.fill, op.scale, 4, (0, 1, 2, 3), literal))
        else:
            masks.append(MaskTerm(op.node, op.how, op.fill, op.scale, rank, score_perm, literal,
                                  view=op.view))

    factors = tuple(MaskTerm(f, "mul", None, 1.0, rank, score_perm) for f in d.q_factors)
    dead_rows = dead_row_rule(graph, masks, spec.normalizer)
    if dead_rows.unsupported:
        return dead_rows.unsupported
    masks, causal, align = simplify_constant_masks(graph, spec, masks)
    # Scale ops on q and k are bypassed (their factor is in spec.scale); those on the scores are
    # inside the site and go with it.
    bypass = tuple((s.node, s.path) for s in d.scale_nodes if s.side in ("q", "k"))
    return Recipe(
        site=site.name, q=q, k=k, v=v, batch_rank=len(batch), batch_sizes=batch_sizes,
        k_group_broadcast=k_group_broadcast, masks=tuple(masks), scale=float(spec.scale),
        causal=causal, causal_alignment=align, window=None, softcap=softcap_of(spec.score_mods),
        normalizer=spec.normalizer, out_perm=out_perm, bypass=bypass, output=site.output,
        remove=frozenset(site.nodes), nan_guard=d.nan_guard,
        dead_rows_mean_v=dead_rows.mean_v, split_heads=split, q_factors=factors,
        head_dims=tuple(x if isinstance(x, int) else None for x in (spec.head_dim, spec.v_head_dim)),
        q_heads=spec.num_heads if isinstance(spec.num_heads, int) else None,
        k_heads=(spec.num_kv_heads * (d.kv_repeat or 1)
                 if isinstance(spec.num_kv_heads, int) else None))
