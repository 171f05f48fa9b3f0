"""Token layouts a user gives the planner (`attnopt plan --layout`, `attnopt.plan(layout=)`), which
sites each applies to, and a site's layout as the plan records it (inferred or given).

A layout is the site's sequence as ordered segments: one grid (image or video patches, row-major)
and global tokens (text, class, register, sink tokens) before and after it; the GNA kernels keep
global tokens dense at the two ends of the sequence (`leading`, `trailing`).

Syntax of one SPEC (the CLI repeats --layout; Python takes one string, a list, or a dict):
  SPEC     = [TARGET "="] SEGMENTS      TARGET: a site name as the plan lists it (blocks.0), or a
                                        sequence length (4096); no TARGET: every site
  SEGMENTS = SEGMENT ("," SEGMENT)*     in token order
  SEGMENT  = "grid:" A ["x" B ["x" C]]  the grid (1-D, 2-D or 3-D, each extent >= 2)
           | NAME ":" N                 N global tokens, NAME free (text, cls, reg, sink, global)
e.g. `text:512,grid:64x64`, `grid:8x32x32,text:226`, `cls:1,grid:32x32,reg:4`. A site takes its own
SPEC, else the one for its length, else the one for every site. A global segment between two grids
is refused: the kernels hold one grid with globals only at its ends (running tokens permuted so
that the globals sit at an end is not built). Layouts describe self-attention (one sequence for
queries and keys); a causal site takes only sinks then a 1-D grid (its approximation is a causal
window over the tokens after the sinks).

Plan JSON (`SitePlan.token_layout`): {"source": "inferred" | "given", "segments": [
  {"kind": "global", "name": "text", "tokens": 512}, {"kind": "grid", "shape": [64, 64]}]}; checked by
schema.check_token_layout.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from attnopt.errors import BadArgument
from attnopt.ir import Site, TokenGrid
from attnopt.ir.spec import TokenSegment
from attnopt.planner.schema import MAX_EXTENT, MAX_RANK, MAX_TOKENS, check_one_grid, check_token_layout

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_EXAMPLES = "e.g. text:512,grid:64x64 or cls:1,grid:32x32,reg:4"


@dataclass(frozen=True)
class Segment:
    """One run of a layout: the grid (`shape`) or `tokens` global tokens called `name`."""

    kind: str  # "grid" | "global"
    tokens: int
    name: str = ""
    shape: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        if self.kind == "grid":
            return {"kind": "grid", "shape": list(self.shape)}
        return {"kind": "global", "name": self.name or "global", "tokens": self.tokens}

    def describe(self) -> str:
        if self.kind == "grid":
            return "grid:" + "x".join(map(str, self.shape))
        return f"{self.name or 'global'}:{self.tokens}"


def _main(segments: Sequence[Segment]) -> int:
    """Index of the main grid: the largest, the first of equals (TokenGrid.from_segments's rule)."""
    grids = [i for i, s in enumerate(segments) if s.kind == "grid"]
    return max(grids, key=lambda i: (segments[i].tokens, -i))


@dataclass(frozen=True)
class TokenLayout:
    """A site's layout and where it came from ("inferred" by the token trace, or "given")."""

    segments: tuple[Segment, ...]
    source: str = "given"

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.segments)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.segments[_main(self.segments)].shape

    @property
    def leading(self) -> int:
        return sum(s.tokens for s in self.segments[:_main(self.segments)])

    @property
    def trailing(self) -> int:
        return sum(s.tokens for s in self.segments[_main(self.segments) + 1:])

    def describe(self) -> str:
        return ",".join(s.describe() for s in self.segments)

    def token_grid(self) -> TokenGrid:
        return TokenGrid.from_segments([TokenSegment("grid", s.tokens, s.shape) if s.kind == "grid"
                                        else TokenSegment("global", s.tokens) for s in self.segments])

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "segments": [s.to_json() for s in self.segments]}

    @classmethod
    def from_json(cls, d: Any, path: str = "token_layout") -> "TokenLayout":
        check_token_layout(d, path)
        return cls(tuple(Segment("grid", math.prod(s["shape"]), str(s.get("name", "")),
                                 tuple(int(x) for x in s["shape"])) if s["kind"] == "grid" else
                         Segment("global", int(s["tokens"]), str(s.get("name", "global")))
                         for s in d["segments"]), d["source"])

    @classmethod
    def inferred(cls, grid: TokenGrid) -> "TokenLayout":
        return cls(tuple(Segment("grid", s.length, "", tuple(s.shape)) if s.kind == "grid"
                         else Segment("global", s.length, "global") for s in grid.segments), "inferred")


# ---- parsing -------------------------------------------------------------------------------------

def parse_segments(text: str, where: str) -> tuple[Segment, ...]:
    """The segments of SEGMENTS text (module header); BadArgument naming `where` otherwise."""
    def fail(why: str) -> BadArgument:
        return BadArgument(f"{where}: {why}")

    if not isinstance(text, str) or not text.strip():
        raise fail(f"no segments ({_EXAMPLES})")
    segs: list[Segment] = []
    for part in (p.strip() for p in text.split(",")):
        name, colon, size = (x.strip() for x in part.partition(":"))
        if not part or not colon or not size:
            raise fail(f"segment {part!r} is not NAME:TOKENS or grid:AxB ({_EXAMPLES})")
        if name.lower() == "grid":
            dims = size.lower().split("x")
            if not all(d.strip().isdigit() for d in dims) or not 1 <= len(dims) <= MAX_RANK:
                raise fail(f"segment {part!r}: a grid is 1 to {MAX_RANK} extents joined by 'x' "
                           "(grid:1024, grid:64x64, grid:8x32x32)")
            shape = tuple(int(d) for d in dims)
            if min(shape) < 2 or max(shape) > MAX_EXTENT:
                raise fail(f"segment {part!r}: each grid extent must be in [2, {MAX_EXTENT}] "
                           "(leave out extents of 1)")
            segs.append(Segment("grid", math.prod(shape), "", shape))
            continue
        if not _NAME.match(name):
            raise fail(f"segment {part!r}: a global segment's name is letters, digits, '_' or '-' "
                       "(text, cls, reg, sink, global)")
        if not size.isdigit() or not 1 <= int(size) <= MAX_EXTENT:
            raise fail(f"segment {part!r}: the token count must be an integer in [1, {MAX_EXTENT}]"
                       + ("" if size.isdigit() else " (segments are separated by ',')"))
        segs.append(Segment("global", int(size), name))
    check_one_grid([s.kind for s in segs], [s.describe() for s in segs], fail)
    if sum(s.tokens for s in segs) > MAX_TOKENS:
        raise fail(f"{sum(s.tokens for s in segs)} tokens (at most {MAX_TOKENS})")
    return tuple(segs)


@dataclass(frozen=True)
class LayoutRequest:
    """Parsed layouts: per site name, per sequence length, for every site. Values are
    (segments, the spec as the user wrote it, for messages)."""

    by_site: Mapping[str, tuple[tuple[Segment, ...], str]]
    by_length: Mapping[int, tuple[tuple[Segment, ...], str]]
    every: tuple[tuple[Segment, ...], str] | None


def parse_layouts(layout: Any, option: str = "layout") -> LayoutRequest | None:
    """The request of `layout`: None, a SPEC string, a list of them, or a dict {site name | length
    | None: SEGMENTS string or segment JSON list}. BadArgument (exit 2, one line) when malformed."""
    if layout is None or isinstance(layout, LayoutRequest):
        return layout
    items: list[tuple[Any, Any, str]] = []  # (target, segments, the spec as written)
    if isinstance(layout, str):
        layout = [layout]
    if isinstance(layout, Mapping):
        for k, v in layout.items():
            shown = f"{option} {{{k!r}: {v!r}}}"
            if isinstance(k, bool) or (k is not None and not isinstance(k, (str, int))):
                raise BadArgument(f"{shown}: a key is a site name, a sequence length or None "
                                  "(every site)")
            items.append((k, v, shown))
    elif isinstance(layout, (list, tuple)):
        for spec in layout:
            if not isinstance(spec, str):
                raise BadArgument(f"{option}: each entry is a string [SITE=|LENGTH=]SEGMENTS, got "
                                  f"{type(spec).__name__}")
            target, eq, segs = spec.rpartition("=")
            items.append((target.strip() if eq else None, segs, f"{option} {spec!r}"))
    else:
        raise BadArgument(f"{option}: a string [SITE=|LENGTH=]SEGMENTS, a list of them or a dict "
                          f"{{site or length: segments}}, not {type(layout).__name__}")
    by_site: dict[str, Any] = {}
    by_length: dict[int, Any] = {}
    every = None
    for target, raw, shown in items:
        segs = _segments_of(raw, shown)
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        if target is None or target == "":
            if every is not None:
                raise BadArgument(f"{shown}: a layout for every site is already given ({every[1]})")
            every = (segs, shown)
        elif isinstance(target, int):
            total = sum(s.tokens for s in segs)
            if total != target:
                raise BadArgument(f"{shown}: the segments add up to {total} tokens, not {target}")
            if target in by_length:
                raise BadArgument(f"{shown}: length {target} already has a layout "
                                  f"({by_length[target][1]})")
            by_length[target] = (segs, shown)
        else:
            if target in by_site:
                raise BadArgument(f"{shown}: site {target!r} already has a layout ({by_site[target][1]})")
            by_site[target] = (segs, shown)
    return LayoutRequest(by_site, by_length, every)


def _segments_of(raw: Any, shown: str) -> tuple[Segment, ...]:
    if isinstance(raw, str):
        return parse_segments(raw, shown)
    if isinstance(raw, (list, tuple)):  # segment JSON, as a plan records it
        from attnopt.planner.schema import BadPlan

        try:
            lay = TokenLayout.from_json({"source": "given", "segments": list(raw)}, "")
        except BadPlan as e:
            raise BadArgument(f"{shown}: {e}") from None
        return lay.segments
    raise BadArgument(f"{shown}: segments are a string such as text:512,grid:64x64 or a list of "
                      f"segment objects, not {type(raw).__name__}")


# ---- which sites ---------------------------------------------------------------------------------

def _length(site: Site) -> tuple[int | None, int | None]:
    """(queries, keys) of a site when static, else (None, None)."""
    q, k = site.spec.q_len, site.spec.kv_len
    return (q, k) if isinstance(q, int) and isinstance(k, int) else (None, None)


def _fits(site: Site, segs: tuple[Segment, ...], shown: str) -> None:
    total = sum(s.tokens for s in segs)
    q, k = _length(site)
    if q is None:
        raise BadArgument(f"{shown}: site {site.name!r} has symbolic sizes (plan at fixed sizes)")
    if q != k:
        raise BadArgument(f"{shown}: site {site.name!r} is cross-attention ({q} queries, {k} keys); "
                          "a token layout describes one sequence")
    if total != q:
        raise BadArgument(f"{shown}: the segments add up to {total} tokens, but site "
                          f"{site.name!r} has {q}")
    if site.spec.mask.kind == "causal":
        i = _main(segs)
        if len(segs[i].shape) != 1 or i != len(segs) - 1:
            raise BadArgument(f"{shown}: site {site.name!r} is causal: give sinks then one 1-D "
                              f"grid (e.g. sink:4,grid:{q - 4})")


def assign_layouts(request: LayoutRequest | None, sites: Sequence[Site]) -> dict[str, TokenLayout]:
    """The given layout of each site the request covers; BadArgument (one line) when a named site
    does not exist, a length matches no site, or segments do not add up to a site's length."""
    if request is None:
        return {}
    names = [s.name for s in sites]
    for name, (_segs, shown) in request.by_site.items():
        if name not in names:
            known = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise BadArgument(f"{shown}: the model has no attention site {name!r} "
                              f"(its sites: {known or 'none'})")
    lengths = {q for q, k in map(_length, sites) if q is not None and q == k}
    for n, (_segs, shown) in request.by_length.items():
        if n not in lengths:
            raise BadArgument(f"{shown}: no self-attention site has {n} tokens (their lengths: "
                              f"{', '.join(map(str, sorted(lengths))) or 'none'})")
    out = {}
    for s in sites:
        q, k = _length(s)
        if s.name in request.by_site:
            segs, shown = request.by_site[s.name]
        elif q is not None and q == k and q in request.by_length:
            segs, shown = request.by_length[q]
        elif request.every is not None and q is not None and q == k:
            segs, shown = request.every
            if sum(x.tokens for x in segs) != q:
                raise BadArgument(f"{shown}: the segments add up to {sum(x.tokens for x in segs)} "
                                  f"tokens, but site {s.name!r} has {q} (give LENGTH=SEGMENTS or "
                                  "SITE=SEGMENTS for sites of other lengths)")
        else:
            continue
        _fits(s, segs, shown)
        out[s.name] = TokenLayout(segs, "given")
    return out
