"""GNA tile simulator: which KV tiles each Q tile of a block-sparse kernel must visit.

Conventions:
  * Grid coordinates are *permuted* per dimension so that each dilation group is contiguous
    (`gna.dilation_permutation`, group 0 first, as NATTEN does). Tiles are laid on that order;
    with dilation 1 it is the identity. Only there is a query's key set contiguous, which a
    kernel needs to load KV tiles at all.
  * Tiling "box": q_tile and kv_tile have one entry per grid dimension; a tile is a box of the
    (permuted) grid, tiles start at multiples of the tile shape, the last ones are clipped to the
    grid. Tiling "run": both tiles are 1-D (n,) on a multi-D grid; a tile is a run of n tokens of
    the row-major flattened (permuted) grid.
  * Static KV tiling: KV tiles are fixed (aligned to multiples of kv_tile). Dynamic KV tiling:
    per Q tile the KV tiles start at the first key that Q tile needs (per dimension for boxes,
    flattened for runs); they are clipped only at the grid end.
  * A visited tile is a (Q tile, KV tile) pair with at least one attending (q, k) pair; it is
    "full" when every pair of real tokens in it attends, else "masked" (needs an element mask).
    Padding of tiles clipped at the grid end is not counted as masking.
  * Global tokens (`leading` before the grid, `trailing` after it: [CLS], joint text tokens) are
    kept out of the grid's tiles (the permutation only moves grid tokens): each kind is its own
    run of KV blocks, which every grid Q tile visits whole (full tiles; under a causal layout no
    grid query sees a trailing key, so none are visited), and its queries are their own Q tiles
    of dense rows (every key; causal: every key j <= i). The worst Q tile and the speedup bound
    are over the grid's Q tiles (global rows are dense by definition); totals, FLOP bound and
    density count everything.
  * Per-Q-tile fixed cost (`q_tile_cost`, in steps of one KV tile of the same tiles; the cost
    model converts a device's seconds: `cost.hardware.q_tile_cost_steps`): every Q tile's program
    pays it once (Q load, pipeline fill, normalizing and storing O), so the bound is
    (full_kv_tiles + c) / (max_kv_tiles + c); c = 0 is the tile-count bound.
Everything for box tiling is separable per dimension (the mask is a product over dimensions),
so a 256x256 layout is simulated in O(L) work; run tiling is exact via box decomposition.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from attnopt.sparsity import gna
from attnopt.ir import GNALayout


def amdahl(speedup: float, share: float) -> float:
    """End-to-end speedup when only `share` of the runtime (attention) gets `speedup`."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"attention share must be in [0, 1], got {share}")
    return 1.0 / ((1.0 - share) + share / speedup)


@dataclass(frozen=True)
class SimResult:
    """What a tile-level kernel pays for one GNA layout (per batch and head)."""

    shape: tuple[int, ...]
    window: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    tiling: str                 # "box" | "run"
    dynamic_kv: bool
    num_q_tiles: int
    full_kv_tiles: int          # KV tiles one Q tile visits under full self-attention
    max_kv_tiles: int           # worst Q tile
    mean_kv_tiles: float
    total_kv_tiles: int         # visited (Q tile, KV tile) pairs, summed over Q tiles
    masked_tiles: int           # visited pairs that need an element mask
    fully_block_sparse: bool    # no visited tile is masked
    speedup_upper_bound: float  # (full_kv_tiles + q_tile_cost) / (max_kv_tiles + q_tile_cost)
    flop_speedup: float         # prod(L) / prod(w)
    density: float              # exact fraction of attending pairs
    worst_q_tile: tuple[int, ...]  # tile coordinates (box) or (run index,)
    attn_share: float | None = None
    e2e_speedup: float | None = None
    # per-Q-tile maps (box: grid of tile coords; run: 1-D), kept out of equality and JSON
    kv_tiles_per_q: np.ndarray = field(default=None, compare=False, repr=False)
    masked_per_q: np.ndarray = field(default=None, compare=False, repr=False)
    leading: int = 0            # global tokens before the grid
    trailing: int = 0           # global tokens after the grid
    global_q_tiles: int = 0     # Q tiles of global queries (counted in num_q_tiles)
    q_tile_cost: float = 0.0    # fixed cost per Q tile, in KV tile steps (module header)

    @property
    def dense_visited_fraction(self) -> float:
        return self.total_kv_tiles / (self.num_q_tiles * self.full_kv_tiles)

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in (
            "shape", "window", "stride", "dilation", "causal", "q_tile", "kv_tile", "tiling",
            "dynamic_kv", "num_q_tiles", "full_kv_tiles", "max_kv_tiles", "mean_kv_tiles",
            "total_kv_tiles", "masked_tiles", "fully_block_sparse", "speedup_upper_bound",
            "flop_speedup", "density", "worst_q_tile", "attn_share", "e2e_speedup")}
        if self.leading or self.trailing:  # keys of layouts without globals stay as they were
            d.update(leading=self.leading, trailing=self.trailing, global_q_tiles=self.global_q_tiles)
        if self.q_tile_cost:
            d["q_tile_cost"] = self.q_tile_cost
        out = json.loads(json.dumps(d, default=_jsonable))
        return out


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x))


# ---- per-dimension (box tiling) ------------------------------------------------------------

@dataclass(frozen=True)
class DimTiles:
    """One dimension of box tiling: per Q tile index, the KV tiles it visits and how many are full."""

    first_kv: np.ndarray   # first visited KV tile start (token position)
    visited: np.ndarray    # KV tiles visited
    full: np.ndarray       # of which full
    num_kv_tiles: int      # full self-attention


def _cdiv(a, b):
    return -((-a) // b)


def dim_tiles(ws: np.ndarray, we: np.ndarray, tq: int, tk: int, dynamic: bool) -> DimTiles:
    """ws/we: per permuted position, key range [ws, we) (non-decreasing, see gna)."""
    L = len(ws)
    f = np.arange(0, L, tq, dtype=np.int64)
    l = np.minimum(f + tq, L) - 1
    # windows are monotone, so a Q tile's union of key ranges is [ws(first), we(last)) and
    # the keys every query of it sees are [ws(last), we(first)).
    need_lo, need_hi = ws[f], we[l]
    inter_lo, inter_hi = ws[l], we[f]
    ntk = _cdiv(L, tk)
    if dynamic:
        visited = _cdiv(need_hi - need_lo, tk)
        kmin = _cdiv(np.maximum(inter_lo - need_lo, 0), tk)
        kmax = np.where(inter_hi >= L, visited - 1, (inter_hi - need_lo) // tk - 1)
        first = need_lo
    else:
        t0 = need_lo // tk
        visited = (need_hi - 1) // tk - t0 + 1
        kmin = _cdiv(inter_lo, tk)
        kmax = np.where(inter_hi >= L, ntk - 1, inter_hi // tk - 1)
        first = t0 * tk
    full = np.maximum(kmax - kmin + 1, 0)
    return DimTiles(first, visited, full, int(ntk))


def _outer(vectors: Sequence[np.ndarray]) -> np.ndarray:
    out = np.ones((), dtype=np.int64)
    for v in vectors:
        out = np.multiply.outer(out, v)
    return out


# ---- run tiling on a multi-D grid ----------------------------------------------------------

def _strides(shape: Sequence[int]) -> list[int]:
    return [int(np.prod(shape[d + 1:], dtype=np.int64)) for d in range(len(shape))]


def _coords(x: np.ndarray, shape: Sequence[int], strides: Sequence[int]) -> np.ndarray:
    return np.stack([(x // s) % L for s, L in zip(strides, shape)], axis=-1)


def run_boxes(a: np.ndarray, b: np.ndarray, shape: Sequence[int]):
    """Decompose flattened runs [a, b) into <= 2n-1 grid boxes each.

    Returns (run_id, lo, hi) with inclusive per-dimension corners lo/hi of shape [boxes, ndim].
    """
    n = len(shape)
    S = _strides(shape)
    cur = a.astype(np.int64).copy()
    b = b.astype(np.int64)
    pieces = []

    def emit(nxt):
        sel = nxt > cur
        pieces.append((np.nonzero(sel)[0], cur[sel], nxt[sel]))

    # climb: finish the partial innermost row, then partial planes, ...
    for k in range(n - 1, 0, -1):
        nxt = np.minimum(_cdiv(cur, S[k - 1]) * S[k - 1], (b // S[k]) * S[k])
        nxt = np.maximum(nxt, cur)
        emit(nxt)
        cur = nxt
    nxt = np.maximum(cur, (b // S[0]) * S[0])
    emit(nxt)
    cur = nxt
    # descend: whole planes, whole rows, then the final partial row
    for k in range(1, n):
        nxt = np.maximum(cur, (b // S[k]) * S[k])
        emit(nxt)
        cur = nxt
    ids = np.concatenate([p[0] for p in pieces])
    lo = _coords(np.concatenate([p[1] for p in pieces]), shape, S)
    hi = _coords(np.concatenate([p[2] for p in pieces]) - 1, shape, S)
    return ids, lo, hi


def run_hull(a: np.ndarray, b: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per dimension, min and max coordinate over the run [a, b) (b > a). Shapes [..., ndim]."""
    S = _strides(shape)
    lo, hi = [], []
    for s, L in zip(S, shape):
        A, B = a // s, (b - 1) // s
        wrap = (B - A + 1 >= L) | (A % L > B % L)
        lo.append(np.where(wrap, 0, A % L))
        hi.append(np.where(wrap, L - 1, B % L))
    return np.stack(lo, -1), np.stack(hi, -1)


# Bound the [Q tiles, KV tiles] work matrices of run tiling (int32 cells).
_RUN_CHUNK_CELLS = 1 << 22


def _simulate_runs(ranges, shape, tq: int, tk: int, dynamic: bool):
    """Exact run tiling. Returns (visited [nq], masked [nq], n_kv_full, visited matrix fn)."""
    n = len(shape)
    N = int(np.prod(shape))
    S = _strides(shape)
    nq = _cdiv(N, tq)
    nkv = _cdiv(N, tk)
    qa = np.arange(nq, dtype=np.int64) * tq
    qb = np.minimum(qa + tq, N)
    ids, lo, hi = run_boxes(qa, qb, shape)
    ws = [r[0] for r in ranges]
    we = [r[1] for r in ranges]
    klo = np.stack([ws[d][lo[:, d]] for d in range(n)], -1)
    khi = np.stack([we[d][hi[:, d]] for d in range(n)], -1)  # exclusive
    kstart_flat = (klo * np.asarray(S)).sum(-1)
    off = np.full(nq, N, dtype=np.int64)
    np.minimum.at(off, ids, kstart_flat)
    if not dynamic:
        off[:] = 0
    # row segments of each key box: fix every dimension but the last
    ext = khi[:, :-1] - klo[:, :-1]
    cnt = np.prod(ext, axis=1)
    seg_box = np.repeat(np.arange(len(ids)), cnt)
    r = np.arange(int(cnt.sum()), dtype=np.int64) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    flat = np.zeros_like(r)
    for d in range(n - 2, -1, -1):
        e = ext[seg_box, d]
        flat += (klo[seg_box, d] + r % e) * S[d]
        r //= e
    seg_lo = flat + klo[seg_box, -1]
    seg_hi = flat + khi[seg_box, -1]
    seg_q = ids[seg_box]
    t0 = (seg_lo - off[seg_q]) // tk
    t1 = (seg_hi - 1 - off[seg_q]) // tk
    # Q hulls -> keys every query of the tile sees, per dimension
    qh_lo, qh_hi = run_hull(qa, qb, shape)
    inter_lo = np.stack([ws[d][qh_hi[:, d]] for d in range(n)], -1)
    inter_hi = np.stack([we[d][qh_lo[:, d]] for d in range(n)], -1)

    visited_cnt = np.zeros(nq, np.int64)
    masked_cnt = np.zeros(nq, np.int64)
    order = np.argsort(seg_q, kind="stable")
    seg_q, t0, t1 = seg_q[order], t0[order], t1[order]
    bounds = np.searchsorted(seg_q, np.arange(nq + 1))
    width = nkv + 1
    step = max(1, _RUN_CHUNK_CELLS // width)
    ka0 = np.arange(nkv, dtype=np.int64) * tk
    static_lo, static_hi = run_hull(ka0, np.minimum(ka0 + tk, N), shape)
    for c0 in range(0, nq, step):
        c1 = min(nq, c0 + step)
        s0, s1 = bounds[c0], bounds[c1]
        rows = seg_q[s0:s1] - c0
        diff = np.bincount(rows * width + t0[s0:s1], minlength=(c1 - c0) * width)
        diff -= np.bincount(rows * width + t1[s0:s1] + 1, minlength=(c1 - c0) * width)
        vis = np.cumsum(diff.reshape(c1 - c0, width)[:, :nkv], axis=1) > 0
        qi, ki = np.nonzero(vis)  # fullness only matters for visited pairs
        if dynamic:
            ka = off[c0 + qi] + ki * tk
            kh_lo, kh_hi = run_hull(ka, np.minimum(ka + tk, N), shape)
        else:
            kh_lo, kh_hi = static_lo[ki], static_hi[ki]
        full = np.all((inter_lo[c0 + qi] <= kh_lo) & (kh_hi < inter_hi[c0 + qi]), axis=-1)
        visited_cnt[c0:c1] = vis.sum(1)
        masked_cnt[c0:c1] = np.bincount(qi[~full], minlength=c1 - c0)
    return visited_cnt, masked_cnt, nkv


# ---- public --------------------------------------------------------------------------------

def _check_tiles(layout: GNALayout, q_tile, kv_tile) -> str:
    q_tile, kv_tile = tuple(q_tile), tuple(kv_tile)
    n = len(layout.shape)
    for name, t in (("q_tile", q_tile), ("kv_tile", kv_tile)):
        if not t or any((not isinstance(x, (int, np.integer))) or x < 1 for x in t):
            raise ValueError(f"{name} entries must be positive ints, got {t}")
    if len(q_tile) == n and len(kv_tile) == n:
        return "box"
    if len(q_tile) == 1 and len(kv_tile) == 1:
        return "run"
    raise ValueError(f"q_tile {q_tile} and kv_tile {kv_tile} must both have {n} entries (boxes) "
                     f"or both have 1 entry (runs of the flattened grid)")


MAX_Q_TILES = 1 << 24


def _q_tile_count(shape: Sequence[int], q_tile: Sequence[int], tiling: str) -> int:
    if tiling == "box":
        return int(np.prod([-(-int(n) // t) for n, t in zip(shape, q_tile)], dtype=object))
    return -(-int(np.prod(shape, dtype=object)) // q_tile[0])


def simulate(layout: GNALayout, q_tile: Sequence[int], kv_tile: Sequence[int], *,
             dynamic: bool = False, attn_share: float | None = None, leading: int = 0,
             trailing: int = 0, q_tile_cost: float = 0.0) -> SimResult:
    """Simulate a block-sparse GNA kernel: tile counts, masking, and speedup bounds (with
    `leading` / `trailing` global tokens around the grid and a per-Q-tile fixed cost
    `q_tile_cost`: see the module header)."""
    gna.validate(layout)
    q_tile_cost = float(q_tile_cost)
    if not 0.0 <= q_tile_cost < float("inf"):
        raise ValueError(f"q_tile_cost must be a finite number >= 0, got {q_tile_cost}")
    leading, trailing = int(leading), int(trailing)
    if leading < 0 or trailing < 0:
        raise ValueError(f"leading {leading} / trailing {trailing} must be >= 0")
    tiling = _check_tiles(layout, q_tile, kv_tile)
    q_tile, kv_tile = tuple(int(x) for x in q_tile), tuple(int(x) for x in kv_tile)
    n_q = _q_tile_count(layout.shape, q_tile, tiling)
    if n_q > MAX_Q_TILES:
        # the maps below hold one entry per Q tile; past this they no longer fit in memory
        raise ValueError(f"layout {'x'.join(map(str, layout.shape))} with Q tile "
                         f"{'x'.join(map(str, q_tile))} has {n_q:.3g} Q tiles, more than the "
                         f"simulator handles ({MAX_Q_TILES:.3g}); use larger tiles")
    ranges = gna.permuted_key_ranges(layout)
    if tiling == "box":
        dims = [dim_tiles(ws, we, tq, tk, dynamic)
                for (ws, we), tq, tk in zip(ranges, q_tile, kv_tile)]
        vis_map = _outer([d.visited for d in dims])
        masked_map = vis_map - _outer([d.full for d in dims])
        n_full = int(np.prod([d.num_kv_tiles for d in dims]))
        worst = tuple(int(np.argmax(d.visited)) for d in dims)
    else:
        vis_map, masked_map, n_full = _simulate_runs(ranges, layout.shape, q_tile[0],
                                                     kv_tile[0], dynamic)
        worst = (int(np.argmax(vis_map)),)
    flop_speedup = float(np.prod(layout.shape, dtype=np.float64) / np.prod(layout.window, dtype=np.float64))
    density = gna.density(layout)
    g_q = 0
    total_extra = masked_extra = 0
    if leading or trailing:
        causal = any(layout.causal)
        tq = int(np.prod(q_tile)) if tiling == "box" else q_tile[0]
        tk = int(np.prod(kv_tile)) if tiling == "box" else kv_tile[0]
        trail_seen = 0 if causal else trailing          # trailing keys a grid query attends
        g_k = _cdiv(leading, tk) + _cdiv(trail_seen, tk)  # global KV blocks per grid Q tile
        vis_map = vis_map + g_k
        n_full += _cdiv(leading, tk) + _cdiv(trailing, tk)
        g_q = _cdiv(leading, tq) + _cdiv(trailing, tq)
        if causal:  # leading rows see the leading block(s); trailing rows everything up to them
            total_extra = _cdiv(leading, tq) * _cdiv(leading, tk) + _cdiv(trailing, tq) * n_full
            masked_extra = g_q  # one diagonal block per global Q tile
        else:
            total_extra = g_q * n_full
        n = float(np.prod(layout.shape, dtype=np.float64))
        S = leading + n + trailing
        if causal:  # a global row at position p sees p + 1 keys
            g_pairs = leading * (leading + 1) / 2 + trailing * (leading + n) + trailing * (trailing + 1) / 2
        else:
            g_pairs = (leading + trailing) * S
        grid_pairs = density * n * n
        pairs = grid_pairs + n * (leading + trail_seen) + g_pairs
        density = float(pairs / (S * S))
        lay_pairs = n * float(np.prod(layout.window, dtype=np.float64))  # the FLOP bound's own count
        flop_speedup = float(S * S / (lay_pairs + n * (leading + trail_seen) + (leading + trailing) * S))
    max_kv = int(vis_map.max())
    total = int(vis_map.sum()) + total_extra
    masked = int(masked_map.sum()) + masked_extra
    speedup = (n_full + q_tile_cost) / (max_kv + q_tile_cost)
    e2e = None if attn_share is None else amdahl(speedup, attn_share)
    return SimResult(
        shape=tuple(layout.shape), window=tuple(layout.window), stride=tuple(layout.stride),
        dilation=tuple(layout.dilation), causal=tuple(bool(c) for c in layout.causal),
        q_tile=q_tile, kv_tile=kv_tile, tiling=tiling, dynamic_kv=bool(dynamic),
        num_q_tiles=int(vis_map.size) + g_q, full_kv_tiles=n_full, max_kv_tiles=max_kv,
        mean_kv_tiles=total / (vis_map.size + g_q), total_kv_tiles=total, masked_tiles=masked,
        fully_block_sparse=masked == 0, speedup_upper_bound=speedup,
        flop_speedup=flop_speedup, density=density, worst_q_tile=worst, attn_share=attn_share,
        e2e_speedup=e2e, kv_tiles_per_q=vis_map, masked_per_q=masked_map,
        leading=leading, trailing=trailing, global_q_tiles=g_q, q_tile_cost=q_tile_cost)


@dataclass(frozen=True)
class TileDetail:
    """The KV tiles one Q tile visits, in permuted grid coordinates (box tiling).

    q_lo/q_hi and kv_lo/kv_hi are half-open per-dimension corners; kv arrays are [tiles, ndim].
    """

    q_lo: tuple[int, ...]
    q_hi: tuple[int, ...]
    kv_lo: np.ndarray
    kv_hi: np.ndarray
    full: np.ndarray


def tile_detail(layout: GNALayout, q_tile: Sequence[int], kv_tile: Sequence[int],
                q_index: Sequence[int], *, dynamic: bool = False) -> TileDetail:
    """Visited KV tiles of the Q tile at tile coordinates `q_index` (box tiling), with full flags."""
    if _check_tiles(layout, q_tile, kv_tile) != "box":
        raise ValueError("tile_detail needs box tiles (one entry per grid dimension)")
    ranges = gna.permuted_key_ranges(layout)
    per_dim_lo, per_dim_hi, per_dim_full = [], [], []
    q_lo, q_hi = [], []
    for (ws, we), tq, tk, qi, L in zip(ranges, q_tile, kv_tile, q_index, layout.shape):
        d = dim_tiles(ws, we, tq, tk, dynamic)
        f, l = qi * tq, min(qi * tq + tq, L) - 1
        q_lo.append(f)
        q_hi.append(l + 1)
        starts = d.first_kv[qi] + np.arange(d.visited[qi]) * tk
        ends = np.minimum(starts + tk, L)
        per_dim_lo.append(starts)
        per_dim_hi.append(ends)
        per_dim_full.append((starts >= ws[l]) & (ends <= we[f]))
    grids = np.meshgrid(*[np.arange(len(x)) for x in per_dim_lo], indexing="ij")
    idx = [g.reshape(-1) for g in grids]
    kv_lo = np.stack([per_dim_lo[d][idx[d]] for d in range(len(idx))], -1)
    kv_hi = np.stack([per_dim_hi[d][idx[d]] for d in range(len(idx))], -1)
    full = np.all(np.stack([per_dim_full[d][idx[d]] for d in range(len(idx))], -1), -1)
    return TileDetail(tuple(q_lo), tuple(q_hi), kv_lo, kv_hi, full)
