"""Host-side tile plan of the block-sparse GNA kernel (numpy only), from the simulator's tile logic.

Canonical layouts:
  tokens are the row-major flattening of `layout.shape` (N = prod(shape)); q/k/v [B, H, N, D].
  "Permuted" coordinates are per-dimension dilation-permuted (`gna.dilation_permutation`), where a
  query's keys are contiguous; tiles are boxes of that permuted grid laid at multiples of the tile
  shape (static KV tiling), exactly as `simulator.simulate(..., dynamic=False)` counts them.
  A "slot" is a row of the padded, permuted buffer: Q tile t owns slots [t*BLOCK_M, (t+1)*BLOCK_M),
  KV tile u owns [u*BLOCK_N, (u+1)*BLOCK_N); slots of tiles clipped at the grid end are padding.

`gna_tile_plan`: per Q tile the KV tiles it visits (the forward and the backward's dQ walk it);
`transpose_plan` / `gna_transposed_plan`: per KV tile the Q tiles that visit it (the backward's
dK/dV walk it, gna_backward.py), the same pairs with the same full / masked split.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from attnopt.ir import GNALayout
from attnopt.sparsity import gna
from attnopt.sparsity.simulator import dim_tiles


@dataclass(frozen=True)
class GNATilePlan:
    layout: GNALayout
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    block_m: int
    block_n: int
    num_q_tiles: int
    num_kv_tiles: int
    q_index: np.ndarray = field(repr=False)    # [nq*BM] original token of each Q slot, -1 = padding
    kv_index: np.ndarray = field(repr=False)   # [nk*BN] original token of each KV slot, -1 = padding
    q_range: np.ndarray = field(repr=False)    # int32 [nq*BM, 6]: (lo, hi) per dim, permuted coords
    kv_coord: np.ndarray = field(repr=False)   # int32 [nk*BN, 4]: permuted coords, -1 = padding
    tiles: np.ndarray = field(repr=False)      # int32 [nq, max_tiles]: KV tiles to visit, full first
    counts: np.ndarray = field(repr=False)     # int32 [nq, 2]: (full tiles, all tiles)
    element_mask: bool = True                  # False: perfectly block-sparse, no visited tile masked

    @property
    def visited(self) -> int:
        return int(self.counts[:, 1].sum())


def _slots(shape, perms, tile):
    """Slots of box tiling: (original token or -1, permuted coords [slots, ndim], valid)."""
    n = len(shape)
    ntiles = [-(-L // t) for L, t in zip(shape, tile)]
    tg = np.stack(np.meshgrid(*[np.arange(x) for x in ntiles], indexing="ij"), -1).reshape(-1, n)
    og = np.stack(np.meshgrid(*[np.arange(x) for x in tile], indexing="ij"), -1).reshape(-1, n)
    pc = tg[:, None, :] * np.asarray(tile) + og[None, :, :]          # [tiles, BM, ndim]
    pc = pc.reshape(-1, n)
    valid = np.all(pc < np.asarray(shape), axis=-1)
    strides = [int(np.prod(shape[d + 1:], dtype=np.int64)) for d in range(n)]
    flat = np.zeros(len(pc), dtype=np.int64)
    for d in range(n):
        flat += perms[d][np.minimum(pc[:, d], shape[d] - 1)] * strides[d]
    return np.where(valid, flat, -1), pc, valid, ntiles


@functools.lru_cache(maxsize=64)
def gna_tile_plan(layout: GNALayout, q_tile: tuple[int, ...], kv_tile: tuple[int, ...]) -> GNATilePlan:
    gna.validate(layout)
    shape = tuple(int(x) for x in layout.shape)
    n = len(shape)
    if len(q_tile) != n or len(kv_tile) != n:
        raise ValueError(f"tiles {q_tile}/{kv_tile} must have one entry per grid dimension of {shape}")
    ranges = gna.permuted_key_ranges(layout)
    perms = [gna.dilation_permutation(L, d) for L, d in zip(shape, layout.dilation)]

    q_index, q_pc, q_valid, nq_d = _slots(shape, perms, q_tile)
    q_range = np.zeros((len(q_index), 6), dtype=np.int32)
    for d, (ws, we) in enumerate(ranges):
        pc = np.minimum(q_pc[:, d], shape[d] - 1)
        q_range[:, 2 * d] = np.where(q_valid, ws[pc], 0)
        q_range[:, 2 * d + 1] = np.where(q_valid, we[pc], 0)
    for d in range(n, 3):  # unused dimensions always pass (coordinate 0 in [0, 1))
        q_range[:, 2 * d + 1] = np.where(q_valid, 1, 0)

    kv_index, kv_pc, kv_valid, nk_d = _slots(shape, perms, kv_tile)
    kv_coord = np.zeros((len(kv_index), 4), dtype=np.int32)
    kv_coord[:, :n] = kv_pc
    kv_coord[~kv_valid, :] = -1

    # Per dimension and Q tile index: the KV tiles visited (static tiling) and which are full,
    # from the simulator's own dim_tiles; a tile clipped at the grid end holds padding keys and
    # is treated as masked so padding never attends.
    per_dim = []
    for d, ((ws, we), tq, tk) in enumerate(zip(ranges, q_tile, kv_tile)):
        L = shape[d]
        dt = dim_tiles(ws, we, tq, tk, dynamic=False)
        rows = []
        for qi in range(nq_d[d]):
            f, l = qi * tq, min(qi * tq + tq, L) - 1
            first = int(dt.first_kv[qi]) // tk
            idx = first + np.arange(int(dt.visited[qi]))
            starts = idx * tk
            full = (starts >= ws[l]) & (starts + tk <= we[f]) & (starts + tk <= L)
            rows.append((idx, full))
        per_dim.append(rows)

    nq = int(np.prod(nq_d))
    nk = int(np.prod(nk_d))
    tile_lists, counts = [], np.zeros((nq, 2), dtype=np.int32)
    q_tiles = np.stack(np.meshgrid(*[np.arange(x) for x in nq_d], indexing="ij"), -1).reshape(-1, n)
    kstr = [int(np.prod(nk_d[d + 1:], dtype=np.int64)) for d in range(n)]
    for t, qt in enumerate(q_tiles):
        lin = np.zeros(1, dtype=np.int64)
        full = np.ones(1, dtype=bool)
        for d in range(n):
            idx, fl = per_dim[d][qt[d]]
            lin = (lin[:, None] + idx[None, :] * kstr[d]).reshape(-1)
            full = (full[:, None] & fl[None, :]).reshape(-1)
        order = np.argsort(~full, kind="stable")  # full tiles first
        tile_lists.append(lin[order])
        counts[t] = (int(full.sum()), len(lin))
    max_tiles = max(len(x) for x in tile_lists)
    tiles = np.zeros((nq, max_tiles), dtype=np.int32)
    for t, lst in enumerate(tile_lists):
        tiles[t, : len(lst)] = lst
    return GNATilePlan(
        layout=layout, q_tile=tuple(q_tile), kv_tile=tuple(kv_tile),
        block_m=int(np.prod(q_tile)), block_n=int(np.prod(kv_tile)), num_q_tiles=nq,
        num_kv_tiles=nk, q_index=q_index, kv_index=kv_index, q_range=q_range, kv_coord=kv_coord,
        tiles=tiles, counts=counts, element_mask=bool((counts[:, 0] < counts[:, 1]).any()),
    )


@dataclass(frozen=True)
class GNATransposedPlan:
    """The plan seen from the keys (the GNA backward's dK/dV kernel): per KV tile u, the Q tiles
    whose forward list visits u, those that visit it as a full tile (no element mask) first, each
    list ascending. Every (Q tile, KV tile) pair of `plan` appears exactly once, so one program per
    KV tile accumulates its dK / dV without atomics."""

    plan: GNATilePlan
    q_tiles: np.ndarray = field(repr=False)    # int32 [nk, max_q]: Q tiles visiting the tile, full first
    counts: np.ndarray = field(repr=False)     # int32 [nk, 2]: (full visits, all visits)


def transpose_plan(plan: GNATilePlan) -> GNATransposedPlan:
    """`plan`'s tile lists inverted: KV tile -> the Q tiles that visit it (host side, numpy)."""
    nq, nk = plan.num_q_tiles, plan.num_kv_tiles
    n_all = plan.counts[:, 1].astype(np.int64)
    cols = np.arange(plan.tiles.shape[1])[None, :]
    used = cols < n_all[:, None]
    q = np.broadcast_to(np.arange(nq)[:, None], plan.tiles.shape)[used]
    kv = plan.tiles[used].astype(np.int64)
    partial = np.broadcast_to(cols >= plan.counts[:, :1], plan.tiles.shape)[used]
    order = np.lexsort((q, partial, kv))  # by KV tile, full visits first, then Q tile
    q, kv, partial = q[order], kv[order], partial[order]
    per_all = np.bincount(kv, minlength=nk)
    per_full = np.bincount(kv[~partial], minlength=nk)
    max_q = max(1, int(per_all.max(initial=0)))
    q_tiles = np.zeros((nk, max_q), dtype=np.int32)
    starts = np.concatenate([[0], np.cumsum(per_all)[:-1]])
    q_tiles[kv, np.arange(len(kv)) - starts[kv]] = q
    counts = np.stack([per_full, per_all], axis=1).astype(np.int32)
    return GNATransposedPlan(plan=plan, q_tiles=q_tiles, counts=counts)


@functools.lru_cache(maxsize=64)
def gna_transposed_plan(layout: GNALayout, q_tile: tuple[int, ...], kv_tile: tuple[int, ...]
                        ) -> GNATransposedPlan:
    """`transpose_plan(gna_tile_plan(layout, q_tile, kv_tile))`, cached like the plan."""
    return transpose_plan(gna_tile_plan(layout, q_tile, kv_tile))
