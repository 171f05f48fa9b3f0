"""Recipes: how one site becomes one call of `attnopt::attention`, format-neutrally.

The op takes q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv] and an optional
attn_mask broadcastable to [B, H, Sq, Skv] (bool: True attends; float: added to the scaled
scores, exactly as F.scaled_dot_product_attention). A `Recipe` says how to bring the site's
boundary values into that layout (permutations from einsum labels, batch-rank adaptation) and
back, which scale ops to bypass (their factor is folded into `scale`), and how to combine the
mask operands. Each pattern family builds its recipes (patterns/registry.py); passes/lower.py
lowers a recipe into neutral steps that the emitters (emit/fx.py, emit/onnx.py) turn into nodes.

The rules every family's recipe obeys live here too: which constant masks the op's own flags
replace, and what a query row with every key masked must compute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from attnopt.ir import GNALayout, Graph
from attnopt.ir.vocab import EXACT_FILL as OVERWHELMING_FILL  # a fill that overwhelms any bias (never_masks)
from attnopt.ir.vocab import MASK_FILL_MAX
from attnopt.patterns.match import ScoreView
from attnopt.patterns.values import user_inputs_reached


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
    # The term lives in a view of the scores (patterns/match.ScoreView): broadcast to that view
    # and merged back to the score layout first (then `rank` and `perm` apply as to any term).
    view: ScoreView | None = None


@dataclass(frozen=True)
class Linear:
    """x @ weight[rows]ᵀ + bias[rows]: weight [N, K] and bias [N] are graph nodes; `*_rows` a
    (start, stop) slice of a packed weight or bias (None: all of it)."""

    weight: str
    bias: str | None = None
    weight_rows: tuple[int, int] | None = None
    bias_rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class Projections:
    """The linear layers a fused call applies itself (torch's multi_head_attention_forward): the
    recipe's q, k, v nodes are its [S, B, E_in] inputs, each first passed through its `Linear`
    to [S, B, H*D] and split to [S, B, H, D] (the operand's `perm` starts there); `extra_keys`
    (k row, v row) pairs are appended to k and v along S before the split (a bias_k / bias_v
    node [1, 1, H*D] broadcast over the batch, None: zeros) and every query attends them; the
    output, after `out_perm` [Sq, B, H, Dv], is merged to [Sq, B, H*Dv] and passed through `out`."""

    heads: int
    q: Linear
    k: Linear
    v: Linear
    out: Linear
    extra_keys: tuple[tuple[str | None, str | None], ...] = ()


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
    # A GNA layout over the tokens after `leading` global ones (and before `trailing` ones): the splice emits
    # `attnopt::gna_attention` instead of `attnopt::attention` (causal/window then come from
    # the layout; `causal` and `window` above must be unset). Set by the planner only.
    layout: GNALayout | None = None
    leading: int = 0
    trailing: int = 0
    # Per-head choice: the canonical query heads that run `layout` (empty: all of them); the
    # others keep the site's exact attention.
    heads: tuple[int, ...] = ()
    # > 0: q, k, v and the output are [B*H, S, D] (batch_rank 1, heads merged into the batch,
    # BLOOM / DeBERTa) and the model views its scores as [B, H, Sq, Skv]: the splice views the
    # operands as [B, H, S, D] (this is H) so masks keep that layout. Masks without
    # `merged_heads` are rank 4 in the [B, H, Sq, Skv] view.
    split_heads: int = 0
    # Terms (at the score rank, constant along queries and keys) the model multiplied its scores
    # by: q is multiplied by them instead (how "mul").
    q_factors: tuple[MaskTerm, ...] = ()
    # The site projects q, k, v and its output itself (Projections); None: the operands are
    # the values the op reads.
    projections: Projections | None = None


def simplify_constant_masks(graph: Graph, spec, masks: list) -> tuple[list, bool, str]:
    """(masks, causal flag, alignment) for a site without a causal flag of its own, with masks
    the analysis proved structural dropped.

    Masks that depend on no user input, carry no bias and whose evaluated pattern is "none"
    (every pair attends: HF's bidirectional models build such an all-True mask) are dropped
    outright; a purely causal one (static sizes) becomes the op's causal flag. Either way the
    same pairs attend, and the fast path needs no mask tensor (a 4K-token all-True bool mask cost
    the SDPA call 100 ms of mask conversion on CPU)."""
    m = spec.mask
    if not structural_masks(graph, spec, masks):
        return masks, False, "top_left"
    if m.kind == "none":
        return [], False, "top_left"
    if m.kind == "causal":
        return [], True, m.alignment
    return masks, False, "top_left"


def structural_masks(graph: Graph, spec, masks: list) -> bool:
    """Whether `masks` are exactly the pattern the analysis evaluated (spec.mask): no padding, no
    score modifiers, static sizes, and no mask depends on a user input."""
    return bool(masks and not spec.mask.padding and not spec.score_mods and isinstance(spec.q_len, int)
                and isinstance(spec.kv_len, int) and all(is_constant(graph, mt.node) for mt in masks))


def is_constant(graph: Graph, nid: str) -> bool:
    """Whether `nid` depends on no user input (its value is the same on every run)."""
    return not user_inputs_reached(graph, nid)


@dataclass(frozen=True)
class DeadRows:
    """What a query row with every key masked computes in the model, for the rewrite."""

    mean_v: bool = False  # the mean of V: the fused op must be followed by that fix-up
    unsupported: str = ""  # why such rows cannot be reproduced (the site is kept)


def dead_row_rule(graph: Graph, masks: list[MaskTerm], normalizer: str) -> DeadRows:
    """What a query row with every key masked computes in the model: nothing to do (the mask is
    constant and the analysis proved every row keeps a key, or masked rows are NaN / zero in the
    model too), the mean of V, or a reason it is not reproducible.

    `masks` run from the normalizer inwards. A finite-fill where replaces what is beneath it,
    so a row it masks entirely is softmax(fill, ..., fill) = mean of V whatever biases were
    added before it (MPT: ALiBi, then masked_fill(mask, finfo.min)). Adds after the where, or
    adds that can themselves mask, would change which keys such rows keep (see never_masks)."""
    selects = [t for t in masks if t.how in ("keep", "drop")]
    finite = [t for t in selects if t.fill is not None and math.isfinite(t.fill)]
    if not finite or normalizer != "softmax":
        return DeadRows()  # -inf fills give NaN rows (undefined); sigmoid gives 0 like the kernels
    if all(is_constant(graph, t.node) for t in masks):
        return DeadRows()  # structural: every row keeps a key (or the analysis called it a tensor mask)
    why = ("an input-dependent where-mask with a finite fill combined with other masks: rows "
           "with every key masked cannot be reproduced exactly")
    if len({t.fill for t in selects}) > 1:
        return DeadRows(unsupported=why)
    innermost_select = max(i for i, t in enumerate(masks) if t.how != "add")
    for i, t in enumerate(masks):
        if t.how == "add" and (i < innermost_select or not never_masks(graph, t, finite[0].fill)):
            return DeadRows(unsupported=why)
    return DeadRows(mean_v=True)

def never_masks(graph: Graph, term: MaskTerm, fill: float) -> bool:
    """Whether an additive term beneath a finite-fill where is a bias that never masks a key.

    The fused op adds the fill where the model replaces by it, so a masked score is bias +
    fill instead of fill. Both weigh exp(-huge) = 0 as long as the row keeps one key whose score
    is not itself near the fill; a bias that came that near would be a mask. Constant terms
    (ALiBi, relative position tables) are evaluated: every value finite and above the mask
    threshold is a proof. Input-dependent terms (DeBERTa's disentangled c2p/p2c scores, products of
    activations) are accepted only under an overwhelming fill (finfo.min, not -1e4) and when
    their values on the probe inputs are finite and never near a mask value."""
    if term.literal is not None:
        x = float(term.literal) * term.factor
        return math.isfinite(x) and x > MASK_FILL_MAX
    constant = is_constant(graph, term.node)
    if not constant and not fill <= OVERWHELMING_FILL:
        return False
    try:
        v = np.asarray(graph.evaluator.evaluate([term.node])[term.node], dtype=np.float64) * term.factor
    except Exception:  # noqa: BLE001 - a value we cannot compute proves nothing
        return False
    return bool(np.isfinite(v).all() and (v > MASK_FILL_MAX).all())
