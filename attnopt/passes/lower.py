"""Lower a recipe once into neutral steps; each emitter turns the steps into its own nodes.

Layouts. An operand after its recipe permutation is canonical [batch..., S, D] with
`batch_rank` batch axes (0..3); the fused op's layout is [B, H, S, D]. Mask terms are brought to
the score rank and permuted to [batch..., Sq, Skv] (a merged-head term's [B*H, Sq, Skv] viewed
as [B, H, Sq, Skv]), combined, then viewed as [B|1, H|1, Sq, Skv]. The op's output [B, H, Sq, Dv]
is viewed back to [batch..., Sq, Dv] and permuted to the site's layout.

The batch axes map to the op's [B, H] as follows (the same views for q, k, v, masks, output):
  rank 2  [B, H]              as is
  rank 1  [B] or [B*H]        unsqueeze a head axis, or (merged heads) split B*H into [B, H]
  rank 0  []                  unsqueeze both
  rank 3  [B, H1, H2]         flatten H1*H2 into H (k/v with H2 == 1 broadcast: squeeze it, GQA)

A site that projects its own operands (patterns/recipe.Projections: torch's
multi_head_attention_forward) loads each [S, B, E_in] input through its `Linear` (extra key rows
appended along S) and splits [S, B, H*D] to [S, B, H, D] before the operand's permutation; the
combined mask gains a column per extra key (attending), and the output [Sq, B, H, Dv] is merged
to [Sq, B, H*Dv] and passed through the output `Linear`.

A term the model added to a view of its scores (patterns/score_views.py) is first brought to the
score rank: ToRank to the view's rank, Broadcast where a merged group is only partly broadcast,
MergeAxes back to the score layout. q may carry per-head factors (LoadOperand.factors).

Steps, in order: three `LoadOperand`s (q, k, v), `CombineMasks` (possibly without terms),
`Attend` (the fused call), then `ZeroNaNRows` and `MeanVOnDeadRows` when the model needs them,
and `StoreOutput`. The emitters realize every view op and step; what only one target needs
(ONNX's static sizes, ORT's key-bias folding, emit/ort.py) stays in that emitter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from attnopt.ir import GNALayout
from attnopt.patterns.recipe import Linear, MaskTerm, Recipe

# ---- view ops: layout changes that keep element order or broadcast --------------------------


@dataclass(frozen=True)
class Permute:
    perm: tuple[int, ...]  # output axis i is input axis perm[i]


@dataclass(frozen=True)
class Unsqueeze:
    axes: tuple[int, ...]  # size-1 axes at these output positions (inserted in this order)


@dataclass(frozen=True)
class Squeeze:
    axes: tuple[int, ...]  # size-1 axes removed


@dataclass(frozen=True)
class Flatten:
    start: int  # axes start..end (inclusive) merged into one
    end: int
    sizes: tuple = ()  # their sizes where static (needed by targets that reshape to constants)


@dataclass(frozen=True)
class Unflatten:
    axis: int  # split into `sizes` (one entry may be -1)
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class Expand:
    sizes: tuple[int, ...]  # -1 keeps an axis


@dataclass(frozen=True)
class ToRank:
    rank: int  # prepend size-1 axes up to this rank (broadcasting; names no size)


@dataclass(frozen=True)
class SplitLead:
    """[B*H | 1, ...] -> [B | 1, H | 1, ...]. The lead is the source's own first axis when the
    source had `rank` axes, else (it was broadcast up to `rank`) 1, which stays broadcast."""

    heads: int
    rank: int


@dataclass(frozen=True)
class SizeOf:
    """A size known at run time only: `node`'s size on `axis`, floor-divided by `divisor`."""

    node: str
    axis: int
    divisor: int = 1


@dataclass(frozen=True)
class Broadcast:
    """Broadcast a term to a view of the scores: entry None keeps the axis, an int or a SizeOf
    is the size to expand it to (patterns/score_views.py)."""

    sizes: tuple[int | SizeOf | None, ...]


@dataclass(frozen=True)
class MergeAxes:
    """Merge each run of consecutive axes `groups[i]` into output axis i (a view of the scores
    back to the score layout)."""

    groups: tuple[tuple[int, ...], ...]


View = Permute | Unsqueeze | Squeeze | Flatten | Unflatten | Expand | ToRank | SplitLead | Broadcast | MergeAxes

# ---- steps ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadOperand:
    """q, k or v into the op's [B, H(kv), S, D]."""

    role: str  # "q" | "k" | "v"
    node: str
    views: tuple[View, ...]
    # q only: per-head factors the model multiplied its scores by, each a term in canonical
    # [batch..., 1, 1] order viewed by `factor_views` to [B|1, H|1, 1, 1]; q is multiplied by them.
    factors: tuple[MaskInput, ...] = ()
    factor_views: tuple[View, ...] = ()
    # Before `views`, in the node's own [S, B, E_in] layout (Projections): the linear layer,
    # then rows appended along axis 0 (a [1, 1, E] node broadcast over the batch, None: zeros).
    linear: Linear | None = None
    append: tuple[str | None, ...] = ()


@dataclass(frozen=True)
class MaskInput:
    """One mask term at the score rank in canonical [batch..., Sq, Skv] order."""

    term: MaskTerm
    views: tuple[View, ...]


@dataclass(frozen=True)
class CombineMasks:
    """The op's attn_mask: the terms combined (none: no mask), then viewed as [B|1, H|1, Sq, Skv].

    Additively, each term contributes term * factor ("add") or fill where it masks ("keep":
    where the condition is False, "drop": where it is True), which is the model's own arithmetic.
    `boolean`: every term selects with a -inf fill, so the combination is exactly a bool mask
    (True attends: the AND of the keeps) for targets that take one."""

    inputs: tuple[MaskInput, ...]
    boolean: bool
    views: tuple[View, ...]
    pad: int = 0  # key columns appended after the views, every query attending (extra keys)


@dataclass(frozen=True)
class Attend:
    """The fused call on the loaded operands and the combined mask."""

    scale: float
    causal: bool
    causal_alignment: str
    window: tuple[int | None, int | None] | None
    softcap: float | None
    normalizer: str
    layout: GNALayout | None = None  # a GNA layout: the GNA op (causal/window come from it)
    leading: int = 0
    heads: tuple[int, ...] = ()  # the query heads that run `layout` (empty: all)
    # Facts detection proved, for targets that need static sizes where shapes are symbolic:
    q_heads: int | None = None  # heads of the loaded q and k
    k_heads: int | None = None
    head_dims: tuple[int | None, int | None] = (None, None)  # (q/k head dim, v head dim)
    trailing: int = 0  # global tokens after the GNA grid (`leading` ones come before it)


@dataclass(frozen=True)
class ZeroNaNRows:
    """The model zeroes NaN probabilities (rows with every key masked): the output does too."""


@dataclass(frozen=True)
class MeanVOnDeadRows:
    """Rows whose keys the where-selects mask entirely are softmax(constant) = mean of V in the
    model; kernels give zeros. Only the selects decide (additive terms beside them are biases
    that never mask: patterns/recipe.dead_row_rule). dead = no key kept, in [B|1, H|1, Sq, 1]."""

    selects: tuple[MaskInput, ...]
    views: tuple[View, ...]  # the combined keep mask -> [B|1, H|1, Sq, Skv]
    kv_repeat: int  # query heads per kv head: V's mean is repeated that often over heads


@dataclass(frozen=True)
class StoreOutput:
    """[B, H, Sq, Dv] -> the site's output layout; the result replaces `node`."""

    node: str
    views: tuple[View, ...]
    linear: Linear | None = None  # applied after `views` (Projections.out)


Step = LoadOperand | CombineMasks | Attend | ZeroNaNRows | MeanVOnDeadRows | StoreOutput


@dataclass(frozen=True)
class Lowered:
    site: str
    steps: tuple[Step, ...]
    bypass: tuple[tuple[str, str], ...]  # (scale node, its tensor input): consumers read the input
    remove: frozenset[str]  # nodes of the site the splice may delete once unused
    batch_rank: int  # batch axes of the canonical operands (module header)
    merged_heads: int = 0  # > 0: operands are [B*H, S, D] and mask terms [B, H, Sq, Skv] (H)

    def step(self, kind: type) -> Step | None:
        """The first step of a kind (each kind but LoadOperand occurs at most once)."""
        return next((s for s in self.steps if isinstance(s, kind)), None)

    def operand(self, role: str) -> LoadOperand:
        return next(s for s in self.steps if isinstance(s, LoadOperand) and s.role == role)


# ---- lowering -------------------------------------------------------------------------------


def to_heads(r: Recipe, role: str) -> tuple[View, ...]:
    """Canonical [batch..., *, *] -> [B, H, *, *] for role "q", "kv" or "mask" (module header)."""
    if r.split_heads:  # [B*H, S, D] -> [B, H, S, D]; masks are [B, H, Sq, Skv] already
        return () if role == "mask" else (Unflatten(0, (-1, r.split_heads)),)
    rb = r.batch_rank
    if rb == 2:
        return ()
    if rb == 1:
        return (Unsqueeze((1,)),)
    if rb == 0:
        return (Unsqueeze((0, 1)),)
    b1, b2 = r.batch_sizes[1:3]
    if role == "kv" and r.k_group_broadcast:
        return (Squeeze((2,)),)
    if role == "mask":  # broadcast axes are expanded before they are merged
        return (Expand((-1, b1, b2, -1, -1)), Flatten(1, 2, (b1, b2)))
    return (Flatten(1, 2, (b1, b2)),)


def from_heads(r: Recipe) -> tuple[View, ...]:
    """The op's [B, H, Sq, Dv] -> canonical [batch..., Sq, Dv]: the inverse of to_heads(q)."""
    if r.split_heads:
        return (Flatten(0, 1),)
    rb = r.batch_rank
    if rb == 2:
        return ()
    if rb == 1:
        return (Squeeze((1,)),)
    if rb == 0:
        return (Squeeze((0, 1)),)
    return (Unflatten(1, tuple(r.batch_sizes[1:3])),)


def _permute(perm: tuple[int, ...]) -> tuple[View, ...]:
    return () if tuple(perm) == tuple(range(len(perm))) else (Permute(tuple(perm)),)


def mask_input(t: MaskTerm, r: Recipe | None = None) -> MaskInput:
    """A term at the score rank, permuted to canonical order, a merged-head term viewed as
    [B, H, Sq, Skv] (a literal scalar is made at the score rank by the emitter). A term added in
    a view of the scores is first broadcast to that view and merged back (`r` sizes the view's
    symbolic axes from q and k)."""
    if t.literal is not None:
        views: tuple[View, ...] = ()
    elif t.view is not None:
        views = _from_view(t, r)
    else:
        views = (ToRank(t.rank),)
    views += _permute(t.perm)
    return MaskInput(t, views + ((SplitLead(t.merged_heads, t.rank),) if t.merged_heads else ()))


def _from_view(t: MaskTerm, r: Recipe | None) -> tuple[View, ...]:
    v = t.view
    sizes = tuple(_view_size(e, t, r) for e in v.expand) if any(e is not None for e in v.expand) else ()
    return (ToRank(len(v.inner)),) + ((Broadcast(sizes),) if sizes else ()) + (MergeAxes(v.groups),)


def _view_size(e, t: MaskTerm, r: Recipe | None) -> int | SizeOf | None:
    """A Broadcast size: ("outer", i, c) is score axis i's run-time size over c, read from the
    operand that carries that axis (canonical batch axes and Sq from q, Skv from k)."""
    if e is None or isinstance(e, int):
        return e
    _, axis, divisor = e
    c = list(t.perm).index(axis)
    rb = r.batch_rank
    o = r.k if c == rb + 1 else r.q
    return SizeOf(o.node, o.perm[min(c, rb)], divisor)


def _load(r: Recipe, role: str, node: str, perm: tuple[int, ...], factors: tuple[MaskInput, ...]
          ) -> LoadOperand:
    p = r.projections
    split: tuple[View, ...] = ()
    linear, append = None, ()
    if p is not None:  # [S, B, E_in] -> linear -> [S, B, H*D] (+ extra keys) -> [S, B, H, D]
        linear = getattr(p, role)
        append = tuple(e[0 if role == "k" else 1] for e in p.extra_keys) if role != "q" else ()
        split = (Unflatten(2, (p.heads, -1)),)
    return LoadOperand(role, node, split + _permute(perm) + to_heads(r, "q" if role == "q" else "kv"),
                       factors if role == "q" else (), to_heads(r, "mask") if role == "q" else (),
                       linear, append)


def lower(r: Recipe) -> Lowered:
    """The neutral steps of one recipe (the same for every emitter)."""
    factors = tuple(mask_input(t, r) for t in r.q_factors)
    loads = tuple(_load(r, role, o.node, o.perm, factors) for role, o in (("q", r.q), ("k", r.k), ("v", r.v)))
    inputs = tuple(mask_input(t, r) for t in r.masks)
    boolean = bool(r.masks) and all(t.how in ("keep", "drop") and t.fill == -math.inf for t in r.masks)
    p = r.projections
    extra = len(p.extra_keys) if p is not None and inputs else 0
    steps: list[Step] = [*loads, CombineMasks(inputs, boolean, to_heads(r, "mask"), extra),
                         Attend(r.scale, r.causal, r.causal_alignment, r.window, r.softcap,
                                r.normalizer, r.layout, r.leading, r.heads, r.q_heads, r.k_heads,
                                tuple(r.head_dims), trailing=r.trailing)]
    if r.nan_guard:
        steps.append(ZeroNaNRows())
    if r.dead_rows_mean_v:
        rep = r.q_heads // r.k_heads if r.q_heads and r.k_heads and r.q_heads != r.k_heads else 1
        selects = tuple(i for i in inputs if i.term.how in ("keep", "drop"))
        steps.append(MeanVOnDeadRows(selects, to_heads(r, "mask"), rep))
    merge = (Flatten(2, 3),) if p is not None else ()  # [Sq, B, H, Dv] -> [Sq, B, H*Dv]
    steps.append(StoreOutput(r.output, from_heads(r) + _permute(r.out_perm) + merge, p.out if p else None))
    return Lowered(r.site, tuple(steps), tuple(r.bypass), frozenset(r.remove), r.batch_rank,
                   r.split_heads)
