"""What the detector says about a site: the math (`AttentionSpec`, `MaskSpec`, `TokenGrid`),
where it lives (`Site`, with its pattern family's typed details), why a near miss is not attention
(`Rejection`), and how to run it (`Variant`). Canonical layout BHSD = [batch, heads, seq, head_dim]."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from attnopt.ir.graph import Dim
from attnopt.ir.layout import GNALayout
from attnopt.ir.score_mods import ScoreMod

@dataclass(frozen=True)
class MaskSpec:
    """Which (query, key) pairs may attend.

    kind: none | causal | sliding_window | block | padding | tensor.
    For causal and sliding_window, key j is allowed for query i iff
    -left <= (j - i - offset) <= right, where offset = kv_len - q_len aligns the diagonal
    bottom-right (offset 0 for top-left alignment is stated in `alignment`). left is None for
    an unbounded left side (plain causal). `padding` is True when, on top of the structural
    kind, keys are masked per batch row by a key-padding input (HF attention_mask).
    kind "padding" alone means only key padding. kind "tensor" is an arbitrary mask tensor.
    """

    kind: str = "none"
    left: int | None = None
    right: int | None = None
    block: int | None = None
    padding: bool = False
    alignment: str = "bottom_right"
    source: str | None = None  # node that produced the mask, for reports

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        if self.kind in ("causal", "sliding_window"):
            d["left"], d["right"] = self.left, self.right
            if self.alignment != "bottom_right":
                d["alignment"] = self.alignment
        if self.kind == "block":
            d["block"] = self.block
        if self.padding or self.kind == "padding":
            d["padding"] = True
        return d

    def describe(self) -> str:
        base = {
            "none": "none",
            "causal": "causal",
            "padding": "padding",
            "tensor": "tensor",
            "block": f"block({self.block})",
            "sliding_window": f"window({self.left},{self.right})",
        }.get(self.kind, self.kind)
        if self.padding and self.kind != "padding":
            base += "+padding"
        return base


@dataclass(frozen=True)
class TokenSegment:
    """One contiguous run of a site's sequence: a `grid` (row-major `shape`, 1-3 dims) or `global`
    tokens (text, class, register tokens) that every layout keeps dense. `source` names the IR
    node the segment was read from (for reports; not part of equality)."""

    kind: str  # "grid" | "global"
    length: int
    shape: tuple[int, ...] = ()
    source: str | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "length": self.length}
        if self.kind == "grid":
            d["shape"] = list(self.shape)
        return d

    def describe(self) -> str:
        return "x".join(map(str, self.shape)) if self.kind == "grid" else f"{self.length}g"


@dataclass(frozen=True)
class TokenGrid:
    """A site's token layout. `shape` (e.g. (14, 14)) is the main grid, after `leading` and before
    `trailing` tokens that are not on it; `segments` is the whole sequence in order (global runs:
    text, class or register tokens; grid runs), summing to the sequence length.

    Readers that know only `shape` and `leading` keep working: for a layout whose tokens are
    `leading` globals then the grid, `prod(shape) + leading` is the sequence length; any other
    layout (text after the image, several grids) has `trailing > 0`, so that sum falls short and
    such a reader sees no layout it can use. Built with only `shape`/`leading`/`trailing`,
    `segments` is filled in (global, grid, global); `from_segments` builds the rest from them."""

    shape: tuple[int, ...]
    leading: int = 0
    trailing: int = 0
    segments: tuple[TokenSegment, ...] = ()

    def __post_init__(self) -> None:
        if not self.segments:
            segs = []
            if self.leading:
                segs.append(TokenSegment("global", self.leading))
            segs.append(TokenSegment("grid", math.prod(self.shape), tuple(self.shape)))
            if self.trailing:
                segs.append(TokenSegment("global", self.trailing))
            object.__setattr__(self, "segments", tuple(segs))

    @classmethod
    def from_segments(cls, segments: "tuple[TokenSegment, ...] | list[TokenSegment]") -> "TokenGrid":
        """The main grid is the largest (the first of equals); every token before it is `leading`,
        every token after it `trailing`."""
        segs = tuple(segments)
        grids = [i for i, s in enumerate(segs) if s.kind == "grid"]
        if not grids:
            raise ValueError("a token layout needs at least one grid segment")
        main = max(grids, key=lambda i: (segs[i].length, -i))
        return cls(shape=tuple(segs[main].shape), leading=sum(s.length for s in segs[:main]),
                   trailing=sum(s.length for s in segs[main + 1:]), segments=segs)

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segments)

    def describe(self) -> str:
        s = "x".join(str(d) for d in self.shape)
        if not self.trailing and len(self.segments) <= 2:
            return f"{s}+{self.leading}" if self.leading else s
        return "|".join(seg.describe() for seg in self.segments)

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "leading": self.leading, "trailing": self.trailing,
                "segments": [seg.to_json() for seg in self.segments]}


@dataclass(frozen=True)
class AttentionSpec:
    """The math of one attention site (docs/ARCHITECTURE.md, "The journey of one attention site")."""

    normalizer: str  # softmax | sigmoid | softplus | linear
    batch: Dim
    num_heads: Dim
    num_kv_heads: Dim
    q_len: Dim
    kv_len: Dim
    head_dim: Dim
    v_head_dim: Dim
    scale: float | None  # folded; None only for fused ops whose scale is implicit and unknown
    mask: MaskSpec = field(default_factory=MaskSpec)
    score_mods: tuple[ScoreMod, ...] = ()  # typed (ir/score_mods.py), shown as "bias", "softcap:30.0"
    token_grid: TokenGrid | None = None
    dtype: str | None = None
    layout: str = "BHSD"
    # why `token_grid` is None ("" when it is set, or nobody asked): not in to_json, since the
    # node names it quotes differ between front ends
    token_grid_reason: str = field(default="", compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "normalizer": self.normalizer,
            "batch": self.batch,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "q_len": self.q_len,
            "kv_len": self.kv_len,
            "head_dim": self.head_dim,
            "v_head_dim": self.v_head_dim,
            "scale": self.scale,
            "mask": self.mask.to_json(),
            "score_mods": list(self.score_mods),
            "token_grid": None if self.token_grid is None else self.token_grid.to_json(),
            "dtype": self.dtype,
            "layout": self.layout,
        }


@dataclass(frozen=True, kw_only=True)
class PatternDetails:
    """Base of the typed facts a pattern family records for its rewrite.

    Each family (patterns/decomposed.py, patterns/fused.py) has its own frozen subclass, and the
    registry (patterns/registry.py) maps a details type back to the family that builds its
    recipe, so no code branches on pattern names."""


@dataclass(frozen=True)
class Site:
    """One attention site: its spec and where it lives in the graph.

    q, k, v, mask, bias: IR node ids of the boundary values. `output` is the node whose value
    the site computes (what a rewrite replaces). `nodes` are the IR nodes inside the site, all
    of whose users are inside it too (a rewrite may delete them). `details` keeps the facts a
    rewrite needs (e.g. whether k arrives transposed, which scale ops were folded), typed by
    the pattern family that found the site.
    """

    name: str
    spec: AttentionSpec
    output: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    mask: tuple[str, ...] = ()
    bias: tuple[str, ...] = ()
    nodes: frozenset[str] = frozenset()
    pattern: str = ""
    details: PatternDetails = field(default_factory=PatternDetails)

    def to_json(self) -> dict[str, Any]:
        d = {"name": self.name, "pattern": self.pattern, "output_node": self.output}
        d.update(self.spec.to_json())
        return d


@dataclass(frozen=True)
class Rejection:
    """A near miss: something that looked like attention and is not, with the reason."""

    node: str
    reason: str
    pattern: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "reason": self.reason}


def dim_str(d: Dim | None) -> str:
    return "?" if d is None else str(d)


def as_json(obj: Any) -> Any:
    """Dataclass -> plain JSON-able structure (for reports)."""
    if hasattr(obj, "to_json"):
        return obj.to_json()
    return asdict(obj)


@dataclass(frozen=True)
class Variant:
    """How to run a spec: kernel family, tiles, sparsity layout.

    family: dense | causal | gqa_decode | block_sparse_gna | sliding_window | sigmoid |
            linear_chunked | cpu_reference.
    q_tile / kv_tile: tile shapes (one entry per tiled grid dimension; 1-D tiles are (n,)).
    exact: False for approximations the user must opt into.
    """

    family: str = "dense"
    q_tile: tuple[int, ...] = (64,)
    kv_tile: tuple[int, ...] = (64,)
    layout: GNALayout | None = None
    dynamic_kv_tiling: bool = False
    exact: bool = True
