"""Plan the replacement of one site by one call of `attnopt::attention`, format-neutrally.

The op takes q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv] and an optional
attn_mask broadcastable to [B, H, Sq, Skv] (bool: True attends; float: added to the scaled
scores, exactly as F.scaled_dot_product_attention). A `Recipe` says how to bring the site's
boundary values into that layout (permutations from einsum labels, batch-rank adaptation) and
back, which scale ops to bypass (their factor is folded into `scale`), and how to combine the
mask operands. Front ends execute recipes in their own graph format (frontends/*_splice.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from attnopt.ir import GNALayout, Graph, Site
from attnopt.ir.vocab import EXACT_FILL as OVERWHELMING_FILL  # a fill that overwhelms any bias (_never_masks)


@dataclass(frozen=True)
class Operand:
    node: str
    perm: tuple[int, ...]  # applied first: brings labels to canonical order


@dataclass(frozen=True)
class MaskTerm:
    node: str
    how: str  # add | keep | drop
    fill: float | None
    factor: float
    rank: int  # rank the operand is broadcast to (the score rank) before `perm`
    perm: tuple[int, ...]
    literal: float | None = None  # a scalar written as a literal in the model (no graph node)
    # > 0: the term is in a bmm's [B*H, Sq, Skv] layout (added before the model viewed its
    # scores as [B, H, Sq, Skv]; BLOOM's ALiBi, DeBERTa's position scores); this is H, so the
    # splice views it as [B, H, Sq, Skv] like the other terms.
    merged_heads: int = 0


@dataclass(frozen=True)
class Recipe:
    site: str
    q: Operand
    k: Operand
    v: Operand
    batch_rank: int  # number of batch axes in canonical order (0..3)
    batch_sizes: tuple  # sizes of those axes (from q)
    k_group_broadcast: bool  # rank-3 batch: k has size 1 on the last batch axis (GQA)
    masks: tuple[MaskTerm, ...]
    scale: float
    causal: bool
    causal_alignment: str
    window: tuple[int | None, int | None] | None
    softcap: float | None
    normalizer: str
    out_perm: tuple[int, ...]  # canonical [batch..., Sq, Dv] -> the site output's layout
    bypass: tuple[tuple[str, str], ...] = ()  # (scale node, its tensor input): bypassed
    output: str = ""
    remove: frozenset[str] = field(default_factory=frozenset)
    nan_guard: bool = False  # the model zeroes NaN probabilities (fully masked rows)
    # Head counts of the canonical 4-D q and k operands as detection proved them (exporters
    # may leave the shapes symbolic; a fused node needs them static).
    q_heads: int | None = None
    k_heads: int | None = None
    # (q/k head dim, v head dim) as detection proved them (probed where shapes are symbolic).
    head_dims: tuple[int | None, int | None] = (None, None)
    # The model masks by where(..., finite fill) with an input-dependent mask: a query row whose
    # keys are all masked is softmax of a constant there, i.e. the mean of V; the fused op must
    # reproduce that (kernels give such rows zeros).
    dead_rows_mean_v: bool = False
    # A GNA layout over the tokens after `leading` global ones: the splice emits
    # `attnopt::gna_attention` instead of `attnopt::attention` (causal/window then come from
    # the layout; `causal` and `window` above must be unset). Set by passes/plan.py only.
    layout: GNALayout | None = None
    leading: int = 0
    # Per-head choice: the canonical query heads that run `layout` (empty: all of them); the
    # others keep the site's exact attention.
    heads: tuple[int, ...] = ()
    # > 0: q, k, v and the output are [B*H, S, D] (batch_rank 1, heads merged into the batch,
    # BLOOM / DeBERTa) and the model views its scores as [B, H, Sq, Skv]: the splice views the
    # operands as [B, H, S, D] (this is H) so masks keep that layout. Masks without
    # `merged_heads` are rank 4 in the [B, H, Sq, Skv] view.
    split_heads: int = 0


def plan_all(graph: Graph, sites: list[Site]) -> tuple[list[Recipe], dict[str, str]]:
    """Recipes for the sites that can be rewritten, and the reason for each that cannot."""
    recipes, reasons = [], {}
    for s in sites:
        r = plan(graph, s)
        if isinstance(r, str):
            reasons[s.name] = r
        else:
            recipes.append(r)
    return recipes, reasons


def plan(graph: Graph, site: Site) -> Recipe | str:
    """A recipe for the site, or the reason it cannot be rewritten exactly."""
    if site.pattern == "fused:torch_sdpa":
        return _plan_sdpa(graph, site)
    if site.pattern != "decomposed":
        return f"{site.pattern} sites are kept as they are (already fused)"
    d = site.details
    spec = site.spec
    s_labels: str = d["score_labels"]
    ql, kl, hl = d["query_label"], d["key_label"], d["head_label"]
    batch = [l for l in s_labels if l not in (ql, kl)]
    if len(batch) > 3:
        return f"{len(batch)} batch axes (at most 3 are supported)"
    q_lab, k_lab = d["q_labels"], d["k_labels"]
    q = Operand(d["q_operand"], tuple(q_lab.index(l) for l in batch + [ql, hl]))
    k = Operand(d["k_operand"], tuple(k_lab.index(l) for l in batch + [kl, hl]))
    # C2 labels its operands itself; P's labels in C2 line up with the score labels by position.
    p_lab, v_lab, out_lab = d["p_labels"], d["v_labels"], d["out_labels"]
    p_perm = d.get("p_perm") or tuple(range(len(p_lab)))
    to_c2 = {s_labels[p_perm[i]]: p_lab[i] for i in range(len(p_lab))}
    c2_batch = [to_c2[l] for l in batch]
    v = Operand(site.v, tuple(v_lab.index(l) for l in c2_batch + [to_c2[kl], d["value_label"]]))
    canon_out = c2_batch + [to_c2[ql], d["value_label"]]
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
    canon_scores = list(range(rank))
    qpos, kpos = s_labels.index(ql), s_labels.index(kl)
    score_perm = tuple([i for i in canon_scores if i not in (qpos, kpos)] + [qpos, kpos])
    split = int(d.get("split_heads") or 0)
    if split and (len(batch) != 1 or score_perm != (0, 1, 2)):
        return "merged-head scores not in [B*H, Sq, Skv] order"
    masks = []
    for op in site.details.get("mask_operands", ()):
        literal = graph.scalar(op.node) if graph.ref(op.node) is None else None
        if op.merged_heads:  # in the [B*H, Sq, Skv] layout of a bmm, before the model's view
            masks.append(MaskTerm(op.node, op.how, op.fill, op.scale, 3, (0, 1, 2), literal,
                                  merged_heads=op.merged_heads))
        elif split:  # in the model's [B, H, Sq, Skv] view of the scores
            masks.append(MaskTerm(op.node, op.how, op.fill, op.scale, 4, (0, 1, 2, 3), literal))
        else:
            masks.append(MaskTerm(op.node, op.how, op.fill, op.scale, rank, score_perm, literal))

    dead_rows = _dead_row_rule(graph, masks, spec.normalizer)
    if dead_rows.startswith("reject:"):
        return dead_rows.removeprefix("reject:")
    masks, causal, align = _simplify_constant_masks(graph, spec, masks)
    softcap = next((float(s.split(":")[1]) for s in spec.score_mods if s.startswith("softcap:")), None)
    bypass = tuple((n, path) for n, side, _f, path in d.get("scale_nodes", []) if side in ("q", "k"))
    return Recipe(
        site=site.name, q=q, k=k, v=v, batch_rank=len(batch), batch_sizes=batch_sizes,
        k_group_broadcast=k_group_broadcast, masks=tuple(masks), scale=float(spec.scale),
        causal=causal, causal_alignment=align, window=None, softcap=softcap,
        normalizer=spec.normalizer, out_perm=out_perm, bypass=bypass, output=site.output,
        remove=frozenset(site.nodes), nan_guard=bool(d.get("nan_guard")),
        dead_rows_mean_v=dead_rows == "mean_v", split_heads=split,
        head_dims=tuple(x if isinstance(x, int) else None for x in (spec.head_dim, spec.v_head_dim)),
        q_heads=spec.num_heads if isinstance(spec.num_heads, int) else None,
        k_heads=(spec.num_kv_heads * (d.get("kv_repeat") or 1)
                 if isinstance(spec.num_kv_heads, int) else None))


def _simplify_constant_masks(graph: Graph, spec, masks: list) -> tuple[list, bool, str]:
    """(masks, causal flag, alignment) for a site without a causal flag of its own, with masks
    the analysis proved structural dropped.

    Masks that depend on no user input, carry no bias and whose evaluated pattern is "none"
    (every pair attends: HF's bidirectional models build such an all-True mask) are dropped
    outright; a purely causal one (static sizes) becomes the op's causal flag. Either way the
    same pairs attend, and the fast path needs no mask tensor (a 4K-token all-True bool mask cost
    the SDPA call 100 ms of mask conversion on CPU)."""
    m = spec.mask
    if not _structural(graph, spec, masks):
        return masks, False, "top_left"
    if m.kind == "none":
        return [], False, "top_left"
    if m.kind == "causal":
        return [], True, m.alignment
    return masks, False, "top_left"


def structural_windows(graph: Graph, sites: list[Site], recipes: list[Recipe]) -> list[Recipe]:
    """Recipes whose masks the analysis proved to be exactly a sliding window (evaluated: every
    allowed pair is in the band and every pair of the band is allowed), depend on no user input and
    carry no padding, with those masks replaced by the op's window arguments: the same pairs attend,
    and on CPU the exact window kernel computes only each query run's keys instead of the dense
    masked product (HF Mistral, 4K tokens, window 512: see bench/sliding_window_model.py). For
    the torch splice only: the ONNX splice has no window form and keeps the mask."""
    by_name = {s.name: s for s in sites}
    out = []
    for r in recipes:
        site = by_name.get(r.site)
        m = site.spec.mask if site is not None else None
        if (m is None or m.kind != "sliding_window" or r.window is not None or r.causal or r.layout is not None
                or not _structural(graph, site.spec, list(r.masks))):
            out.append(r)
            continue
        if m.right == 0:  # causal band: j - i - offset in [-left, 0] with the mask's own alignment
            out.append(replace(r, masks=(), causal=True, causal_alignment=m.alignment, window=(m.left, 0)))
        else:  # masks.py measures the band from the bottom-right diagonal (offset Skv - Sq)
            out.append(replace(r, masks=(), causal=False, causal_alignment="bottom_right",
                               window=(m.left, m.right)))
    return out


def _structural(graph: Graph, spec, masks: list) -> bool:
    """Whether `masks` are exactly the pattern the analysis evaluated (spec.mask): no padding, no
    score modifiers, static sizes, and no mask depends on a user input."""
    return bool(masks and not spec.mask.padding and not spec.score_mods and isinstance(spec.q_len, int)
                and isinstance(spec.kv_len, int) and all(_is_constant(graph, mt.node) for mt in masks))


def _is_constant(graph: Graph, nid: str) -> bool:
    from attnopt.patterns.values import user_inputs_reached

    return not user_inputs_reached(graph, nid)


def _dead_row_rule(graph: Graph, masks: list[MaskTerm], normalizer: str) -> str:
    """What a query row with every key masked computes in the model: "" (nothing to do: the
    mask is constant and the analysis proved every row keeps a key, or masked rows are NaN /
    zero in the model too), "mean_v", or "reject:<reason>" when it is not reproducible.

    `masks` run from the normalizer inwards. A finite-fill where replaces what is beneath it,
    so a row it masks entirely is softmax(fill, ..., fill) = mean of V whatever biases were
    added before it (MPT: ALiBi, then masked_fill(mask, finfo.min)). Adds after the where, or
    adds that can themselves mask, would change which keys such rows keep (see _never_masks)."""
    import math

    selects = [t for t in masks if t.how in ("keep", "drop")]
    finite = [t for t in selects if t.fill is not None and math.isfinite(t.fill)]
    if not finite or normalizer != "softmax":
        return ""  # -inf fills give NaN rows (undefined); sigmoid gives 0 like the kernels
    if all(_is_constant(graph, t.node) for t in masks):
        return ""  # structural: every row keeps a key (or the analysis called it a tensor mask)
    why = ("an input-dependent where-mask with a finite fill combined with other masks: rows "
           "with every key masked cannot be reproduced exactly")
    if len({t.fill for t in selects}) > 1:
        return "reject:" + why
    innermost_select = max(i for i, t in enumerate(masks) if t.how != "add")
    for i, t in enumerate(masks):
        if t.how == "add" and (i < innermost_select or not _never_masks(graph, t, finite[0].fill)):
            return "reject:" + why
    return "mean_v"



def _never_masks(graph: Graph, term: MaskTerm, fill: float) -> bool:
    """Whether an additive term beneath a finite-fill where is a bias that never masks a key.

    The fused op adds the fill where the model replaces by it, so a masked score is bias +
    fill instead of fill. Both weigh exp(-huge) = 0 as long as the row keeps one key whose score
    is not itself near the fill; a bias that came that near would be a mask. Constant terms
    (ALiBi, relative position tables) are evaluated: every value finite and above the mask
    threshold is a proof. Input-dependent terms (DeBERTa's disentangled c2p/p2c scores, products of
    activations) are accepted only under an overwhelming fill (finfo.min, not -1e4) and when
    their values on the probe inputs are finite and never near a mask value."""
    import math

    import numpy as np

    from attnopt.patterns.decomposed import MASK_FILL_MAX

    if term.literal is not None:
        x = float(term.literal) * term.factor
        return math.isfinite(x) and x > MASK_FILL_MAX
    constant = _is_constant(graph, term.node)
    if not constant and not fill <= OVERWHELMING_FILL:
        return False
    try:
        v = np.asarray(graph.evaluator.evaluate([term.node])[term.node], dtype=np.float64) * term.factor
    except Exception:  # noqa: BLE001 - a value we cannot compute proves nothing
        return False
    return bool(np.isfinite(v).all() and (v > MASK_FILL_MAX).all())


def _plan_sdpa(graph: Graph, site: Site) -> Recipe | str:
    a = graph.attrs(site.output)
    qs = graph.shape(site.q)
    if qs is None or len(qs) != 4:
        return "SDPA with non-4-D inputs is kept as it is"
    ident = (0, 1, 2, 3)
    masks = []
    slot = (a.get("slots") or {}).get("mask")
    if slot is not None:
        how = "keep" if graph.dtype(slot) == "bool" else "add"
        # SDPA's bool mask drops a pair exactly like a -inf fill.
        masks.append(MaskTerm(slot, how, float("-inf") if how == "keep" else None, 1.0, 4, ident))
    causal, align = bool(a.get("is_causal")), "top_left"
    if not causal:
        masks, causal, align = _simplify_constant_masks(graph, site.spec, masks)
    return Recipe(
        site=site.name, q=Operand(site.q, ident), k=Operand(site.k, ident),
        v=Operand(site.v, ident), batch_rank=2, batch_sizes=tuple(qs[:2]), k_group_broadcast=False,
        masks=tuple(masks), scale=float(site.spec.scale), causal=causal,
        causal_alignment=align, window=None, softcap=None, normalizer="softmax",
        out_perm=ident, output=site.output, remove=frozenset([site.output]))
