"""Search GNA strides and tile shapes for the best simulated speedup bound.

Conventions: box tiling only (one tile entry per grid dimension, from the hardware's literal
tile table, `hardware.TILE_TABLES`); for a 1-D grid those are the 1-D tiles. Because the GNA
mask and box tiles are products over dimensions, the worst Q tile's KV tile count is the
product of per-dimension maxima and a layout is perfectly block-sparse iff every dimension is,
so each (dimension, window, stride, tile) is simulated once and combined by outer products.
With a hardware profile, the bound counts its per-Q-tile fixed cost (`q_tile_cost_steps`: a
tile pair of few KV tiles per Q tile gains less than its tile count says), per tile pair.
Pareto set: maximize speedup, maximize window volume prod(w) (more context), minimize stride
volume prod(s) (closer to sliding-window attention).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from attnopt.sparsity import gna
from attnopt.cost.hardware import HardwareProfile, allowed_tiles, q_tile_cost_steps
from attnopt.sparsity.simulator import dim_tiles
from attnopt.ir import GNALayout


@dataclass(frozen=True)
class SearchPoint:
    window: tuple[int, ...]
    stride: tuple[int, ...]
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    speedup_upper_bound: float
    flop_speedup: float
    fully_block_sparse: bool
    masked_tiles: int

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class SearchResult:
    shape: tuple[int, ...]
    best: SearchPoint | None       # None when nothing satisfies the constraints
    pareto: tuple[SearchPoint, ...]
    evaluated: int                 # (window, stride, q tile, kv tile) combinations

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "evaluated": self.evaluated,
                "best": None if self.best is None else self.best.to_json(),
                "pareto": [p.to_json() for p in self.pareto]}


def _dim_stats(L, w, s, d, causal, tq, tk, dynamic, cache):
    key = (L, w, s, d, causal, tq, tk, dynamic)
    if key not in cache:
        ws, we = gna.permuted_key_ranges(GNALayout((L,), (w,), (s,), (d,), (causal,)))[0]
        t = dim_tiles(ws, we, tq, tk, dynamic)
        cache[key] = (int(t.visited.max()), t.num_kv_tiles, bool((t.visited == t.full).all()),
                      int(t.visited.sum()), int(t.full.sum()))
    return cache[key]


def search(shape: Sequence[int], window: Sequence[int] | Iterable[Sequence[int]], *,
           hw: HardwareProfile | None = None,
           tiles: tuple[Sequence[Sequence[int]], Sequence[Sequence[int]]] | None = None,
           dilation: Sequence[int] | None = None, causal: Sequence[bool] | None = None,
           strides: Sequence[Sequence[int]] | None = None, require_block_sparse: bool = False,
           dynamic: bool = False, head_dim: int = 128) -> SearchResult:
    """Find stride and (q, kv) tile shapes maximizing the simulated bound.

    window: one window tuple, or several (the Pareto set then spans windows too).
    tiles: explicit (q tiles, kv tiles); else the hardware's table for this dimensionality.
    strides: per-dimension candidate strides; default every 1..w.
    head_dim: for hw's per-Q-tile fixed cost in tile steps (none without hw).
    """
    shape = tuple(int(x) for x in shape)
    n = len(shape)
    windows = [tuple(window)] if np.ndim(window) == 1 else [tuple(w) for w in window]
    dilation = tuple(dilation) if dilation else (1,) * n
    causal = tuple(bool(c) for c in causal) if causal else (False,) * n
    if tiles is None:
        if hw is None:
            raise ValueError("search needs hw (for its tile table) or explicit tiles")
        tiles = allowed_tiles(hw, n)
    q_tiles = [tuple(t) for t in tiles[0]]
    kv_tiles = [tuple(t) for t in tiles[1]]
    for t in q_tiles + kv_tiles:
        if len(t) != n:
            raise ValueError(f"tile {t} does not match the {n}-D shape {shape}")
    cache: dict = {}
    best: SearchPoint | None = None
    candidates: list[SearchPoint] = []
    evaluated = 0
    for w in windows:
        if len(w) != n:
            raise ValueError(f"window {w} does not match the {n}-D shape {shape}")
        gna.validate(GNALayout(shape, w, (1,) * n, dilation, causal))
        cand_s = [list(strides[d]) if strides else list(range(1, w[d] + 1)) for d in range(n)]
        for d in range(n):
            bad = [s for s in cand_s[d] if not 1 <= s <= w[d]]
            if bad:
                raise ValueError(f"dim {d}: strides {bad} outside 1..{w[d]}")
        flop = float(np.prod(shape, dtype=np.float64) / np.prod(w, dtype=np.float64))
        # every tile pair at once; per stride combination keep the best pair
        pairs = list(itertools.product(q_tiles, kv_tiles))
        speeds, perfects, masked = [], [], []
        for qt, kt in pairs:
            per_dim = [[_dim_stats(shape[d], w[d], s, dilation[d], causal[d], qt[d], kt[d],
                                   dynamic, cache) for s in cand_s[d]] for d in range(n)]
            mx = _outer_prod([np.array([p[0] for p in pd], float) for pd in per_dim])
            ntk = float(np.prod([pd[0][1] for pd in per_dim]))
            c = 0.0 if hw is None else q_tile_cost_steps(hw, math.prod(qt), math.prod(kt), head_dim)
            speeds.append((ntk + c) / (mx + c))
            perfects.append(_outer_all([np.array([p[2] for p in pd]) for pd in per_dim]))
            masked.append(_outer_prod([np.array([p[3] for p in pd], float) for pd in per_dim]) -
                          _outer_prod([np.array([p[4] for p in pd], float) for pd in per_dim]))
        speed, perfect, masked = np.stack(speeds), np.stack(perfects), np.stack(masked)
        evaluated += speed.size
        score = np.where(perfect | (not require_block_sparse), speed, -np.inf)
        arg = np.argmax(score, axis=0)  # first (table order) among equals
        top = np.take_along_axis(score, arg[None], 0)[0]
        for idx in zip(*np.nonzero(np.isfinite(top))):
            k = arg[idx]
            s = tuple(cand_s[d][idx[d]] for d in range(n))
            p = SearchPoint(w, s, pairs[k][0], pairs[k][1], float(speed[(k,) + idx]), flop,
                            bool(perfect[(k,) + idx]), int(round(masked[(k,) + idx])))
            candidates.append(p)
            if best is None or (p.speedup_upper_bound, -math.prod(p.stride)) > \
                    (best.speedup_upper_bound, -math.prod(best.stride)):
                best = p
    return SearchResult(shape, best, tuple(pareto(candidates)), evaluated)


def _outer_prod(vs):
    out = np.ones(())
    for v in vs:
        out = np.multiply.outer(out, v)
    return out


def _outer_all(vs):
    out = np.ones((), bool)
    for v in vs:
        out = np.logical_and.outer(out, v)
    return out


def pareto(points: Sequence[SearchPoint]) -> list[SearchPoint]:
    """Non-dominated points: higher speedup, larger prod(window), smaller prod(stride)."""
    def key(p):
        return (p.speedup_upper_bound, float(math.prod(p.window)), -float(math.prod(p.stride)))

    # only the best speedup per (window volume, stride volume) can be on the front
    reduced: dict[tuple[float, float], SearchPoint] = {}
    for p in points:
        k = key(p)
        cur = reduced.get(k[1:])
        if cur is None or k[0] > cur.speedup_upper_bound:
            reduced[k[1:]] = p
    # sweep from the fastest: a point is dominated iff an earlier one has a window at least as
    # large and a stride volume at most as large ((wv, sv) are unique after the reduction)
    order = sorted(reduced.values(), key=lambda p: (-key(p)[0], -key(p)[1], -key(p)[2]))
    min_sv: dict[float, float] = {}
    front = []
    for p in order:
        _, wv, neg_sv = key(p)
        sv = -neg_sv
        if not any(v <= sv for w, v in min_sv.items() if w >= wv):
            front.append(p)
        min_sv[wv] = min(min_sv.get(wv, float("inf")), sv)
    return sorted(front, key=lambda p: (math.prod(p.window), math.prod(p.stride)))
