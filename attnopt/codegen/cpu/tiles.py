"""Exact CPU kernels for the sparse variants: GNA layouts (1-D/2-D/3-D, stride, dilation, causal) and
1-D sliding windows.

Canonical layouts (as attnopt::attention):
  q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv], attn_mask broadcastable to
  [B, H, Sq, Skv] (bool: True = attend; float: added), out [B, H, Sq, Dv] in q.dtype.
  For a GNA layout Sq = Skv = prod(layout.shape), tokens flattened row-major over the grid.

How: queries are cut into tiles (boxes of the dilation-permuted grid, so a query's keys are a
contiguous box; runs of the sequence for 1-D windows). Each Q tile gathers the smallest KV box that
covers the keys of all its queries (dynamic KV tiling, one common box size per layout so every tile
batches into one call). Tiles whose queries all attend their whole box run dense SDPA without a
mask; the others (partial tiles) carry the exact element mask. Tiles at the grid end are shifted
inward instead of padded, so no token is ever padding; they overlap a neighbour, and each query's
row is written by one tile only, its owner (the first tile holding it). One writer per row keeps
the gradients exact: a row scattered twice by one index_copy_ sends its gradient back through both
tiles (a 12x10 grid with window 5 had dQ/dK/dV off by 50-100% of the largest gradient).
Work per tile = the simulator's bound for dynamic KV tiling with 1-token KV tiles:
`simulate(layout, q_tile, (1,)*ndim, dynamic=True)`.
"""
from __future__ import annotations

import functools
import math
import platform
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from attnopt.codegen import autotune
from attnopt.codegen.cpu import native as cpu_native
from attnopt.codegen.gna_op import leading_rows
from attnopt.codegen.ops import AttentionParams
from attnopt.codegen.reference import alignment_offset, reference_attention
from attnopt.sparsity import gna
from attnopt.cost.hardware import TILE_TABLES, best_time
from attnopt.ir import GNALayout

# Per-tile fixed cost in units of (query x key) score elements, to weigh many small tiles
# against fewer larger ones when choosing a Q tile (rough fit on a 2-core EPYC, fp32: SDPA on
# 16-query tiles costs ~5x its FLOPs, 64-query tiles ~1.6x, 128-query tiles ~1.1x).
TILE_OVERHEAD_ELEMS = 32768
# A partial tile reads an additive mask as large as its scores.
MASKED_TILE_FACTOR = 1.3
# The compiled kernel (cpu_native): scores are computed for queries in panels of 16, its masks cost
# nothing extra, and a tile-head costs about 1200 score elements more (least-squares fit over 16
# boxes of the 64x64/16x16 layout at strides 1 and 8: 2.4 ns a score, 2.9 us a tile-head).
NATIVE_TILE_OVERHEAD_ELEMS = 1200


@dataclass(frozen=True, eq=False)
class CpuTilePlan:
    """Q tiles and the KV box each gathers. Index arrays hold original (unpermuted) token indices."""

    q_tile: tuple[int, ...]
    kv_extent: tuple[int, ...]          # KV box per tile (same for every tile)
    q_idx: Tensor = field(repr=False)   # int64 [nqt, TQ]
    kv_idx: Tensor = field(repr=False)  # int64 [nqt, TK]
    mask: Tensor = field(repr=False)    # bool [nqt, TQ, TK], True = attend
    full: Tensor = field(repr=False)    # bool [nqt]: every query of the tile attends its whole box
    own: Tensor = field(repr=False)     # bool [nqt, TQ]: this tile writes the query's row (its owner)
    # The token grid when every KV box is a plain (undilated) 2-D/3-D box of it with no leading
    # tokens: then K/V are relaid out once per distinct inner-dims corner (see _Tiles.box_runs).
    grid: tuple[int, ...] | None = None

    @functools.cached_property
    def partial_tiles(self) -> "_Tiles":
        return _Tiles(self, ~self.full)

    @functools.cached_property
    def full_tiles(self) -> "_Tiles":
        return _Tiles(self, self.full)

    @functools.cached_property
    def all_tiles(self) -> "_Tiles":
        return _Tiles(self, None)

    @functools.cached_property
    def native_tiles(self) -> cpu_native.NativeTiles:
        return cpu_native.NativeTiles(self.q_idx, self.kv_idx, self.mask)

    @property
    def num_tiles(self) -> int:
        return int(self.q_idx.shape[0])

    def cost(self, native: bool = False) -> int:
        """Score elements computed (per batch and head), plus the per-tile overhead, for SDPA per
        tile group or (`native`) the compiled kernel."""
        nqt, tq = self.q_idx.shape
        tk = int(self.kv_idx.shape[1])
        if native:
            padded = -(-tq // cpu_native.Q_PAD) * cpu_native.Q_PAD
            return int(nqt * (padded * tk + NATIVE_TILE_OVERHEAD_ELEMS))
        partial = nqt - int(self.full.sum())
        elems = tq * tk
        return int(nqt * (elems + TILE_OVERHEAD_ELEMS) + partial * elems * (MASKED_TILE_FACTOR - 1))


def _combine(parts):
    """AND/sum per-dimension (q positions, kv positions, mask) into flattened tiles."""
    q_acc = np.zeros((1, 1), dtype=np.int64)
    k_acc = np.zeros((1, 1), dtype=np.int64)
    m_acc = np.ones((1, 1, 1), dtype=bool)
    for qd, kd, md in parts:
        T, A = q_acc.shape
        K = k_acc.shape[1]
        t, a = qd.shape
        k = kd.shape[1]
        q_acc = (q_acc[:, None, :, None] + qd[None, :, None, :]).reshape(T * t, A * a)
        k_acc = (k_acc[:, None, :, None] + kd[None, :, None, :]).reshape(T * t, K * k)
        m_acc = (m_acc[:, None, :, None, :, None] & md[None, :, None, :, None, :]).reshape(T * t, A * a, K * k)
    return q_acc, k_acc, m_acc


def _plan(q_acc, k_acc, m_acc, q_tile, extent, grid=None) -> CpuTilePlan:
    mask = torch.from_numpy(np.ascontiguousarray(m_acc))
    own = np.zeros(q_acc.size, dtype=bool)
    own[np.unique(q_acc.reshape(-1), return_index=True)[1]] = True  # first tile holding each query
    return CpuTilePlan(tuple(q_tile), tuple(extent), torch.from_numpy(q_acc), torch.from_numpy(k_acc),
                       mask, mask.flatten(1).all(1), torch.from_numpy(own.reshape(q_acc.shape)), grid)


@functools.lru_cache(maxsize=64)
def gna_plan(layout: GNALayout, q_tile: tuple[int, ...], leading: int = 0) -> CpuTilePlan:
    """Tiles of a GNA layout with Q boxes `q_tile` (in dilation-permuted grid coordinates). With
    `leading` global tokens before the grid, token indices are shifted past them and every Q tile's
    KV box starts with all leading keys (a grid query attends every leading key)."""
    gna.validate(layout)
    shape = tuple(int(x) for x in layout.shape)
    if len(q_tile) != len(shape):
        raise ValueError(f"q_tile {q_tile} needs {len(shape)} entries")
    ranges = gna.permuted_key_ranges(layout)
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    parts, tiles, extents = [], [], []
    for d, ((ws, we), L) in enumerate(zip(ranges, shape)):
        perm = gna.dilation_permutation(L, layout.dilation[d])
        tq = min(int(q_tile[d]), L)
        starts = np.minimum(np.arange(0, L, tq), L - tq)
        q_pos = starts[:, None] + np.arange(tq)[None, :]
        need_lo, need_hi = ws[q_pos[:, 0]], we[q_pos[:, -1]]
        E = int((need_hi - need_lo).max())
        k_start = np.minimum(need_lo, L - E)
        k_pos = k_start[:, None] + np.arange(E)[None, :]
        m = (k_pos[:, None, :] >= ws[q_pos][:, :, None]) & (k_pos[:, None, :] < we[q_pos][:, :, None])
        parts.append((perm[q_pos] * strides[d], perm[k_pos] * strides[d], m))
        tiles.append(tq)
        extents.append(E)
    q_acc, k_acc, m_acc = _combine(parts)
    if leading:
        nqt, tq = q_acc.shape
        q_acc = q_acc + leading
        k_acc = np.concatenate([np.broadcast_to(np.arange(leading), (nqt, leading)), k_acc + leading], axis=1)
        m_acc = np.concatenate([np.ones((nqt, tq, leading), dtype=bool), m_acc], axis=2)
    boxes = len(shape) > 1 and not leading and all(int(d) == 1 for d in layout.dilation)
    return _plan(q_acc, k_acc, m_acc, tiles, extents, shape if boxes else None)


def window_bounds(params: AttentionParams) -> tuple[int, int] | None:
    """(left, upper) of a bounded 1-D band (key j allowed for -left <= j - i - offset <= upper), or None."""
    left, right = params.window if params.window is not None else (None, None)
    upper = right
    if params.causal:
        upper = 0 if right is None else min(right, 0)
    if left is None or upper is None:
        return None
    return int(left), int(upper)


@functools.lru_cache(maxsize=64)
def window_plan(q_len: int, kv_len: int, left: int, upper: int, offset: int, q_tile: int) -> CpuTilePlan:
    """Tiles of a 1-D band: runs of `q_tile` queries, each gathering the keys its rows may see."""
    tq = min(q_tile, q_len)
    starts = np.minimum(np.arange(0, q_len, tq), q_len - tq)
    i = starts[:, None] + np.arange(tq)[None, :]
    E = int(min(kv_len, max(1, tq + left + upper)))
    k_start = np.clip(starts + offset - left, 0, kv_len - E)
    j = k_start[:, None] + np.arange(E)[None, :]
    rel = j[:, None, :] - i[:, :, None] - offset
    m = (rel <= upper) & (rel >= -left)
    return _plan(i, j, m, (tq,), (E,))


def tile_candidates(layout: GNALayout, leading: int = 0, native: bool | None = None) -> list[tuple[int, ...]]:
    """Q boxes worth trying, least estimated work first (for the compiled kernel, or SDPA per tile
    group; by default whichever this machine is expected to run): the CPU tile table, plus the
    stride box (each Q tile one stride group, perfectly block-sparse when strides tile the grid)
    and a small box."""
    if native is None:
        native = cpu_native.expected()
    n = len(layout.shape)
    if n == 1:
        cands = [tuple(t) for t in TILE_TABLES["cpu"]["q_1d"]] + [(16,)]
    else:
        cands = [tuple(t) for t in TILE_TABLES["cpu"][f"q_{n}d"]] + [(4,) * n]
    st = tuple(min(s, L) for s, L in zip(layout.stride, layout.shape))
    if 16 <= math.prod(st) <= 1024:
        cands.append(st)
    # clip to the grid: boxes that clip to the same tiles are one candidate
    cands = list(dict.fromkeys(tuple(min(t, L) for t, L in zip(c, layout.shape)) for c in cands))
    return sorted(cands, key=lambda t: (gna_plan(layout, t, leading).cost(native), -math.prod(t)))


def choose_gna_tile(layout: GNALayout, leading: int = 0) -> tuple[int, ...]:
    """The Q box with the least estimated work (no measurement; see tuned_gna_tile)."""
    return tile_candidates(layout, leading)[0]


# Tuning: how many of the best-estimated Q boxes are timed, and the least work (score elements
# per call, summed over batch and heads) worth timing: below it a call takes well under a
# millisecond and the estimate is as good as a noisy measurement.
TUNE_TOP = 4
TUNE_MIN_ELEMS = 1 << 22
_TUNED: dict = {}


def _cpu_name() -> str:
    return cpu_native.cpuinfo().get("model name") or platform.processor() or platform.machine()


def _bench_seconds(fn, repeats: int = 2) -> float:
    fn()  # warm: gather workspaces, cached masks
    return best_time(fn, repeats)


def tuned_gna_tile(layout: GNALayout, leading: int, q: Tensor, k: Tensor, v: Tensor,
                   attn_mask: Tensor | None, params: AttentionParams) -> tuple[int, ...]:
    """The Q box this kernel runs fastest with, for these inputs' shapes on this machine: the
    TUNE_TOP best-estimated boxes are timed once per (layout, shapes, dtype, mask kind, threads,
    CPU, torch) and the winner is remembered in memory and in $ATTNOPT_CACHE_DIR/cpu/. The estimate
    alone misses SDPA's own blocking (measured on a 2-core EPYC, 64x64 grid, 16x16 window: 8x8
    boxes ran 13% (stride 1) and 27% (stride 8) faster than the 16x8 boxes the estimate chose).
    Every box gives the same result up to floating-point summation order."""
    native = native_runs(q, k, v, attn_mask, params)
    return _tuned({"kernel": "cpu_gna", "layout": repr(layout), "leading": leading},
                  tile_candidates(layout, leading, native), lambda t: gna_plan(layout, t, leading),
                  q, k, v, attn_mask, params, native)


WINDOW_TILES = (32, 64, 128, 256)


def tuned_window_tile(left: int, upper: int, offset: int, q: Tensor, k: Tensor, v: Tensor,
                      attn_mask: Tensor | None, params: AttentionParams) -> int:
    """The query run length the 1-D window kernel runs fastest with (as tuned_gna_tile): short
    runs waste less of each run's key range, long ones give SDPA larger blocks."""
    Sq, Skv = q.shape[2], k.shape[2]

    def plan_of(t):
        return window_plan(Sq, Skv, left, upper, offset, t[0])

    native = native_runs(q, k, v, attn_mask, params)
    cands = sorted({(min(t, Sq),) for t in WINDOW_TILES}, key=lambda t: (plan_of(t).cost(native), -t[0]))
    return _tuned({"kernel": "cpu_window", "left": left, "upper": upper, "offset": offset},
                  cands, plan_of, q, k, v, attn_mask, params, native)[0]


def _tuned(kernel_key: dict, cands: list[tuple[int, ...]], plan_of, q: Tensor, k: Tensor, v: Tensor,
           attn_mask: Tensor | None, params: AttentionParams, native: bool) -> tuple[int, ...]:
    """The fastest of the TUNE_TOP best-estimated candidates (`cands` in estimate order) for these
    inputs, timed once and remembered; the estimate alone for small work, training or when
    ATTNOPT_AUTOTUNE=0. `native`: whether run_plan takes the compiled kernel (part of the key)."""
    cands = cands[:TUNE_TOP]
    plan = plan_of(cands[0])
    elems = q.shape[0] * q.shape[1] * plan.num_tiles * plan.q_idx.shape[1] * plan.kv_idx.shape[1]
    if len(cands) == 1 or not autotune.enabled() or elems < TUNE_MIN_ELEMS or _needs_grad(q, k, v, attn_mask):
        return cands[0]
    key = {**kernel_key, "q": list(q.shape), "k": list(k.shape), "v": list(v.shape), "dtype": str(q.dtype),
           "mask": None if attn_mask is None else [str(attn_mask.dtype), list(attn_mask.shape)],
           "normalizer": params.normalizer, "softcap": params.softcap is not None,
           "native": native,
           "threads": torch.get_num_threads(), "cpu": _cpu_name(), "torch": torch.__version__}
    return autotune.fastest(
        key, cands, lambda t: _bench_seconds(lambda: run_plan(q, k, v, attn_mask, params, plan_of(t))),
        subdir="cpu", encode=list, decode=tuple, memo=_TUNED)


_WORKSPACE = threading.local()


def _workspace(slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A per-thread buffer reused across calls. Gathered tiles are tens of MB; a fresh allocation
    that size is mmap-ed and page-faulted on first touch every call (measured: 27 ms to gather
    the 64x64/16x16 layout's K tiles fresh vs 7 ms into a reused buffer, 2-core EPYC)."""
    cache = getattr(_WORKSPACE, "bufs", None)
    if cache is None:
        cache = _WORKSPACE.bufs = {}
    key = (slot, like.dtype, like.device)
    buf = cache.get(key)
    n = math.prod(shape)
    if buf is None or buf.numel() < n:
        buf = cache[key] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n].view(shape)


def _tile_major(x: Tensor, idx: Tensor, slot: str | None = None) -> Tensor:
    """x [B, Hx, S, D] at tokens idx [n, T] -> [n, B * Hx, T, D]: tiles in SDPA's batch dim,
    batch and heads merged in its head dim (a view of one gathered copy: SDPA's CPU kernel takes
    strided inputs). A tile's mask then broadcasts over every head instead of being repeated per
    head (47 MB per call on the 64x64 / 16x16 layout). Under GQA, q head b * H + h pairs with kv
    head (b * H + h) // group = b * Hkv + h // group, as enable_gqa wants.
    With `slot`, the copy lands in that reused per-thread workspace (valid until the next call
    that uses the same slot)."""
    B, Hx, _, D = x.shape
    n, T = idx.shape
    g = _gathered(x, idx.reshape(-1), slot)
    return g.view(B, Hx, n, T, D).permute(2, 0, 1, 3, 4).reshape(n, B * Hx, T, D)


def _untile(res: Tensor, batch: int, heads: int) -> Tensor:
    """Inverse of _tile_major for the output: [n, B * H, T, Dv] -> [B, H, n * T, Dv]."""
    n, _, T, Dv = res.shape
    return res.view(n, batch, heads, T, Dv).permute(1, 2, 0, 3, 4).reshape(batch, heads, n * T, Dv)


def _fold_heads(m: Tensor, batch: int, heads: int) -> Tensor:
    """A per-tile mask [mb, mh, n, TQ, TK] (mb in {1, B}, mh in {1, H}) -> [n, 1 | B * H, TQ, TK]
    in the layout of _tile_major (shared by every head when mb = mh = 1)."""
    mb, mh, n, TQ, TK = m.shape
    m = m.permute(2, 0, 1, 3, 4)
    if mb == 1 and mh == 1:
        return m.reshape(n, 1, TQ, TK)
    return m.expand(n, batch, heads, TQ, TK).reshape(n, batch * heads, TQ, TK)


_MASK_CACHE: dict = {}


def _tile_mask(tile_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """The element mask of the tiles [n, 1, TQ, TK] as an additive mask of `dtype` (what SDPA's
    CPU kernel consumes; a bool mask would be converted on every call). Cached."""
    key = (tile_mask.data_ptr(), tuple(tile_mask.shape), dtype)
    hit = _MASK_CACHE.get(key)
    if hit is not None and hit[0] is tile_mask:
        return hit[1]
    add = torch.zeros(tile_mask.shape, dtype=dtype).masked_fill_(~tile_mask, float("-inf")).unsqueeze(1)
    if len(_MASK_CACHE) > 32:
        _MASK_CACHE.clear()
    _MASK_CACHE[key] = (tile_mask, add)
    return add


def _gather_mask(attn_mask: Tensor, tile_mask: Tensor, q_idx: Tensor, kv_idx: Tensor, batch: int,
                 heads: int, Sq: int, Skv: int) -> Tensor:
    """attn_mask at the tiles' (q, kv) pairs AND-ed with the element mask: [n, 1 | B * H, TQ, TK]."""
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(m.shape[0], m.shape[1], Sq, Skv)
    g = m[:, :, q_idx[:, :, None], kv_idx[:, None, :]]                  # [mb, mh, n, TQ, TK]
    if g.dtype == torch.bool:
        g = g & tile_mask
    else:
        g = torch.where(tile_mask, g, torch.tensor(float("-inf"), dtype=g.dtype))
    return _fold_heads(g, batch, heads)


class _Tiles:
    """A subset of a plan's tiles (kept as tensors so cached masks stay valid)."""

    def __init__(self, plan: CpuTilePlan | "_Tiles", sel: Tensor | None):
        self.q_idx = plan.q_idx if sel is None else plan.q_idx[sel]
        self.kv_idx = plan.kv_idx if sel is None else plan.kv_idx[sel]
        self.mask = plan.mask if sel is None else plan.mask[sel]
        self.own = plan.own if sel is None else plan.own[sel]
        self.n = int(self.q_idx.shape[0])
        self.grid, self.kv_extent = plan.grid, plan.kv_extent

    @functools.cached_property
    def scatter(self) -> tuple[Tensor, Tensor | None]:
        """(queries, rows): the tiles' result rows `rows` (of the n * TQ untiled ones; None: all of
        them) go to out's queries `queries`, each query from its owner tile only."""
        own = self.own.reshape(-1)
        if bool(own.all()):
            return self.q_idx.reshape(-1), None
        rows = own.nonzero().reshape(-1)
        return self.q_idx.reshape(-1)[rows], rows

    def _runs(self, starts: list[int]) -> list[tuple["_Tiles", int, int]]:
        """The tiles cut into maximal runs whose `starts` form a non-decreasing arithmetic
        progression (a strided view cannot step backwards)."""
        runs, i = [], 0
        while i < self.n:
            j = i + 1
            step = starts[j] - starts[i] if j < self.n else 0
            while j < self.n and step >= 0 and starts[j] - starts[j - 1] == step:
                j += 1
            if j == i + 1:
                step = 0  # a single tile: its step is never used, and must not be negative
            runs.append((_Tiles(self, torch.arange(i, j)), starts[i], step))
            i = j
        return runs

    @functools.cached_property
    def box_runs(self) -> tuple[Tensor, list[tuple["_Tiles", int, int]]] | None:
        """2-D/3-D boxes: (relayout, runs). `relayout` lists, for each distinct corner of the
        boxes in the inner dims (all but the first), the tokens of that inner box over every
        position of the first dim; gathered once, each tile's keys are one contiguous range of it
        (its rows of its group), so runs of tiles read strided views as in kv_runs. On a 64x64
        grid with 8x8 tiles and 23x23 boxes that gathers 11.8K tokens instead of 33.9K."""
        if self.grid is None or self.n == 0:
            return None
        L0, inner = self.grid[0], math.prod(self.grid[1:])
        ext = self.kv_extent
        e_in = math.prod(ext[1:])
        offs = np.zeros(1, dtype=np.int64)  # token offsets of an inner box, row-major
        for d in range(1, len(self.grid)):
            offs = (offs[:, None] * self.grid[d] + np.arange(ext[d])[None, :]).reshape(-1)
        offs = offs - offs[0]
        corner = self.kv_idx[:, 0].numpy()
        corners, group = np.unique(corner % inner, return_inverse=True)
        relayout = (corners[:, None, None] + np.arange(L0)[None, :, None] * inner + offs[None, None, :])
        starts = (group * L0 * e_in + (corner // inner) * e_in).tolist()
        return torch.from_numpy(relayout.reshape(-1)), self._runs(starts)

    @functools.cached_property
    def kv_runs(self) -> list[tuple["_Tiles", int, int]] | None:
        """[(tiles, first KV start, start step)]: the tiles cut into runs whose KV tokens are
        contiguous ranges starting at an arithmetic progression, so a run's K and V are one strided
        view of the caller's tensors (no gather). None when some tile's KV tokens are not one
        contiguous range (2-D/3-D boxes, dilation, leading tokens). 1-D windows give about three
        runs: the clamped start, the interior, the clamped end."""
        kv = self.kv_idx
        if self.n == 0 or (kv.shape[1] > 1 and not bool((kv[:, 1:] - kv[:, :-1] == 1).all())):
            return None
        return self._runs(kv[:, 0].tolist())


def _kv_view(x: Tensor, n: int, T: int, start: int, step: int) -> Tensor:
    """Tokens [start + i * step, + T) of x [B, Hx, S, D] for i < n, as [n, B * Hx, T, D] without
    copying (overlapping windows of one strided view; SDPA's CPU kernel reads strided inputs)."""
    B, Hx, _, D = x.shape
    if B > 1 and x.stride(0) != Hx * x.stride(1):
        x = x.contiguous()  # batch and heads must merge into one stride
    sb, sh, ss, sd = x.stride()
    return x.as_strided((n, B * Hx, T, D), (step * ss, sh if Hx > 1 or B == 1 else sb, ss, sd),
                        x.storage_offset() + start * ss)


def _run_tiles(q, k, v, attn_mask, params: AttentionParams, tiles: _Tiles, masked: bool, out: Tensor) -> None:
    """Attention of `tiles`, scattered into out [B, H, Sq, Dv]."""
    if tiles.n == 0:
        return
    Skv = k.shape[2]
    if tiles.kv_runs is not None:
        runs = tiles.kv_runs
    elif tiles.box_runs is not None:
        relayout, runs = tiles.box_runs
        grad = _needs_grad(q, k, v, attn_mask)
        k, v = (_gathered(x, relayout, None if grad else slot) for x, slot in ((k, "kbox"), (v, "vbox")))
    else:
        _attend_tiles(q, k, v, False, Skv, attn_mask, params, tiles, masked, out)
        return
    for run, start, step in runs:
        T = int(run.kv_idx.shape[1])
        _attend_tiles(q, _kv_view(k, run.n, T, start, step), _kv_view(v, run.n, T, start, step), True,
                      Skv, attn_mask, params, run, masked, out)


def _needs_grad(*xs: Tensor | None) -> bool:
    """Some input (a learned bias passed as the mask too) needs a gradient: then the gathered tiles
    are fresh tensors, not the reused workspaces, which the next call would overwrite before
    backward reads what autograd saved of them."""
    return any(x is not None and x.requires_grad for x in xs)


def _gathered(x: Tensor, idx: Tensor, slot: str | None) -> Tensor:
    """x [B, Hx, S, D] at tokens idx -> [B, Hx, len(idx), D], contiguous (in a reused workspace
    with `slot`)."""
    if slot is None:
        return x.index_select(2, idx)
    B, Hx, _, D = x.shape
    return torch.index_select(x, 2, idx, out=_workspace(slot, (B, Hx, idx.numel(), D), x))


def _attend_tiles(q, k, v, kv_tiled: bool, Skv: int, attn_mask, params: AttentionParams, tiles: _Tiles,
                  masked: bool, out: Tensor) -> None:
    """One SDPA call over `tiles`. k, v: the caller's [B, Hkv, Skv, D] (gathered here per tile), or
    with kv_tiled their tile views [n, B * Hkv, T, D] (_kv_view)."""
    B, H, Sq, _ = q.shape
    Hkv = k.shape[1] // B if kv_tiled else k.shape[1]
    group = H // Hkv
    # inference reuses the gather buffers (autograd would need them kept per call)
    grad = _needs_grad(q, k, v, attn_mask)
    qg = _tile_major(q, tiles.q_idx, None if grad else "q")
    if kv_tiled:
        kg, vg = k, v
    else:
        kg = _tile_major(k, tiles.kv_idx, None if grad else "k")
        vg = _tile_major(v, tiles.kv_idx, None if grad else "v")
    fast = params.normalizer == "softmax" and params.softcap is None
    m = None
    if attn_mask is not None:
        m = _gather_mask(attn_mask, tiles.mask, tiles.q_idx, tiles.kv_idx, B, H, Sq, Skv)
        if fast and m.dtype != torch.bool:
            m = m.to(q.dtype)
    elif masked:
        m = _tile_mask(tiles.mask, q.dtype) if fast else _fold_heads(tiles.mask[None, None], B, H)
    if fast:
        res = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=m, scale=params.scale, enable_gqa=group > 1)
    else:
        res = reference_attention(qg, kg, vg, m, scale=params.scale, softcap=params.softcap,
                                  normalizer=params.normalizer)
    queries, rows = tiles.scatter
    res = _untile(res, B, H)
    if rows is not None:
        res = res.index_select(2, rows)
    out.index_copy_(2, queries, res.to(out.dtype))


# The compiled kernel vectorizes over a tile's queries (panels of 16): a decode step's single query
# wastes 15/16 of its score work, and SDPA per tile ran faster there (measured: Sq=1 of an 8K cache,
# window 4096, 32/8 heads, D=128: 11.6 ms vs 8.9; at Sq=4 13.1 vs 14.5, 2-core EPYC).
NATIVE_MIN_QUERIES = 4


def native_runs(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams) -> bool:
    """Whether run_plan takes the compiled kernel (cpu_native) rather than SDPA per tile group."""
    if params.normalizer != "softmax" or params.softcap is not None:
        return False
    # a learned bias passed as the mask (relative positions) needs its gradient too
    return cpu_native.can_run(q, k, v, _needs_grad(q, k, v, attn_mask), attn_mask)[0]


def run_plan(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
             plan: CpuTilePlan, native: bool = True) -> Tensor:
    """Attention of every tile of `plan`: the compiled kernel where it runs (and `native`), else SDPA
    per tile group."""
    B, H, Sq, _ = q.shape
    out = torch.empty((B, H, Sq, v.shape[3]), dtype=q.dtype, device=q.device)
    if native and plan.q_idx.shape[1] >= NATIVE_MIN_QUERIES and native_runs(q, k, v, attn_mask, params):
        if q.dtype == torch.float32:
            cpu_native.attend(q, k, v, params.scale, plan.native_tiles, out, attn_mask)
        else:  # fp16/bf16: computed in fp32 (as SDPA's CPU kernel accumulates), rounded once
            out32 = torch.empty(out.shape, dtype=torch.float32)
            cpu_native.attend(q.float(), k.float(), v.float(), params.scale, plan.native_tiles, out32, attn_mask)
            out.copy_(out32)
        return out
    if attn_mask is not None:
        _run_tiles(q, k, v, attn_mask, params, plan.all_tiles, True, out)
    elif bool(plan.full.all()):
        _run_tiles(q, k, v, None, params, plan.all_tiles, False, out)
    elif not bool(plan.full.any()):
        _run_tiles(q, k, v, None, params, plan.all_tiles, True, out)
    else:
        # a shifted border tile may overlap a full one: each row comes from its owner (`own`) only
        _run_tiles(q, k, v, None, params, plan.partial_tiles, True, out)
        _run_tiles(q, k, v, None, params, plan.full_tiles, False, out)
    return out


# ---- public ------------------------------------------------------------------------------------

def _common(q, k, v, attn_mask) -> tuple[bool, str]:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False, "q, k, v must be 4-D [B, H, S, D]"
    if q.device.type != "cpu":
        return False, f"tensors on {q.device}"
    if not q.is_floating_point() or not (q.dtype == k.dtype == v.dtype):
        return False, f"dtypes {q.dtype}/{k.dtype}/{v.dtype}"
    if q.shape[1] % k.shape[1]:
        return False, "heads do not group"
    if attn_mask is not None and not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        return False, f"mask dtype {attn_mask.dtype}"
    return True, ""


def can_run_cpu_gna(params: AttentionParams, q, k, v, attn_mask, layout: GNALayout | None,
                    leading: int = 0) -> tuple[bool, str]:
    if layout is None:
        return False, "no GNA layout"
    ok, why = _common(q, k, v, attn_mask)
    if not ok:
        return ok, why
    if params.causal or params.window is not None:
        return False, "causal/window come from the GNA layout's own flags"
    n = leading + math.prod(layout.shape)
    if q.shape[2] != n or k.shape[2] != n:
        return False, f"sequence lengths {q.shape[2]}/{k.shape[2]} != leading {leading} + grid tokens {n - leading}"
    return True, ""


def can_run_cpu_sliding_window(params: AttentionParams, q, k, v, attn_mask) -> tuple[bool, str]:
    ok, why = _common(q, k, v, attn_mask)
    if not ok:
        return ok, why
    if window_bounds(params) is None:
        return False, "the band is unbounded on one side (no sparsity to exploit)"
    return True, ""


def gna_attention(q: Tensor, k: Tensor, v: Tensor, layout: GNALayout, params: AttentionParams,
                  attn_mask: Tensor | None = None, q_tile: tuple[int, ...] | None = None,
                  leading: int = 0, native: bool = True) -> Tensor:
    """Exact GNA attention on CPU (equals the dense reference with `gna.dense_mask(layout)`; with
    `leading` global tokens before the grid, as attnopt::gna_attention defines them). Without
    `q_tile` the Q box is tuned (tuned_gna_tile); `native=False` keeps to SDPA per tile group."""
    ok, why = can_run_cpu_gna(params, q, k, v, attn_mask, layout, leading)
    if not ok:
        raise ValueError(f"cpu GNA kernel cannot run: {why}")
    if q_tile is None:
        q_tile = tuned_gna_tile(layout, leading, q, k, v, attn_mask, params)
    out = run_plan(q, k, v, attn_mask, params, gna_plan(layout, tuple(q_tile), leading), native)
    if leading:
        out[:, :, :leading] = leading_rows(q, k, v, attn_mask, params, leading, any(layout.causal))
    return out


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams,
                             attn_mask: Tensor | None = None, q_tile: int | None = None) -> Tensor:
    """Exact 1-D sliding-window (and bounded causal-window) attention on CPU. Without `q_tile`
    the query run length is tuned (tuned_window_tile)."""
    ok, why = can_run_cpu_sliding_window(params, q, k, v, attn_mask)
    if not ok:
        raise ValueError(f"cpu sliding-window kernel cannot run: {why}")
    left, upper = window_bounds(params)
    offset = alignment_offset(q.shape[2], k.shape[2], params.causal_alignment)
    if q_tile is None:
        q_tile = tuned_window_tile(left, upper, offset, q, k, v, attn_mask, params)
    plan = window_plan(q.shape[2], k.shape[2], left, upper, offset, int(q_tile))
    return run_plan(q, k, v, attn_mask, params, plan)
