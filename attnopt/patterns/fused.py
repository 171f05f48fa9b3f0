"""Already-fused attention calls: torch SDPA (all aten variants), torch's native MHA fast path,
ONNX `Attention` (opset 23+), and com.microsoft MultiHeadAttention / Attention /
GroupQueryAttention. Front ends translate them all to one IR op, `sdpa`, whose attrs say which
one it was (`flavor`), the layout of q ("BHSD", or "BSD" with heads folded into the hidden
dim), head counts, scale (None = 1/sqrt(head_dim)), is_causal and mask slots.

Rewritten: torch SDPA with 4-D [B, H, S, D] inputs (into attnopt's own op, which runs the same
math with the masks it can prove structural turned into flags; K/V built by a proven per-KV-head
repeat, transformers' repeat_kv, reach the op before the repeat, as grouped KV heads); torch's
multi_head_attention_forward (nn.MultiheadAttention as dynamo keeps it) decomposed into its
projections around attnopt's op (`_mha_recipe`, which names what it keeps); and ONNX's standard `Attention`
with 4-D inputs, no KV cache and no extra outputs: on ONNX Runtime's CPU provider
com.microsoft.MultiHeadAttention is the faster node (bench/RESULTS.md: 48 vs 62 ms unmasked and 42
vs 115 ms with a bool mask at 2048 tokens, 12 heads), so under `--onnx-op ort` the ONNX pipeline
converts it (under `--onnx-op standard` it already is the target and stays). The others already
are the target runtime's fused node and are kept.
"""
from __future__ import annotations

import math

from attnopt.ir import Graph, Rejection, Site
from attnopt.patterns.details import FusedDetails
from attnopt.patterns.heads import kv_group_source, repeat_factor
from attnopt.patterns.match import MaskOperand, Match
from attnopt.patterns.recipe import Linear, MaskTerm, Operand, Projections, Recipe, simplify_constant_masks

_BOOL = {"bool"}
# the calls attnopt replaces (above)
REWRITTEN_FLAVORS = frozenset({"torch_sdpa", "onnx_attention", "torch_mha_forward"})
_CACHE_SLOTS = ("past_key", "past_value", "nonpad_kv_seqlen")


def _standard_op_kept(graph: Graph, site: Site, a: dict) -> str:
    """Why an ONNX standard Attention node stays as it is, or "" when it converts to attnopt's op
    exactly: the same math on the same 4-D operands, with nothing the node also produces."""
    slots = a.get("slots") or {}
    if any(slots.get(s) for s in _CACHE_SLOTS):
        return "an Attention node with a KV cache (past_key/past_value) is kept as it is"
    if any(graph.attr(u, "output_index") for u in graph.users(site.output)):
        return "an Attention node whose present_key/value or qk outputs are used is kept as it is"
    if a.get("softcap"):
        return "an Attention node with softcap is kept (MultiHeadAttention has no softcap)"
    if site.spec.num_heads != site.spec.num_kv_heads:
        # measured: the converted node failed validation on Llama's GQA (4/2 heads, opset 23)
        return "an Attention node with grouped kv heads is kept (MultiHeadAttention has none)"
    return ""


class FusedAttention:
    """Already-fused attention calls: a pattern family (patterns/registry.py)."""

    name = "fused"
    details_type = FusedDetails

    def anchors(self, graph: Graph) -> list[str]:
        return [n for n in graph.nodes() if graph.op(n) == "sdpa"]

    def match(self, graph: Graph, anchor: str) -> Match | Rejection:
        a = graph.attrs(anchor)
        slots = a.get("slots") or {}
        flavor = a.get("flavor", "")
        # (torch_mha_forward with dropout is a site its recipe keeps, with the reason)
        if (a.get("dropout_p") or 0.0) > 0 and flavor != "torch_mha_forward":
            return Rejection(anchor, "fused attention with dropout_p > 0 (training)", self.name)
        q, k, v = slots.get("q"), slots.get("k"), slots.get("v")
        if q is None or k is None or v is None:
            return Rejection(anchor, f"{flavor}: q, k or v input is missing", self.name)
        qs, ks, vs = graph.shape(q), graph.shape(k), graph.shape(v)
        if qs is None or ks is None or vs is None:
            return Rejection(anchor, f"{flavor}: unknown input shapes", self.name)
        if flavor == "ms_attention":
            return self._ms_attention(graph, anchor, a, qs)
        heads = a.get("num_heads")
        kv_heads = a.get("num_kv_heads") or heads
        if a.get("layout") == "BHSD" and len(qs) >= 3:
            batch = qs[0] if len(qs) == 4 else 1
            heads, q_len, head_dim = qs[-3], qs[-2], qs[-1]
            kv_heads, kv_len, v_dim = ks[-3], ks[-2], vs[-1]
            # GQA spelled as repeat_kv before the fused call: count the heads before the repeat
            # (proven per-KV-head groups first; else the element-count reading, for the spec only).
            group = kv_groups(graph, k, v)
            rep = group[2] if group else repeat_factor(graph, k)
            if rep and isinstance(kv_heads, int) and kv_heads % rep == 0:
                kv_heads //= rep
        elif a.get("layout") == "SBD" and len(qs) == 3 and heads:
            q_len, batch, kv_len = qs[0], qs[1], ks[0]
            # torch_mha_forward: q's width is the embedding E; v's (vdim) is projected to E too
            head_dim = qs[2] // heads if isinstance(qs[2], int) else qs[2]
            v_dim = head_dim
        elif len(qs) == 3 and heads:
            batch, q_len = qs[0], qs[1]
            head_dim = qs[2] // heads if isinstance(qs[2], int) else qs[2]
            if len(ks) == 4:  # k already [B, H, S, D]
                kv_heads, kv_len = ks[1], ks[2]
                v_dim = vs[-1]
            else:
                kv_len = ks[1]
                v_dim = vs[2] // kv_heads if isinstance(vs[2], int) else vs[2]
        else:
            return Rejection(anchor, f"{flavor}: cannot read heads from q of shape {qs}", self.name)
        if flavor == "torch_native_mha" and isinstance(qs[-1], int):
            head_dim = qs[-1] // heads
            v_dim = head_dim
        scale = a.get("scale")
        if scale is None and isinstance(head_dim, int):
            scale = 1.0 / math.sqrt(head_dim)
        masks = []
        # com.microsoft MHA's "mask" slot is its key_padding_mask: padding, not a score mask.
        mask = slots.get("mask") if flavor != "ms_mha" else None
        if mask is not None and flavor == "torch_mha_forward":
            masks.append(_mha_mask_operand(graph, mask, heads))
        elif mask is not None:
            how = "keep" if graph.dtype(mask) in _BOOL else "add"
            masks.append(MaskOperand(mask, how))
        bias = slots.get("attention_bias")
        if bias is not None:
            masks.append(MaskOperand(bias, "add"))
        window = None
        lw = a.get("local_window_size")
        if lw is not None and lw >= 0:
            window = (int(lw), 0)
        return Match(
            pattern=f"fused:{flavor}", normalizer="softmax", anchor=anchor, output=anchor,
            q=q, k=k, v=v, batch=batch, num_heads=heads, num_kv_heads=kv_heads, q_len=q_len,
            kv_len=kv_len, head_dim=head_dim, v_head_dim=v_dim, scale=scale,
            score_shape=None, score_axes=None, mask_operands=tuple(masks),
            structural_causal=bool(a.get("is_causal")),
            causal_alignment="top_left" if flavor.startswith("torch") else "bottom_right",
            softcap=a.get("softcap") or None, window=window,
            key_padding_input=slots.get("key_padding_mask"), nodes=frozenset([anchor]),
            dtype=graph.dtype(q), layout=a.get("layout", "BHSD"), details=FusedDetails(flavor=flavor))

    def _ms_attention(self, graph: Graph, anchor: str, a: dict, xs) -> Match | Rejection:
        heads = a.get("num_heads")
        sizes = a.get("qkv_hidden_sizes")
        hidden = sizes[0] if sizes else None
        if hidden is None:
            w = (a.get("slots") or {}).get("weights")
            ws = graph.shape(w) if w else None
            hidden = ws[1] // 3 if ws and isinstance(ws[1], int) else None
        if not heads or not isinstance(hidden, int):
            return Rejection(anchor, "com.microsoft Attention: unknown num_heads or hidden size",
                             self.name)
        d = hidden // heads
        scale = a.get("scale") or 1.0 / math.sqrt(d)
        slots = a.get("slots") or {}
        masks = []
        if slots.get("attention_bias"):
            masks.append(MaskOperand(slots["attention_bias"], "add"))
        return Match(
            pattern="fused:ms_attention", normalizer="softmax", anchor=anchor, output=anchor,
            q=slots.get("q"), k=slots.get("k"), v=slots.get("v"), batch=xs[0], num_heads=heads,
            num_kv_heads=heads, q_len=xs[1], kv_len=xs[1], head_dim=d, v_head_dim=d,
            scale=scale, mask_operands=tuple(masks), structural_causal=bool(a.get("is_causal")),
            causal_alignment="bottom_right", key_padding_input=slots.get("mask_index") or None,
            nodes=frozenset([anchor]), dtype=graph.dtype(anchor), layout="BSD",
            details=FusedDetails(flavor="ms_attention"))

    def recipe(self, graph: Graph, site: Site) -> Recipe | str:
        """torch SDPA becomes attnopt's op (same 4-D operands, the mask slot as its one term);
        every other fused call is kept, or the reason."""
        if site.details.flavor not in REWRITTEN_FLAVORS:
            return f"{site.pattern} sites are kept as they are (already fused)"
        a = graph.attrs(site.output)
        if site.details.flavor == "torch_mha_forward":
            return _mha_recipe(graph, site, a)
        qs = graph.shape(site.q)
        if qs is None or len(qs) != 4 or any(graph.rank(x) != 4 for x in (site.k, site.v)):
            return "SDPA with non-4-D inputs is kept as it is"
        if site.details.flavor == "onnx_attention":
            why = _standard_op_kept(graph, site, a)
            if why:
                return why
        ident = (0, 1, 2, 3)
        masks = []
        slot = (a.get("slots") or {}).get("mask")
        if slot is not None:
            how = "keep" if graph.dtype(slot) == "bool" else "add"
            # SDPA's bool mask drops a pair exactly like a -inf fill.
            masks.append(MaskTerm(slot, how, float("-inf") if how == "keep" else None, 1.0, 4, ident))
        causal, align = bool(a.get("is_causal")), "top_left"
        if not causal:
            masks, causal, align = simplify_constant_masks(graph, site.spec, masks)
        k, v, heads = site.k, site.v, {}
        group = kv_groups(graph, site.k, site.v) if site.details.flavor == "torch_sdpa" else None
        if group is not None:
            # the op takes grouped KV heads itself (query head h reads KV head h // n, exactly
            # what the repeat built), so K/V are not copied n times per call and the CPU / Triton
            # decode rows that read each KV head once apply
            k, v, n = group
            if isinstance(qs[1], int):
                heads = {"q_heads": qs[1], "k_heads": qs[1] // n}
        return Recipe(
            site=site.name, q=Operand(site.q, ident), k=Operand(k, ident),
            v=Operand(v, ident), batch_rank=2, batch_sizes=tuple(qs[:2]), k_group_broadcast=False,
            masks=tuple(masks), scale=float(site.spec.scale), causal=causal,
            causal_alignment=align, window=None, softcap=None, normalizer="softmax",
            out_perm=ident, output=site.output, remove=frozenset([site.output]), **heads)


def kv_groups(graph: Graph, k: str, v: str) -> tuple[str, str, int] | None:
    """(k source, v source, n) when k and v are both [B, Hkv, S, D] values with each KV head
    repeated n times in place (patterns/heads.kv_group_source), the same n, else None."""
    gk, gv = kv_group_source(graph, k), kv_group_source(graph, v)
    if gk is None or gv is None or gk[1] != gv[1]:
        return None
    return gk[0], gv[0], gk[1]


# ---- torch's multi_head_attention_forward ---------------------------------------------------

_MHA_ROLES = ("q", "k", "v")


def _mha_mask_operand(graph: Graph, mask: str, heads) -> MaskOperand:
    """attn_mask of multi_head_attention_forward: bool True *masks* (torch fills -inf there), a
    float one is added; 3-D is [B*H, Sq, Skv] (heads merged into the batch)."""
    how, fill = ("drop", float("-inf")) if graph.dtype(mask) in _BOOL else ("add", None)
    return MaskOperand(mask, how, fill, merged_heads=heads if graph.rank(mask) == 3 else 0)


def _mha_kept(graph: Graph, site: Site, a: dict) -> str:
    """Why a multi_head_attention_forward call stays as it is, or "" when its decomposition is
    exactly what torch computes."""
    slots = a.get("slots") or {}
    if (a.get("dropout_p") or 0.0) > 0:
        return "multi_head_attention_forward with dropout active (training, dropout_p > 0) is kept (random)"
    if a.get("weights_used"):
        return ("multi_head_attention_forward whose attention weights are used (need_weights=True) is kept "
                "(attnopt's op returns no weights)")
    if a.get("attn_output") is None:
        return "multi_head_attention_forward whose output is not read exactly once is kept"
    if slots.get("static_k") or slots.get("static_v"):
        return "multi_head_attention_forward with static_k / static_v is kept"
    if any(graph.rank(slots[r]) != 3 for r in _MHA_ROLES):
        return "an unbatched multi_head_attention_forward call (2-D query) is kept"
    heads, embed = a.get("num_heads"), a.get("embed_dim")
    if not isinstance(heads, int) or not isinstance(embed, int) or heads <= 0 or embed % heads:
        return "multi_head_attention_forward with a symbolic or indivisible num_heads / embed_dim is kept"
    weights = ("q_proj_weight", "k_proj_weight", "v_proj_weight") if a.get("separate_proj") else ("in_proj_weight",)
    if not all(slots.get(w) for w in weights + ("out_proj_weight",)):
        return "multi_head_attention_forward without its projection weights is kept"
    if bool(slots.get("bias_k")) != bool(slots.get("bias_v")):
        return "multi_head_attention_forward with only one of bias_k / bias_v is kept"
    mask, kpm = slots.get("mask"), slots.get("key_padding_mask")
    for m, ranks in ((mask, (2, 3)), (kpm, (2,))):
        if m is not None and (graph.rank(m) not in ranks or not (graph.dtype(m) in _BOOL or _is_float(graph, m))):
            return f"multi_head_attention_forward with a mask {m} that is neither bool nor float of rank {ranks} is kept"
    return ""


def _is_float(graph: Graph, nid: str) -> bool:
    return (graph.dtype(nid) or "").startswith(("float", "bfloat"))


def _mha_recipe(graph: Graph, site: Site, a: dict) -> Recipe | str:
    """F.multi_head_attention_forward as torch computes it, decomposed: q, k, v through the
    in-projection (rows of the packed in_proj_weight / in_proj_bias, or the separate q/k/v
    weights with in_proj_bias's thirds), bias_k / bias_v and add_zero_attn as extra keys every
    query attends, attn_mask (bool True masks; 3-D is [B*H, Sq, Skv]) plus key_padding_mask
    ([B, Skv]) as terms, scale 1/sqrt(E/H), attnopt's op on [B, H, S, D], and the out-projection.
    With weights (need_weights) torch runs bmm/softmax instead of SDPA: the same math, which the
    pipeline's validation checks like every rewrite; the weights themselves must be unused."""
    why = _mha_kept(graph, site, a)
    if why:
        return why
    slots = a["slots"]
    heads, embed = a["num_heads"], a["embed_dim"]
    bias = slots.get("in_proj_bias")
    lins = {}
    for i, role in enumerate(_MHA_ROLES):
        rows = (i * embed, (i + 1) * embed)
        if a.get("separate_proj"):
            lins[role] = Linear(slots[f"{role}_proj_weight"], bias, None, rows if bias else None)
        else:
            lins[role] = Linear(slots["in_proj_weight"], bias, rows, rows if bias else None)
    extra = ((slots["bias_k"], slots["bias_v"]),) if slots.get("bias_k") else ()
    extra += ((None, None),) if a.get("add_zero_attn") else ()
    proj = Projections(heads, lins["q"], lins["k"], lins["v"],
                       Linear(slots["out_proj_weight"], slots.get("out_proj_bias")), extra)
    masks = []
    mask, kpm = slots.get("mask"), slots.get("key_padding_mask")
    if mask is not None:  # [Sq, Skv] broadcast to [1, 1, Sq, Skv], or [B*H, Sq, Skv] split to [B, H, ...]
        op = _mha_mask_operand(graph, mask, heads)
        rank = 3 if op.merged_heads else 4
        masks.append(MaskTerm(mask, op.how, op.fill, 1.0, rank, tuple(range(rank)), merged_heads=op.merged_heads))
    causal = bool(a.get("is_causal"))
    if masks and not extra and kpm is None:  # a constant all-pass or causal attn_mask: flags
        masks, causal, align = simplify_constant_masks(graph, site.spec, masks)
    else:
        align = "top_left"
    if kpm is not None:  # [B, Skv] -> [1, 1, B, Skv] -> [B, 1, 1, Skv]; bool True masks
        how, fill = ("drop", float("-inf")) if graph.dtype(kpm) in _BOOL else ("add", None)
        masks.append(MaskTerm(kpm, how, fill, 1.0, 4, (2, 0, 1, 3)))
    head_dim = embed // heads
    seq_first = (1, 2, 0, 3)  # [S, B, H, D] -> [B, H, S, D]
    return Recipe(
        site=site.name, q=Operand(site.q, seq_first), k=Operand(site.k, seq_first),
        v=Operand(site.v, seq_first), batch_rank=2, batch_sizes=(graph.shape(site.q)[1], heads),
        k_group_broadcast=False, masks=tuple(masks), scale=1.0 / math.sqrt(head_dim), causal=causal,
        causal_alignment=align, window=None, softcap=None, normalizer="softmax", out_perm=(2, 0, 1, 3),
        output=a["attn_output"], remove=frozenset([site.output, a["attn_output"]]), q_heads=heads,
        k_heads=heads, head_dims=(head_dim, head_dim), projections=proj)
