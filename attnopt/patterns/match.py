"""What a pattern's `match` returns: a proven attention structure, before mask analysis.

Score axes are named by role: the score tensor (the softmax input) has batch axes, one query
axis and one key axis; `score_axes` gives their positions so mask operands can be broadcast
and read as [..., q, k] whatever the graph's layout was.

`Match` holds what every family proves (and what mask analysis reads); `details` holds what only
the family's own recipe needs, as the family's frozen `Details` subclass (patterns/details.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from attnopt.ir import Dim, PatternDetails


@dataclass(frozen=True)
class ScoreView:
    """The model viewed its scores as `inner` to add a term, then viewed them back (Swin's
    per-window masks over [B/nW, nW, H, N, N], ViTDet/SAM's decomposed rel-pos over
    [B*H, qh, qw, kh, kw]). `inner` refines the outer score layout: outer axis i is the product
    of the consecutive inner axes `groups[i]`. A term met inside is broadcast to `inner` and
    merged back to the outer layout: `expand[j]` is None where the term keeps its own size on
    inner axis j (it is full there, or broadcast over the whole group), else the size to expand
    to: an int, or ("outer", i, c) for outer axis i's run-time size divided by c (a symbolic
    window batch)."""

    inner: tuple[Dim, ...]
    inner_probe: tuple[int, ...]  # `inner` on the probe inputs (mask analysis reads these)
    outer_probe: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    expand: tuple = ()


@dataclass(frozen=True)
class MaskOperand:
    """An operand that changes scores: added (`add`) or selecting via `where`.

    how: "add" (additive float mask or bias), "keep" (where(cond, scores, fill): cond True
    keeps), "drop" (where(cond, fill, scores): cond True masks). fill: the fill value for
    where forms.
    """

    node: str
    how: str
    fill: float | None = None
    scale: float = 1.0  # a factor the model applied to this operand inside the site (baddbmm beta)
    # > 0: the operand lives in the merged [B*H, Sq, Skv] layout of a site whose scores are
    # viewed as [B, H, Sq, Skv] (BLOOM's baddbmm ALiBi): this is H.
    merged_heads: int = 0
    view: ScoreView | None = None  # the operand lives in a view of the scores (ScoreView)


@dataclass(frozen=True, kw_only=True)
class Details(PatternDetails):
    """The facts every family's details carry once detection has analyzed the masks."""

    mask_operands: tuple[MaskOperand, ...] = ()  # set by passes/detect.py from the Match
    mask_reason: str = ""  # why the mask analysis called the mask a tensor, if it did


@dataclass(frozen=True)
class Match:
    pattern: str
    normalizer: str
    anchor: str  # the softmax / sigmoid / fused node
    output: str  # node whose value the site computes
    q: str | None
    k: str | None
    v: str | None
    batch: Dim
    num_heads: Dim
    num_kv_heads: Dim
    q_len: Dim
    kv_len: Dim
    head_dim: Dim
    v_head_dim: Dim
    scale: float | None
    score_shape: tuple[Dim, ...] | None = None
    score_axes: tuple[int, int] | None = None  # (query axis, key axis) in the score tensor
    score_node: str | None = None  # the node whose probed shape sizes the scores (with score_axes)
    mask_operands: tuple[MaskOperand, ...] = ()
    structural_causal: bool = False  # fused ops' is_causal flag
    causal_alignment: str = "top_left"
    softcap: float | None = None
    window: tuple[int, int] | None = None  # fused ops' own (left, right) window
    key_padding_input: str | None = None  # fused ops' own [B, Skv] key-padding input
    nodes: frozenset[str] = frozenset()
    dtype: str | None = None
    layout: str = "BHSD"
    details: Details = field(default_factory=Details)
