"""Decomposed attention: normalizer(scale * q·kᵀ + mask) · v, however it was written.

Anchored at the normalizer (softmax, or sigmoid for sigmoid attention). From there:
  down: probabilities -> [cast | identity | NaN guard]* -> contraction with V (C2)
  up:   scores <- [cast | identity | scale | + mask/bias | where(mask) | softcap]* <- contraction (C1)
and C1/C2 are proven by their einsum labels: C1 contracts exactly one axis (head dim) and its
free axes are one query axis (from q) and one key axis (from k); C2 contracts exactly that key
axis of the probabilities with V. Scalar factors are folded into one scale from wherever the
model put them: on q or k (through layout ops), split on both, on the scores, or as baddbmm's
alpha. Canonical score layout: [batch..., q, k] in the order C1 produced it (`score_axes`).

Heads merged into the batch around the normalizer (BLOOM, DeBERTa): C1 and C2 are [B*H, S, *]
bmm's, the scores are viewed as [B, H, Sq, Skv] for the masks and the softmax, and the
probabilities viewed back as [B*H, Sq, Skv] for C2. Then the score layout is that 4-D view
(`score_axes` (2, 3)); masks met between C1 and the view live in the merged layout and carry
`merged_heads`.

What the recipe needs beyond the Match (labels, folded scale ops, the merged-head view) travels
as `DecomposedDetails` (patterns/details.py); heads and GQA repeats are read by
patterns/heads.py.
"""
from __future__ import annotations

import dataclasses

from attnopt.ir import LAYOUT_OPS, Graph, Rejection, Site
from attnopt.ir.vocab import MASK_FILL_MAX, NORMALIZERS
from attnopt.patterns.anchors import is_gated_activation, near_contractions
from attnopt.patterns.contraction import CONTRACTION_OPS, Contraction, describe_contraction
from attnopt.patterns.decomposed_recipe import decomposed_recipe
from attnopt.patterns.details import DecomposedDetails, FoldedScale
from attnopt.patterns.heads import (TRANSPARENT as _TRANSPARENT, dim_product, head_split,
                                    infer_merged_heads, probed_dims, repeat_factor, static_dim,
                                    unmerged_view)
from attnopt.patterns.match import MaskOperand, Match
from attnopt.patterns.recipe import Recipe
from attnopt.patterns.score_path import Ambiguous, Reject, ScorePath
from attnopt.patterns.values import is_zero_constant, scalar_value


class DecomposedAttention:
    """Softmax or sigmoid attention spelled out op by op: a pattern family (patterns/registry.py)."""

    name = "decomposed"
    details_type = DecomposedDetails
    normalizers = NORMALIZERS

    def anchors(self, graph: Graph) -> list[str]:
        return [n for n in graph.nodes() if graph.op(n) in self.normalizers]

    def match(self, graph: Graph, anchor: str) -> Match | Rejection | None:
        """A match, a near miss with its reason, or None when the normalizer is not near any
        matrix product (a classifier softmax, a SiLU's sigmoid): not worth reporting."""
        if not near_contractions(graph, anchor) or is_gated_activation(graph, anchor):
            return None
        return _search(graph, anchor, self.name)

    def recipe(self, graph: Graph, site: Site) -> Recipe | str:
        """The site's recipe (patterns/decomposed_recipe.py), or why it cannot be rewritten."""
        return decomposed_recipe(graph, site)


_MAX_TRIES = 16  # matcher runs per anchor when adds are ambiguous (two per such add)


def _search(graph: Graph, anchor: str, pattern: str) -> Match | Rejection:
    """Run the matcher, trying both sides of every ambiguous add as the score path. Exactly one
    assignment must prove attention (the other side is then a bias that does not depend on the
    score matmul); none: the rejection of the attempt that got furthest; several: ambiguous."""
    pending: list[dict[str, int]] = [{}]
    found: list[Match] = []
    rejected: list[tuple[int, Reject]] = []
    tries = 0
    while pending and tries < _MAX_TRIES:
        choices = pending.pop(0)
        tries += 1
        m = _Matcher(graph, anchor, choices)
        try:
            found.append(m.run())
        except Ambiguous as a:
            pending += [{**choices, a.node: 0}, {**choices, a.node: 1}]
        except Reject as r:
            rejected.append((len(m.nodes), r))
    if len(found) == 1:
        return found[0]
    if found:
        return Rejection(node=anchor, pattern=pattern,
                         reason="adds on the scores have matrix products on both sides and more than "
                                "one reading of them is attention: which one is the score matmul is "
                                "ambiguous")
    if not rejected:
        return Rejection(node=anchor, pattern=pattern,
                         reason=f"more than {_MAX_TRIES} readings of the adds on the scores")
    r = max(rejected, key=lambda x: x[0])[1]
    return Rejection(node=r.node, reason=r.reason, pattern=pattern)


class _Matcher(ScorePath):
    def __init__(self, graph: Graph, anchor: str, choices: dict[str, int] | None = None):
        self.g = graph
        self.choices = choices or {}  # ambiguous add -> which input is the score path (_search)
        self.anchor = anchor
        self.normalizer = graph.op(anchor)
        self.nodes: set[str] = {anchor}
        self.scale_nodes: list[FoldedScale] = []  # constant scalar mul/divs folded into the scale
        self.guarded = False  # where(isnan(p), 0, p) met below the normalizer
        self.kv_repeat: int | None = None  # GQA repeat factor of k (heads())
        self.factors: list[str] = []  # tensors the scores are multiplied by (per-head scales)
        self.p_perm: tuple[int, ...] = ()  # C2 operand axis i is probability axis p_perm[i]
        self.split: tuple | None = None  # (B, H) when heads are merged into the batch ([B*H, ...])
        self.split_node: str | None = None  # the [B, H, Sq, Skv] view of C1's merged scores
        # Only the scores are merged (the dynamo ONNX exporter folds the probabilities' [B*H]
        # bmm back into a 4-D MatMul): C1 is re-read on the unmerged [B, H, S, D] q and k.
        self.half_merged = False

    # -- helpers ---------------------------------------------------------------------------
    def reject(self, node: str, reason: str) -> None:
        raise Reject(node, reason)

    def users_text(self, nid: str, exclude: set[str]) -> str:
        others = [u for u in self.g.users(nid) if u not in exclude]
        return ", ".join(self.g.describe(u) for u in others[:3]) or "a graph output"

    def single_user(self, nid: str, what: str) -> str:
        users = self.g.users(nid)
        if self.g.num_uses(nid) != 1 or len(users) != 1:
            self.reject(nid, f"{what} {self.g.describe(nid)} are also used elsewhere "
                             f"({self.users_text(nid, set())}); attention weights that escape "
                             "cannot be fused")
        return users[0]

    # -- main ------------------------------------------------------------------------------
    def run(self) -> Match:
        g = self.g
        c2_node, p_node = self.walk_down()
        c2 = describe_contraction(g, c2_node)
        if isinstance(c2, str):
            self.reject(c2_node, c2)
        p_side = "a" if c2.a == p_node else "b"
        if c2.a == c2.b:
            self.reject(c2_node, "the probabilities are multiplied with themselves")
        if c2.bias is not None:
            self.reject(c2_node, "the output matmul adds a bias (baddbmm)")
        v_side = "b" if p_side == "a" else "a"
        contracted = c2.contracted
        if len(contracted) != 1:
            self.reject(c2_node, f"the matmul with V contracts {len(contracted)} axes, not one key axis")
        key_label_c2 = next(iter(contracted))
        p_labels = c2.labels(p_side)
        # Positions in C2's operand map back to score axes through any transposes of P.
        key_pos = self.p_perm[p_labels.index(key_label_c2)]
        p_free = c2.free_of(p_side)
        v_free = c2.free_of(v_side)
        if len(p_free) != 1 or len(v_free) != 1:
            self.reject(c2_node, "the matmul with V does not map (query, key) x (key, value) to "
                                 "(query, value): the matmul chain does not contract the key dim")
        q_pos = self.p_perm[p_labels.index(next(iter(p_free)))]

        if self.normalizer == "softmax":
            axis = g.attr(self.anchor, "axis")
            if self.split is not None and isinstance(axis, int):
                axis = axis % 4 - 1  # the softmax runs on the [B, H, Sq, Skv] view
            if axis != key_pos:
                self.reject(self.anchor, f"softmax over axis {axis}, but the matmul with V contracts "
                                         f"axis {key_pos}: softmax over a non-key axis")

        c1_node, masks, scale, softcap = self.walk_up()
        for term in [m.node for m in masks] + self.factors:
            if term in g and ({c1_node} | self.nodes) & g.ancestors(term):
                self.reject(term, f"{g.describe(term)} applied to the scores is computed from the "
                                  "scores themselves")
        if self.split is not None and self.split_node is None:
            self.reject(c1_node, "the probabilities are merged to [B*H, ...] but the scores were "
                                 "not split from such a product")
        c1 = describe_contraction(g, c1_node)
        if isinstance(c1, str):
            self.reject(c1_node, c1)
        if self.half_merged:
            c1 = self.unmerged_contraction(c1)
        if c1.bias is not None and c1.beta != 0 and is_zero_constant(g, c1.bias):
            c1 = dataclasses.replace(c1, bias=None)  # baddbmm(zeros, q, kᵀ) is a plain product
        if c1.bias is not None and c1.beta != 0:
            if softcap is not None or any(d.side == "scores" for d in self.scale_nodes):
                # baddbmm adds its bias first: a later softcap or scale applies to it too
                self.reject(c1_node, "the baddbmm bias is added before the softcap or the scale "
                            "on the scores")
            masks.append(MaskOperand(c1.bias, "add", scale=c1.beta,
                                     merged_heads=self.split[1] if self.split else 0))
        scale *= c1.alpha
        s_labels = c1.out_labels
        if len(s_labels) != len(p_labels):
            self.reject(c1_node, "scores and probabilities have different ranks")
        key_label, q_label = s_labels[key_pos], s_labels[q_pos]
        if len(c1.contracted) != 1:
            self.reject(c1_node, f"the score matmul contracts {len(c1.contracted)} axes; attention "
                                 "contracts exactly one (the head dim)")
        d_label = next(iter(c1.contracted))
        k_side = next((s for s in "ab" if key_label in c1.free_of(s)), None)
        q_side = next((s for s in "ab" if q_label in c1.free_of(s)), None)
        if k_side is None or q_side is None or k_side == q_side:
            self.reject(c1_node, "the matmul chain does not contract the head and key dims: the "
                                 "axis the softmax normalizes is not a key axis of the score matmul")
        batch_labels = [l for l in s_labels if l not in (q_label, key_label)]
        if set(batch_labels) != c1.batch:
            self.reject(c1_node, "the score matmul has free axes besides query and key")
        self.check_factors(len(s_labels), s_labels.index(q_label), s_labels.index(key_label))

        q_op, k_op = c1.operand(q_side), c1.operand(k_side)
        v_op = c2.operand(v_side)
        qs, ks, vs = g.shape(q_op), g.shape(k_op), g.shape(v_op)
        ss = g.shape(self.split_node if self.half_merged else c1_node)
        if qs is None or ks is None or vs is None or ss is None:
            self.reject(c1_node, "operand shapes are unknown")
        q_lab, k_lab, v_lab = c1.labels(q_side), c1.labels(k_side), c2.labels(v_side)
        s_lab = c1.out_labels
        q_len = static_dim(qs[q_lab.index(q_label)], ss[s_lab.index(q_label)])
        v_key = vs[v_lab.index(key_label_c2)]
        kv_len = static_dim(ks[k_lab.index(key_label)], ss[s_lab.index(key_label)], v_key)
        head_dim = static_dim(qs[q_lab.index(d_label)], ks[k_lab.index(d_label)])
        v_label = next(iter(v_free))
        v_head_dim = vs[v_lab.index(v_label)]
        # Head dims are structural too (see heads()).
        head_dim = probed_dims(g, q_op, [q_lab.index(d_label)], [head_dim])[0]
        v_head_dim = probed_dims(g, v_op, [v_lab.index(v_label)], [v_head_dim])[0]
        if isinstance(v_key, int) and isinstance(kv_len, int) and v_key != kv_len:
            self.reject(c2_node, f"V has {v_key} keys but the scores have {kv_len}")

        # Fold scalar factors applied to q and k on their way into the score matmul.
        q_scale, q_src = self.fold_operand_scale(q_op, "q")
        k_scale, k_src = self.fold_operand_scale(k_op, "k")
        scale *= q_scale * k_scale

        if self.split is not None and not self.half_merged:
            if ks[k_lab.index(batch_labels[0])] != qs[q_lab.index(batch_labels[0])] \
                    or (s_labels.index(q_label), s_labels.index(key_label)) != (1, 2):
                self.reject(c1_node, "merged-head scores whose k batch or axis order differs from q's")
            batch, heads, kv_heads = self.split[0], self.split[1], self.split[1]
            split_heads, scores = self.split[1], self.split_node
            ss, score_axes = g.shape(self.split_node), (2, 3)
        else:
            split_heads, scores = 0, (self.split_node if self.half_merged else None)
            batch, heads, kv_heads = self.heads(c1, batch_labels, ss, q_side, k_side, k_src)
            score_axes = (q_pos, key_pos)
        self.nodes.update([c1_node, c2_node])
        details = DecomposedDetails(
            c1=c1_node, c2=c2_node, q_operand=q_op, k_operand=k_op, q_labels=q_lab, k_labels=k_lab,
            v_labels=v_lab, score_labels=s_labels, p_labels=p_labels, p_perm=self.p_perm,
            out_labels=c2.out_labels, query_label=q_label, key_label=key_label, head_label=d_label,
            value_label=v_label, scale_nodes=tuple(self.scale_nodes), scores=scores,
            split_heads=split_heads, nan_guard=self.guarded, kv_repeat=self.kv_repeat,
            q_factors=tuple(self.factors))
        return Match(
            pattern="decomposed", normalizer=self.normalizer, anchor=self.anchor, output=c2_node,
            q=q_src, k=k_src, v=v_op, batch=batch, num_heads=heads, num_kv_heads=kv_heads,
            q_len=q_len, kv_len=kv_len, head_dim=head_dim, v_head_dim=v_head_dim, scale=scale,
            score_shape=tuple(ss), score_axes=score_axes, score_node=scores or c1_node,
            mask_operands=tuple(masks), softcap=softcap, nodes=frozenset(self.nodes),
            dtype=g.dtype(q_op), layout="BHSD" if len(s_labels) == 4 else f"rank{len(s_labels)}",
            details=details)

    # -- probabilities side ------------------------------------------------------------------
    def walk_down(self) -> tuple[str, str]:
        g, cur = self.g, self.anchor
        self.p_perm = tuple(range(g.rank(cur) or 0))
        for _ in range(16):
            users = g.users(cur)
            if not users:
                self.reject(cur, "the probabilities are not used")
            guard = self.nan_guard(cur, users)
            if guard:
                cur = guard
                continue
            u = self.single_user(cur, "the probabilities")
            op = g.op(u)
            if op in _TRANSPARENT:
                self.nodes.add(u)
                cur = u
            elif op == "transpose":
                perm = g.attr(u, "perm")
                self.p_perm = tuple(self.p_perm[i] for i in perm)
                self.nodes.add(u)
                cur = u
            elif op == "reshape" and self.split is None and self.p_perm == (0, 1, 2, 3) \
                    and (split := head_split(g, cur, u)):
                # untransposed [B, H, Sq, Skv] probabilities viewed as [B*H, Sq, Skv]
                self.split, self.p_perm = split, (0, 1, 2)
                self.nodes.add(u)
                cur = u
            elif op == "dropout":
                self.reject(u, "training-mode dropout on the probabilities")
            elif op in CONTRACTION_OPS:
                return u, cur
            else:
                self.reject(u, f"the probabilities feed {g.describe(u)}, not a matmul with V")
        self.reject(cur, "no matmul with V after the normalizer")
        raise AssertionError  # unreachable

    def unmerged_contraction(self, c1: Contraction) -> Contraction:
        """C1 = bmm over [B*H, ...] operands that are views of [B, H, ...] tensors, re-read as
        the 4-D product of those tensors (same values, the batch split in two)."""
        ops = {}
        for side in "ab":
            found = unmerged_view(self.g, c1.operand(side), c1.labels(side), self.split[1])
            if found is None or c1.labels(side)[0] != c1.out_labels[0]:
                self.reject(c1.node, "merged-head scores whose q or k is not a view of a [B, H, S, D] tensor")
            ops[side] = found
        (a, a_lab), (b, b_lab) = ops["a"], ops["b"]
        return dataclasses.replace(c1, a=a, b=b, a_labels=a_lab, b_labels=b_lab,
                                   out_labels="XY" + c1.out_labels[1:])

    def nan_guard(self, p: str, users: list[str]) -> str | None:
        """where(isnan(p), 0, p): returns the where node when `users` is exactly that guard."""
        g = self.g
        if len(users) != 2:
            return None
        isnan = next((u for u in users if g.op(u) == "isnan"), None)
        where = next((u for u in users if g.op(u) == "where"), None)
        if isnan is None or where is None:
            return None
        cond, a, b = g.inputs_of(where)
        if g.users(isnan) != [where] or cond != isnan or b != p:
            return None
        fill = scalar_value(g, a)
        if not isinstance(fill, float) or fill != 0.0:
            return None
        self.nodes.update([isnan, where])
        self.guarded = True
        return where

    # -- scores side ---------------------------------------------------------------------------
    def walk_up(self) -> tuple[str, list[MaskOperand], float, float | None]:
        """Walk from the normalizer's input to the score contraction."""
        g = self.g
        cur = g.inputs_of(self.anchor)[0]
        masks: list[MaskOperand] = []
        scale, softcap = 1.0, None
        stage = 0  # 0: masks allowed; 1: after softcap (scales only); 2: after a scale
        merged = 0  # heads per batch entry once above the [B*H] -> [B, H] view of the scores
        back: str | None = None  # inside a view of the scores: the reshape that closes it
        first = 0  # masks[first:] were met inside that view
        for _ in range(32):
            op = g.op(cur)
            if op in CONTRACTION_OPS:
                if back is not None:
                    self.reject(back, f"{g.describe(back)} sits between the score matmul and the "
                                      f"{self.normalizer}: the scores are never viewed as its input")
                # a shape query reads no value (TorchScript's reshape_as(scores) for SAM's bias):
                # the splice keeps the matmul only while such a reader remains
                values = [u for u in g.users(cur) if g.op(u) != "shape"]
                if len(values) != 1 or sum(g.inputs_of(u).count(cur) for u in values) != 1:
                    self.single_user(cur, "the scores")
                return cur, masks, scale, softcap
            self.single_user(cur, "the scores")
            ins = g.inputs_of(cur)
            if op in _TRANSPARENT:
                self.nodes.add(cur)
                cur = ins[0]
            elif op == "reshape" and back is not None:  # the view that `back` undoes
                masks[first:] = self.viewed_masks(back, cur, masks[first:])
                self.nodes.add(cur)
                back, cur = None, ins[0]
            elif op == "reshape" and not merged and (split := head_split(g, cur, ins[0])) \
                    and (self.split is None or self.split[1] == split[1]):
                # [B*H, Sq, Skv] scores viewed as [B, H, Sq, Skv]: the view the probabilities were
                # merged from, or (no merge below the normalizer) a scores-only merge
                self.half_merged = self.split is None
                self.split, self.split_node, merged = split, cur, split[1]
                self.nodes.add(cur)
                cur = ins[0]
            elif op in ("mul", "div"):
                cap = self.softcap_at(cur) if op == "mul" else None
                if cap is not None:
                    if stage > 0:
                        self.reject(cur, "softcap applied to already scaled scores after a scale")
                    softcap, cur = cap
                    stage = 1
                    continue
                tensor = self.tensor_factor(cur) if op == "mul" and back is None and not merged else None
                if tensor is not None:  # Swin v2's per-head logit scale: moved onto q
                    if stage == 1:
                        self.reject(cur, "the scores are multiplied by a tensor inside the softcap")
                    self.factors.append(tensor[0])
                    self.nodes.add(cur)
                    stage, cur = 3, tensor[1]
                    continue
                factor, path = self.scalar_factor(cur)
                scale *= factor
                stage = 2 if stage == 0 else stage
                self.nodes.add(cur)
                self.scale_nodes.append(FoldedScale(cur, "scores", factor, path))
                cur = path
            elif op == "add":
                outer = self.outer_scale(cur, stage, scale, "a mask or bias is added")
                path, other = self.split_score_path(cur, ins)
                masks.append(MaskOperand(other, "add", scale=outer, merged_heads=merged))
                self.nodes.add(cur)
                cur = path
            elif op == "sub":  # scores - m: an additive term -m (Funnel: s - INF * (1 - mask))
                outer = self.outer_scale(cur, stage, scale, "a mask or bias is subtracted")
                a, b = ins
                if not self.reaches_contraction(a) or self.reaches_contraction(b):
                    self.reject(cur, "a subtraction on the scores does not subtract a mask from them")
                masks.append(MaskOperand(b, "add", scale=-outer, merged_heads=merged))
                self.nodes.add(cur)
                cur = a
            elif op == "where":
                outer = self.outer_scale(cur, stage, scale, "a mask is applied")
                cond, a, b = ins
                if self.reaches_contraction(a) and not self.reaches_contraction(b):
                    how, fill_node, path = "keep", b, a
                elif self.reaches_contraction(b) and not self.reaches_contraction(a):
                    how, fill_node, path = "drop", a, b
                else:
                    self.reject(cur, "a where on the scores selects between two score tensors")
                fill = scalar_value(g, fill_node)
                fill = fill * outer if isinstance(fill, float) else fill
                if not isinstance(fill, float) or fill > MASK_FILL_MAX:
                    shown = fill if isinstance(fill, float) else "a non-constant value"
                    self.reject(cur, f"the where fills scores with {shown}, which does not mask them "
                                     f"(a mask fill must be <= {MASK_FILL_MAX:g} or -inf)")
                masks.append(MaskOperand(cond, how, fill=fill, merged_heads=merged))
                self.nodes.add(cur)
                cur = path
            elif op == "reshape" and not merged:  # scores viewed back from a layout of their own
                back, first = cur, len(masks)
                self.nodes.add(cur)
                cur = ins[0]
            else:
                self.reject(cur, f"{g.describe(cur)} sits between the score matmul and the "
                                 f"{self.normalizer}")
        self.reject(cur, "no score matmul before the normalizer")
        raise AssertionError  # unreachable

    def fold_operand_scale(self, nid: str, side: str) -> tuple[float, str]:
        """Fold constant scalar mul/div applied to q or k (through layout ops, exclusive uses).

        Returns (factor, the operand with those scale ops bypassed): the site's boundary value.
        """
        g = self.g
        factor = 1.0
        cur = nid
        for _ in range(12):
            op = g.op(cur)
            if g.num_uses(cur) != 1:
                break
            if op in LAYOUT_OPS or op in _TRANSPARENT:
                cur = g.inputs_of(cur)[0]
                continue
            if op in ("mul", "div"):
                try:
                    f, path = self.scalar_factor(cur)
                except Reject:
                    break
                factor *= f
                self.scale_nodes.append(FoldedScale(cur, side, f, path))
                self.nodes.add(cur)
                cur = path
                continue
            break
        return factor, nid

    def heads(self, c1: Contraction, batch_labels: list[str], ss, q_side: str, k_side: str,
              k_src: str):
        """(batch, num_heads, num_kv_heads) from the score's batch axes and the k producer."""
        g = self.g
        sizes = [ss[c1.out_labels.index(l)] for l in batch_labels]
        k_shape = g.shape(c1.operand(k_side))
        k_lab = c1.labels(k_side)
        k_sizes = [k_shape[k_lab.index(l)] if l in k_lab else 1 for l in batch_labels]
        # Head axes are structural, never sequence-dependent: where an exporter left them
        # unknown (shape inference's unk__N), their value on the probe inputs is their value.
        if len(sizes) >= 2 and not all(isinstance(x, int) for x in sizes[1:] + k_sizes[1:]):
            sizes[1:] = probed_dims(g, c1.node, [c1.out_labels.index(l) for l in batch_labels[1:]],
                                sizes[1:])
            k_op = c1.operand(k_side)
            idx = [k_lab.index(l) for l in batch_labels[1:] if l in k_lab]
            if len(idx) == len(batch_labels) - 1:
                k_sizes[1:] = probed_dims(g, k_op, idx, k_sizes[1:])
        if len(sizes) == 0:
            return 1, 1, 1
        if len(sizes) == 1:
            heads = infer_merged_heads(g, c1.operand(q_side))
            if heads and isinstance(sizes[0], int):
                kv = infer_merged_heads(g, c1.operand(k_side)) or heads
                return sizes[0] // heads, heads, kv
            return sizes[0], 1, 1
        batch = sizes[0]
        heads_sizes = sizes[1:]
        heads = dim_product(heads_sizes)
        # Broadcast heads on k (MQA / GQA without repeat: k has size 1 on a head axis).
        kv = dim_product(ks if ks != 1 or s == 1 else 1 for ks, s in zip(k_sizes[1:], heads_sizes))
        rep = repeat_factor(g, c1.operand(k_side))
        if rep and isinstance(kv, int):
            kv = kv // rep
        self.kv_repeat = rep
        return batch, heads, kv
