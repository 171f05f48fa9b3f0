"""The typed details each pattern family hands to its recipe (one frozen dataclass per family).

Einsum labels (patterns/contraction.py) name axes by role across the two contractions of a
decomposed site: C1 = scores from q and k, C2 = output from the probabilities P and v. Labels are
strings, one letter per axis of the operand in its own layout; `query_label`, `key_label`,
`head_label` (C1's contracted axis) and `value_label` (v's free axis) pick the roles out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from attnopt.patterns.match import Details


class FoldedScale(NamedTuple):
    """A constant scalar mul/div folded into the site's scale."""

    node: str  # the mul/div node
    side: str  # "q" | "k" (on an operand: the rewrite bypasses it) | "scores" (inside the site)
    factor: float
    path: str  # its tensor input, which consumers of `node` read instead once bypassed


@dataclass(frozen=True, kw_only=True)
class DecomposedDetails(Details):
    """normalizer(scale * q.kᵀ + masks) . v spelled op by op (patterns/decomposed.py)."""

    c1: str  # the score contraction
    c2: str  # the contraction of the probabilities with v
    q_operand: str  # C1's operands, in the layouts `q_labels` / `k_labels` describe
    k_operand: str
    q_labels: str
    k_labels: str
    v_labels: str  # v in C2
    score_labels: str  # C1's output
    p_labels: str  # the probabilities in C2 (positionally the scores, through p_perm)
    p_perm: tuple[int, ...]  # C2 operand axis i is score axis p_perm[i]
    out_labels: str  # C2's output
    query_label: str
    key_label: str
    head_label: str
    value_label: str
    scale_nodes: tuple[FoldedScale, ...] = ()
    scores: str | None = None  # the [B, H, Sq, Skv] view of merged-head [B*H, Sq, Skv] scores
    split_heads: int = 0  # H when q, k, v and the output are [B*H, S, D] (BLOOM, DeBERTa)
    nan_guard: bool = False  # the model zeroes NaN probabilities (rows with every key masked)
    kv_repeat: int | None = None  # GQA: how often k's heads were repeated before C1
    # Tensors constant along queries and keys that multiply the scores (Swin v2's per-head logit
    # scale, [H, 1, 1]): the rewrite multiplies q by them instead.
    q_factors: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class FusedDetails(Details):
    """An already-fused attention call (patterns/fused.py)."""

    flavor: str  # which native op (the front end's `sdpa` flavor attr): "torch_sdpa", "ms_mha"...
