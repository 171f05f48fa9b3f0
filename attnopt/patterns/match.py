"""What a pattern's `match` returns: a proven attention structure, before mask analysis.

Score axes are named by role: the score tensor (the softmax input) has batch axes, one query
axis and one key axis; `score_axes` gives their positions so mask operands can be broadcast
and read as [..., q, k] whatever the graph's layout was.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from attnopt.ir import Dim


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
    mask_operands: tuple[MaskOperand, ...] = ()
    structural_causal: bool = False  # fused ops' is_causal flag
    causal_alignment: str = "top_left"
    softcap: float | None = None
    window: tuple[int, int] | None = None  # fused ops' own (left, right) window
    nodes: frozenset[str] = frozenset()
    dtype: str | None = None
    layout: str = "BHSD"
    details: dict[str, Any] = field(default_factory=dict)
