"""Where the tokens along one axis of a value come from: the backward trace behind token layouts.

`TokenTrace.runs(node, axis)` follows one axis of a value back through the ops that keep token
positions (projections, norms, activations, elementwise ops with broadcasting, rope, permutes,
reshapes that keep or merge the axis, attention outputs, which inherit their queries' positions)
and returns the axis as an ordered list of `Run`s:

  grid    tokens laid out on a grid: a reshape merged two or more axes into this one (a conv's
          spatial output flattened, or patches packed by reshape/permute as in Flux's
          `_pack_latents`), or rotary position ids (Flux's img_ids rows (0, row, col)) enumerate
          a grid in row-major order;
  tokens  a run with no grid structure known (text embeddings, class/register tokens, a model
          input of [B, N, C] tokens);

or None when the trace does not know an op on the way (a slice, a gather, a data-dependent
split). A `torch.cat` along the axis concatenates its inputs' runs in order (text first or image
first); where several operands reach the same axis (x + rope(x), a residual add) their runs are
merged, each position taking the most informative reading. Shapes only (no native op arguments):
the cat axis, the stack axis and reshape groups are read from static shapes, so the trace works
on any front end's IR. Canonical layouts: whatever the graph uses; axes are indices.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnopt.ir import Graph

# Position ids: an input [N, k] or [B, N, k] with a few coordinates per token (Flux: (0, row, col)).
MAX_ID_COORDS = 4

# Ops that move tokens while keeping shapes (or whose shape change the trace cannot read from
# shapes alone): the trace stops there rather than guess.
_STOP = frozenset({
    "slice", "select", "narrow", "index", "index_select", "gather", "gathernd", "gatherelements",
    "take_along_dim", "scatter", "scatter_add", "scatterelements", "scatternd", "index_put",
    "roll", "flip", "sort", "argsort", "topk", "split", "split_with_sizes", "chunk", "unbind",
    "tensor_split",
    "pad", "constant_pad_nd", "nonzero", "masked_select", "masked_scatter", "unfold", "fold",
    "im2col", "col2im", "pixel_shuffle", "pixel_unshuffle", "embedding_bag", "cumsum", "cumprod",
    "flatten", "squeeze", "unsqueeze", "view", "reshape", "tile", "repeat", "expand",
})
_CAT = frozenset({"cat", "concat", "concatenate"})
_SLICE = frozenset({"slice", "narrow"})
_SPLIT = frozenset({"split", "split_with_sizes", "chunk", "tensor_split"})
_SELECT = frozenset({"select"})
_CONV = ("conv", "convolution")


@dataclass(frozen=True)
class Run:
    """A contiguous run of tokens: a grid (`dims`, row-major) or plain tokens (`dims` = (n,))."""

    kind: str  # "grid" | "tokens" | "cut" (part of a grid) | "conflict" (readings disagree)
    dims: tuple[int, ...]
    source: str = ""  # the node the run was read from (for reports)

    @property
    def length(self) -> int:
        return math.prod(self.dims)


Runs = tuple[Run, ...]


def base_name(native: Any) -> str:
    """'cat.default' -> 'cat', 'ai.onnx::Concat' -> 'concat', 'aten::linear' -> 'linear'."""
    s = str(native or "").split("::")[-1]
    return s.split(".")[0].lower()


class TokenTrace:
    """Memoized backward trace of token positions over one graph (one per detect run)."""

    def __init__(self, graph: Graph):
        self.g = graph
        self.memo: dict[tuple[str, int], Runs | None] = {}
        self.ids_cache: dict[str, Runs | None] = {}
        self.hit_cache: dict[str, tuple[int, list[int]]] | None = None

    # ---- entry ---------------------------------------------------------------------------
    def runs(self, node: str, axis: int) -> Runs | None:
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 20000))
        try:
            return self._runs(node, axis)
        except RecursionError:
            return None
        finally:
            sys.setrecursionlimit(limit)

    # ---- the trace -----------------------------------------------------------------------
    def _shape(self, n: str) -> tuple[int, ...] | None:
        s = self.g.shape(n)
        if s is None or not all(isinstance(d, int) for d in s):
            return None
        return tuple(s)

    def _runs(self, n: str, ax: int) -> Runs | None:
        key = (n, ax)
        if key in self.memo:
            return self.memo[key]
        self.memo[key] = None  # a cycle (there are none in a DAG) or a re-entry reads "unknown"
        out = self._step(n, ax)
        self.memo[key] = out
        return out

    def _step(self, n: str, ax: int) -> Runs | None:
        g = self.g
        shape = self._shape(n)
        if shape is None or not 0 <= ax < len(shape):
            return None
        L = shape[ax]
        op = g.op(n)
        ins = g.inputs_of(n)
        if op == "const" or g.attr(n, "role") == "param":
            return None  # a weight (a learned position embedding) says nothing of the tokens
        if op == "input":
            return self._input_runs(n, ax, shape)
        if op == "transpose":
            perm = g.attr(n, "perm")
            if perm is None or len(perm) != len(shape):
                return None
            return self._runs(ins[0], int(perm[ax]))
        if op == "reshape":
            return self._reshape(n, ax, shape)
        if op in ("matmul", "baddbmm"):
            return self._matmul(n, ax, shape)
        if op == "einsum":
            return self._einsum(n, ax)
        if op == "sdpa":
            if ax == len(shape) - 1:
                return None
            q = self._shape(ins[0])
            return self._runs(ins[0], ax) if q is not None and len(q) == len(shape) and q[ax] == L else None
        if op == "repeat":
            return None if g.attr(n, "dim") == ax else self._broadcast(n, ax, shape, ins[:1])
        if op == "softmax" and g.attr(n, "axis") == ax:
            return self._runs(ins[0], ax)
        if op == "expand":  # an axis the expand creates or broadcasts holds no tokens of its own
            src = self._shape(ins[0])
            j = -1 if src is None else ax - (len(shape) - len(src))
            return self._runs(ins[0], j) if j >= 0 and src[j] == L else None
        if op == "other":
            name = base_name(g.attr(n, "native"))
            if name in _CAT:
                return self._cat(n, ax, shape)
            if name == "stack":
                return self._stack(n, ax, shape)
            if name == "outer":
                return self._runs(ins[0], 0) if ax == 0 and len(ins) == 2 else \
                    (self._runs(ins[1], 0) if ax == 1 and len(ins) == 2 else None)
            if any(c in name for c in _CONV):
                # a conv's spatial output axis: one axis of a grid (merged into the sequence by a
                # later flatten); its batch axis is its input's
                if ax >= 2:
                    return (Run("grid", (L,), n),)
                return self._runs(ins[0], 0) if ax == 0 else None
            if name in _SLICE and ins:
                return self._slice(n, ins[0], ax, shape)
            if name == "getitem" and ins and base_name(self.g.attr(ins[0], "native")) in _SPLIT:
                src = self.g.inputs_of(ins[0])
                return self._slice(n, src[0], ax, shape) if src else None
            if name in _SELECT and ins:
                return self._select(ins[0], ax, shape)
            if name == "getitem" and ins and base_name(self.g.attr(ins[0], "native")) == "unbind":
                src = self.g.inputs_of(ins[0])  # q, k, v = qkv.unbind(0): an axis removed
                return self._select(src[0], ax, shape) if src else None
            if name in _STOP or name == "getitem" and self._is_multi_split(ins):
                return None
        return self._broadcast(n, ax, shape, ins)

    def _select(self, src: str, ax: int, shape: tuple[int, ...]) -> Runs | None:
        """x.select(d, i) along another axis: the axis keeps its tokens (d read from shapes)."""
        s = self._shape(src)
        if s is None or len(s) != len(shape) + 1:
            return None
        js = {ax if ax < d else ax + 1 for d in range(len(s)) if s[:d] + s[d + 1:] == shape}
        return self._runs(src, js.pop()) if len(js) == 1 else None

    def _slice(self, n: str, src: str, ax: int, shape: tuple[int, ...]) -> Runs | None:
        """A slice (or a piece of a split): along another axis the tokens pass; along this one the
        offset is found by comparing probe values (a contiguous, unit-step piece), and the
        source's runs are cut there."""
        s = self._shape(src)
        if s is None or len(s) != len(shape):
            return None
        L = shape[ax]
        if s[ax] == L:
            return self._runs(src, ax)
        if any(s[b] != shape[b] for b in range(len(s)) if b != ax):
            return None
        runs = self._runs(src, ax)
        if runs is None:
            return None
        off = self._offset(n, src, ax, L, runs)
        return None if off is None else cut(runs, off, L)

    def _offset(self, n: str, src: str, ax: int, L: int, runs: Runs) -> int | None:
        hits = self._hits().get(n)
        if hits is None or not hits[0] == ax:
            return None
        found = hits[1]
        if len(found) > 1:  # equal values (zero ids): the one on run boundaries, if unique
            starts = {0, *(_bounds(runs))}
            found = [o for o in found if o in starts and o + L in starts]
        return found[0] if len(found) == 1 else None

    def _hits(self) -> dict[str, tuple[int, list[int]]]:
        """For every piece of a slice or split in the graph that is shorter than its source along
        one axis other than the last: (that axis, the offsets where its probe values sit in the
        source's). All pieces are evaluated in one probe run, the first time any offset is asked
        for (a slice along the sequence is rare: joint attention splitting its streams)."""
        if self.hit_cache is not None:
            return self.hit_cache
        self.hit_cache = {}
        pieces = {}
        for n in self.g.nodes():
            if self.g.op(n) != "other":
                continue
            name, ins = base_name(self.g.attr(n, "native")), self.g.inputs_of(n)
            if name in _SLICE and ins:
                src = ins[0]
            elif name == "getitem" and ins and base_name(self.g.attr(ins[0], "native")) in _SPLIT \
                    and self.g.inputs_of(ins[0]):
                src = self.g.inputs_of(ins[0])[0]
            else:
                continue
            s, t = self._shape(src), self._shape(n)
            if s is None or t is None or len(s) != len(t):
                continue
            axes = [a for a in range(len(s)) if s[a] != t[a]]
            # a cut along the last axis is of channels or head dims (rope's halves), not tokens
            if len(axes) == 1 and axes[0] != len(s) - 1:
                pieces[n] = (src, axes[0])
        ev = self.g.evaluator
        if not pieces or ev is None:
            return self.hit_cache
        try:
            vals = ev.evaluate(sorted(set(pieces) | {src for src, _ in pieces.values()}))
        except Exception:  # noqa: BLE001 - no probe values: every offset stays unknown
            return self.hit_cache
        for n, (src, ax) in pieces.items():
            if n not in vals or src not in vals:
                continue
            out, inp = np.asarray(vals[n]), np.asarray(vals[src])
            if out.ndim != inp.ndim or out.ndim <= ax:
                continue
            L = out.shape[ax]
            self.hit_cache[n] = (ax, [o for o in range(inp.shape[ax] - L + 1) if np.array_equal(
                np.take(inp, range(o, o + L), axis=ax), out, equal_nan=True)])
        return self.hit_cache

    def _is_multi_split(self, ins: list[str]) -> bool:
        return bool(ins) and base_name(self.g.attr(ins[0], "native")) in _STOP

    def _broadcast(self, n: str, ax: int, shape: tuple[int, ...], ins) -> Runs | None:
        """Elementwise (numpy broadcasting): every operand whose right-aligned axis has the same
        length reaches the axis; their readings merge."""
        L, found = shape[ax], []
        for i in ins:
            s = self._shape(i)
            if s is None:
                continue
            j = ax - (len(shape) - len(s))
            if j < 0 or s[j] != L:
                continue
            found.append(self._runs(i, j))
        return merge(found)

    def _input_runs(self, n: str, ax: int, shape: tuple[int, ...]) -> Runs:
        L = shape[ax]
        ids = self._ids_grid(n, ax, shape)
        if ids is not None:
            return ids
        return (Run("tokens", (L,), n),)

    def _ids_grid(self, n: str, ax: int, shape: tuple[int, ...]) -> Runs | None:
        """Rotary position ids: [N, k] (or [B, N, k]) whose rows enumerate a grid row-major."""
        if len(shape) not in (2, 3) or ax != len(shape) - 2 or not 2 <= shape[-1] <= MAX_ID_COORDS:
            return None
        if n in self.ids_cache:
            return self.ids_cache[n]
        self.ids_cache[n] = None
        ev = self.g.evaluator
        try:
            v = None if ev is None else np.asarray(ev.evaluate([n]).get(n), dtype=np.float64)
        except Exception:  # noqa: BLE001 - no probe value: not read as ids
            v = None
        if v is None or v.shape != shape:
            return None
        if v.ndim == 3:
            if not np.array_equal(v, np.broadcast_to(v[:1], v.shape)):
                return None
            v = v[0]
        if not np.all(np.isfinite(v)) or not np.array_equal(v, np.round(v)):
            return None
        out = ids_layout(v, n)
        self.ids_cache[n] = out
        return out

    def _cat(self, n: str, ax: int, shape: tuple[int, ...]) -> Runs | None:
        ins = [i for i in self.g.inputs_of(n) if self._shape(i) is not None]
        shapes = [self._shape(i) for i in ins]
        if not ins or len(ins) != len(self.g.inputs_of(n)) or any(len(s) != len(shape) for s in shapes):
            return None
        cat_axes = [a for a in range(len(shape))
                    if sum(s[a] for s in shapes) == shape[a]
                    and all(s[b] == shape[b] for s in shapes for b in range(len(shape)) if b != a)]
        if len(cat_axes) != 1:
            return None
        if cat_axes[0] != ax:
            return merge([self._runs(i, ax) for i in ins])
        out: list[Run] = []
        for i, s in zip(ins, shapes):
            if s[ax] == 0:
                continue
            r = self._runs(i, ax)
            if r is None:  # known length, unknown structure: plain tokens
                r = (Run("tokens", (s[ax],), i),)
            out.extend(r)
        return tuple(out)

    def _stack(self, n: str, ax: int, shape: tuple[int, ...]) -> Runs | None:
        ins = self.g.inputs_of(n)
        s = self._shape(ins[0]) if ins else None
        if s is None or len(shape) != len(s) + 1:
            return None
        dims = [d for d in range(len(shape)) if shape[d] == len(ins) and shape[:d] + shape[d + 1:] == s]
        if not dims or any((ax == d) or (ax < d) != (ax < dims[0]) for d in dims):
            return None
        j = ax if ax < dims[0] else ax - 1
        return merge([self._runs(i, j) for i in ins])

    def _matmul(self, n: str, ax: int, shape: tuple[int, ...]) -> Runs | None:
        ins = self.g.inputs_of(n)
        a, b = (ins[1], ins[2]) if self.g.op(n) == "baddbmm" else (ins[0], ins[1])
        sa, sb = self._shape(a), self._shape(b)
        if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
            return None
        r = len(shape)
        if ax == r - 2:
            return self._runs(a, len(sa) - 2)
        if ax == r - 1:
            return self._runs(b, len(sb) - 1)
        found = []
        for x, s in ((a, sa), (b, sb)):
            j = ax - (r - len(s))
            if j >= 0 and s[j] == shape[ax]:
                found.append(self._runs(x, j))
        return merge(found)

    def _einsum(self, n: str, ax: int) -> Runs | None:
        eq = str(self.g.attr(n, "equation") or "").replace(" ", "")
        if "->" not in eq or "." in eq:
            return None
        lhs, out = eq.split("->")
        terms = lhs.split(",")
        if ax >= len(out) or len(terms) != len(self.g.inputs_of(n)):
            return None
        letter = out[ax]
        return merge([self._runs(i, t.index(letter)) for i, t in zip(self.g.inputs_of(n), terms)
                      if letter in t])

    def _reshape(self, n: str, ax: int, shape: tuple[int, ...]) -> Runs | None:
        src = self.g.inputs_of(n)[0]
        s = self._shape(src)
        if s is None or math.prod(s) != math.prod(shape):
            return None
        group = _reshape_group(s, shape, ax)
        if group is None:
            return None
        in_axes, out_axes = group
        big_in = [a for a in in_axes if s[a] > 1]
        big_out = [a for a in out_axes if shape[a] > 1]
        if big_out == [ax] and len(big_in) == 1:
            return self._runs(src, big_in[0])
        if big_out == [ax] and len(big_in) > 1:  # a merge: the axes' grids multiply out
            dims: list[int] = []
            for a in big_in:
                r = self._runs(src, a)
                if r is None:
                    dims.append(s[a])
                elif len(r) == 1 and r[0].kind in ("grid", "tokens"):
                    dims.extend(r[0].dims)
                else:  # a concatenation merged with another axis: no row-major grid
                    return None
            return (Run("grid", tuple(dims), n),)
        if len(big_in) == 1 and len(big_out) > 1:
            # a split: this axis is one factor of the source axis (frames out of batch*frames)
            r = self._runs(src, big_in[0])
            if r is not None and len(r) == 1 and r[0].kind == "grid":
                return _grid_factor(r[0], s[big_in[0]], [shape[a] for a in big_out],
                                    big_out.index(ax), n)
            return (Run("tokens", (shape[ax],), n),)
        return None


def cut(runs: Runs, off: int, length: int) -> Runs | None:
    """The runs covering tokens [off, off + length): plain tokens may be cut anywhere, a grid
    only whole (or by whole leading rows)."""
    out, start = [], 0
    for r in runs:
        a, b = max(off, start), min(off + length, start + r.length)
        if a < b:
            if a == start and b == start + r.length:
                out.append(r)
            elif r.kind == "tokens":
                out.append(Run("tokens", (b - a,), r.source))
            else:  # part of a grid: no row-major grid is left (reported, not guessed)
                out.append(Run("cut", (b - a,), f"{r.source}: {b - a} of its "
                               f"{'x'.join(map(str, r.dims))} grid's {r.length} tokens"))
        start += r.length
    return tuple(out)


def _grid_factor(run: Run, total: int, parts: list[int], k: int, n: str) -> Runs | None:
    """The k-th factor of a grid axis split into `parts`, when the split follows grid dims."""
    dims, acc, i = list(run.dims), [], 0
    for p in parts:
        take, prod = [], 1
        while prod < p and i < len(dims):
            prod *= dims[i]
            take.append(dims[i])
            i += 1
        if prod != p:
            return None
        acc.append(tuple(take))
    return (Run("grid" if len(acc[k]) > 1 else "tokens", acc[k], n),)


def _reshape_group(s: tuple[int, ...], t: tuple[int, ...], ax: int):
    """The group of source axes and target axes (equal products, minimal) holding target `ax`."""
    i = j = 0
    while i < len(s) or j < len(t):
        gi, gj = [i] if i < len(s) else [], [j] if j < len(t) else []
        pi = s[i] if i < len(s) else 1
        pj = t[j] if j < len(t) else 1
        i, j = i + (i < len(s)), j + (j < len(t))
        while pi != pj:
            if pi < pj and i < len(s):
                pi *= s[i]
                gi.append(i)
                i += 1
            elif pj < pi and j < len(t):
                pj *= t[j]
                gj.append(j)
                j += 1
            else:
                return None
        # trailing size-1 axes stay with the group they follow
        if ax in gj:
            return gi, gj
    return None


def ids_layout(v: np.ndarray, source: str) -> Runs | None:
    """[N, k] integral position ids -> one grid run (the varying coordinates, row-major) or one
    run of plain tokens (no coordinate varies: Flux's all-zero txt_ids)."""
    n = v.shape[0]
    varying = [c for c in range(v.shape[1]) if np.unique(v[:, c]).size > 1]
    if not varying:
        return (Run("tokens", (n,), source),)
    sizes = tuple(int(np.unique(v[:, c]).size) for c in varying)
    if math.prod(sizes) != n or len(sizes) < 2:
        return None
    axes = [np.unique(v[:, c]) for c in varying]
    mesh = np.stack([m.reshape(-1) for m in np.meshgrid(*axes, indexing="ij")], axis=1)
    if not np.array_equal(v[:, varying], mesh):
        return None
    return (Run("grid", sizes, source),)


def merge(readings: list[Runs | None]) -> Runs | None:
    """Several readings of one axis: the finest partition any reading proves, each position taking
    the most informative run (a grid over plain tokens); readings that contradict give None."""
    known = [r for r in readings if r is not None]
    if not known:
        return None
    best = known[0]
    for r in known[1:]:
        best = _merge2(best, r)
        if best is None:
            return None
    return best


# which reading of one run wins a merge: a proven problem, then a grid, then plain tokens
_RANK = {"conflict": 3, "cut": 2, "grid": 1, "tokens": 0}


def _bounds(r: Runs) -> list[int]:
    out, acc = [], 0
    for x in r:
        acc += x.length
        out.append(acc)
    return out


def _merge2(a: Runs, b: Runs) -> Runs | None:
    if sum(x.length for x in a) != sum(x.length for x in b):
        return None
    ba, bb = _bounds(a), _bounds(b)
    if ba == bb:
        out = []
        for x, y in zip(a, b):
            if x.kind == "grid" and y.kind == "grid" and _squeeze(x.dims) != _squeeze(y.dims):
                out.append(Run("conflict", (x.length,), f"{x.source} reads a "
                               f"{'x'.join(map(str, _squeeze(x.dims)))} grid, {y.source} a "
                               f"{'x'.join(map(str, _squeeze(y.dims)))} grid"))
                continue
            out.append(max((x, y), key=lambda r: _RANK[r.kind]))
        return tuple(out)
    # one refines the other where the coarser runs are plain tokens
    fine, coarse = (a, b) if set(ba) > set(bb) else (b, a) if set(bb) > set(ba) else (None, None)
    if fine is None:
        return None
    fb = _bounds(fine)
    start = 0
    for c in coarse:
        end = start + c.length
        inner = [x for x, e in zip(fine, fb) if start < e <= end]
        if len(inner) > 1 and c.kind != "tokens":
            return None
        start = end
    return fine


def _squeeze(dims: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in dims if d > 1)

