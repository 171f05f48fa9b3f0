"""Exact CPU kernels for the sparse variants: GNA layouts (1-D/2-D/3-D, stride, dilation, causal) and
1-D sliding windows.

Canonical layouts (as attnopt::attention):
  q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv], attn_mask broadcastable to
  [B, H, Sq, Skv] (bool: True = attend; float: added), out [B, H, Sq, Dv] in q.dtype.
  For a GNA layout Sq = Skv = leading + prod(layout.shape) + trailing: `leading` global tokens
  first, then the grid's tokens flattened row-major, then `trailing` global tokens.

Here: the tile plans, their cost estimates and tuning, and the checks (`can_run_gna`,
`can_run_window`: the kernel table's signature, codegen/select.py). The inner loops are the compiled
kernel (native.py) and SDPA per tile group (tile_sdpa.py); run_plan picks between them.

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
Gradients: where inputs need them, run_plan takes the compiled forward paired with the compiled backward
(native_backward.py, same owner rule); SDPA per tile group differentiates through autograd otherwise (no
C compiler, a mask that needs its own gradient, softcap or other normalizers).
"""
from __future__ import annotations

import functools
import math
import platform
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from attnopt.codegen import autotune
from attnopt.codegen.cpu import native as cpu_native
from attnopt.codegen.cpu import native_backward
from attnopt.codegen.cpu.tile_sdpa import Tiles, needs_grad, run_tiles
from attnopt.codegen.gna_exact import fill_global_rows
from attnopt.codegen.params import AttentionParams, TokenLayout, gna_call_fits
from attnopt.codegen.reference import alignment_offset
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
    # tokens: then K/V are relaid out once per distinct inner-dims corner (see tile_sdpa.Tiles.box_runs).
    grid: tuple[int, ...] | None = None

    @functools.cached_property
    def partial_tiles(self) -> Tiles:
        return Tiles(self, ~self.full)

    @functools.cached_property
    def full_tiles(self) -> Tiles:
        return Tiles(self, self.full)

    @functools.cached_property
    def all_tiles(self) -> Tiles:
        return Tiles(self, None)

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
def gna_plan(layout: GNALayout, q_tile: tuple[int, ...], leading: int = 0, trailing: int = 0) -> CpuTilePlan:
    """Tiles of a GNA layout with Q boxes `q_tile` (in dilation-permuted grid coordinates). With
    `leading` global tokens before the grid, token indices are shifted past them and every Q tile's
    KV box starts with all leading keys (a grid query attends every leading key); with `trailing`
    global tokens after the grid every KV box ends with all of them (none under a causal layout:
    they come after every grid query). Global queries are in no tile (their rows are dense)."""
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
    if trailing and not any(layout.causal):
        nqt, tq = q_acc.shape
        end = leading + math.prod(shape)
        k_acc = np.concatenate([k_acc, np.broadcast_to(np.arange(end, end + trailing), (nqt, trailing))], axis=1)
        m_acc = np.concatenate([m_acc, np.ones((nqt, tq, trailing), dtype=bool)], axis=2)
    boxes = len(shape) > 1 and not leading and not trailing and all(int(d) == 1 for d in layout.dilation)
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


def tile_candidates(layout: GNALayout, leading: int = 0, native: bool | None = None,
                    trailing: int = 0) -> list[tuple[int, ...]]:
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
    return sorted(cands, key=lambda t: (gna_plan(layout, t, leading, trailing).cost(native), -math.prod(t)))


def choose_gna_tile(layout: GNALayout, leading: int = 0, trailing: int = 0) -> tuple[int, ...]:
    """The Q box with the least estimated work (no measurement; see tuned_gna_tile)."""
    return tile_candidates(layout, leading, trailing=trailing)[0]


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
                   attn_mask: Tensor | None, params: AttentionParams, trailing: int = 0) -> tuple[int, ...]:
    """The Q box this kernel runs fastest with, for these inputs' shapes on this machine: the
    TUNE_TOP best-estimated boxes are timed once per (layout, shapes, dtype, mask kind, threads,
    CPU, torch) and the winner is remembered in memory and in $ATTNOPT_CACHE_DIR/cpu/. The estimate
    alone misses SDPA's own blocking (measured on a 2-core EPYC, 64x64 grid, 16x16 window: 8x8
    boxes ran 13% (stride 1) and 27% (stride 8) faster than the 16x8 boxes the estimate chose).
    Every box gives the same result up to floating-point summation order."""
    native = native_runs(q, k, v, attn_mask, params)
    key = {"kernel": "cpu_gna", "layout": repr(layout), "leading": leading}
    if trailing:
        key["trailing"] = trailing  # keys without it stay those cached before it existed
    return _tuned(key, tile_candidates(layout, leading, native, trailing),
                  lambda t: gna_plan(layout, t, leading, trailing),
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
    if len(cands) == 1 or not autotune.enabled() or elems < TUNE_MIN_ELEMS or needs_grad(q, k, v, attn_mask):
        return cands[0]
    key = {**kernel_key, "q": list(q.shape), "k": list(k.shape), "v": list(v.shape), "dtype": str(q.dtype),
           "mask": None if attn_mask is None else [str(attn_mask.dtype), list(attn_mask.shape)],
           "normalizer": params.normalizer, "softcap": params.softcap is not None,
           "native": native,
           "threads": torch.get_num_threads(), "cpu": _cpu_name(), "torch": torch.__version__}
    return autotune.fastest(
        key, cands, lambda t: _bench_seconds(lambda: run_plan(q, k, v, attn_mask, params, plan_of(t))),
        subdir="cpu", encode=list, decode=tuple, memo=_TUNED)


# The compiled kernel vectorizes over a tile's queries (panels of 16): a decode step's single query
# wastes 15/16 of its score work, and SDPA per tile ran faster there (measured: Sq=1 of an 8K cache,
# window 4096, 32/8 heads, D=128: 11.6 ms vs 8.9; at Sq=4 13.1 vs 14.5, 2-core EPYC).
NATIVE_MIN_QUERIES = 4


def native_can_run(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams
                   ) -> tuple[bool, str]:
    """Whether run_plan takes the compiled kernel (cpu_native) rather than SDPA per tile group, and
    why not."""
    if params.normalizer != "softmax" or params.softcap is not None:
        return False, "the compiled kernel is softmax without softcap"
    if needs_grad(q, k, v, attn_mask):  # the compiled backward (native_backward.py) pairs with it
        return native_backward.can_run(q, k, v, attn_mask)
    return cpu_native.can_run(q, k, v, False, attn_mask)


def native_runs(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams) -> bool:
    """Whether run_plan takes the compiled kernel (cpu_native) rather than SDPA per tile group."""
    return native_can_run(q, k, v, attn_mask, params)[0]


def run_plan(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
             plan: CpuTilePlan, native: bool = True) -> Tensor:
    """Attention of every tile of `plan`: the compiled kernel where it runs (and `native`), else SDPA
    per tile group."""
    B, H, Sq, _ = q.shape
    out = torch.empty((B, H, Sq, v.shape[3]), dtype=q.dtype, device=q.device)
    if native and plan.q_idx.shape[1] >= NATIVE_MIN_QUERIES and native_runs(q, k, v, attn_mask, params):
        if needs_grad(q, k, v, attn_mask):
            return native_backward.attention(q, k, v, attn_mask, params.scale, plan)
        if q.dtype == torch.float32:
            cpu_native.attend(q, k, v, params.scale, plan.native_tiles, out, attn_mask)
        else:  # fp16/bf16: computed in fp32 (as SDPA's CPU kernel accumulates), rounded once
            out32 = torch.empty(out.shape, dtype=torch.float32)
            cpu_native.attend(q.float(), k.float(), v.float(), params.scale, plan.native_tiles, out32, attn_mask)
            out.copy_(out32)
        return out
    if attn_mask is not None:
        run_tiles(q, k, v, attn_mask, params, plan.all_tiles, True, out)
    elif bool(plan.full.all()):
        run_tiles(q, k, v, None, params, plan.all_tiles, False, out)
    elif not bool(plan.full.any()):
        run_tiles(q, k, v, None, params, plan.all_tiles, True, out)
    else:
        # a shifted border tile may overlap a full one: each row comes from its owner (`own`) only
        run_tiles(q, k, v, None, params, plan.partial_tiles, True, out)
        run_tiles(q, k, v, None, params, plan.full_tiles, False, out)
    return out


# ---- public: the checks take the kernel table's signature (codegen/select.py) ----------------

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


def can_run_gna(q, k, v, attn_mask, params: AttentionParams, layout: TokenLayout | None) -> tuple[bool, str]:
    """The GNA kernel: a grid (between `layout.leading` and `layout.trailing` global tokens) over
    the whole sequence."""
    ok, why = gna_call_fits(q.shape[2], k.shape[2], params, layout)
    if not ok:
        return ok, why
    return _common(q, k, v, attn_mask)


def can_run_window(q, k, v, attn_mask, params: AttentionParams, layout: TokenLayout | None = None
                   ) -> tuple[bool, str]:
    """The 1-D sliding-window kernel: a band bounded on both sides (causal bounds the right)."""
    if layout is not None:
        return False, "a token layout needs the GNA kernel"
    ok, why = _common(q, k, v, attn_mask)
    if not ok:
        return ok, why
    if window_bounds(params) is None:
        return False, "the band is unbounded on one side (no sparsity to exploit)"
    return True, ""


def can_run(q, k, v, attn_mask, params: AttentionParams, layout: TokenLayout | None) -> tuple[bool, str]:
    """Either kernel: GNA with a layout, else the sliding window."""
    if layout is not None:
        return can_run_gna(q, k, v, attn_mask, params, layout)
    return can_run_window(q, k, v, attn_mask, params)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
              layout: TokenLayout | None, native: bool = True) -> Tensor:
    """The kernel `can_run` accepted: gna_attention with a layout, else sliding_window_attention."""
    if layout is not None:
        return gna_attention(q, k, v, layout.grid, params, attn_mask, leading=layout.leading, native=native,
                             trailing=layout.trailing)
    return sliding_window_attention(q, k, v, params, attn_mask, native=native)


def gna_attention(q: Tensor, k: Tensor, v: Tensor, layout: GNALayout, params: AttentionParams,
                  attn_mask: Tensor | None = None, q_tile: tuple[int, ...] | None = None,
                  leading: int = 0, native: bool = True, trailing: int = 0) -> Tensor:
    """Exact GNA attention on CPU (equals the dense reference with `gna.dense_mask(layout)`; with
    `leading` / `trailing` global tokens before / after the grid, as attnopt::gna_attention
    defines them). Without `q_tile` the Q box is tuned (tuned_gna_tile); `native=False` keeps to
    SDPA per tile group."""
    ok, why = can_run_gna(q, k, v, attn_mask, params, TokenLayout(layout, leading, trailing=trailing))
    if not ok:
        raise ValueError(f"cpu GNA kernel cannot run: {why}")
    if q_tile is None:
        q_tile = tuned_gna_tile(layout, leading, q, k, v, attn_mask, params, trailing)
    out = run_plan(q, k, v, attn_mask, params, gna_plan(layout, tuple(q_tile), leading, trailing), native)
    return fill_global_rows(out, q, k, v, attn_mask, params, leading, trailing, any(layout.causal))


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, params: AttentionParams,
                             attn_mask: Tensor | None = None, q_tile: int | None = None,
                             native: bool = True) -> Tensor:
    """Exact 1-D sliding-window (and bounded causal-window) attention on CPU. Without `q_tile`
    the query run length is tuned (tuned_window_tile); `native=False` keeps to SDPA per tile group."""
    ok, why = can_run_window(q, k, v, attn_mask, params)
    if not ok:
        raise ValueError(f"cpu sliding-window kernel cannot run: {why}")
    left, upper = window_bounds(params)
    offset = alignment_offset(q.shape[2], k.shape[2], params.causal_alignment)
    if q_tile is None:
        q_tile = tuned_window_tile(left, upper, offset, q, k, v, attn_mask, params)
    plan = window_plan(q.shape[2], k.shape[2], left, upper, offset, int(q_tile))
    return run_plan(q, k, v, attn_mask, params, plan, native)
