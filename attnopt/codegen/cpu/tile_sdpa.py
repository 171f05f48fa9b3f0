"""SDPA per tile group: the CPU tile kernels' portable inner loop (codegen/cpu/tiles.py builds the
plans; the compiled kernel in native.py is the other inner loop).

Canonical layouts (as attnopt::attention): q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv],
attn_mask broadcastable to [B, H, Sq, Skv] (bool: True = attend; float: added), out [B, H, Sq, Dv].
A plan's q_idx [n, TQ] / kv_idx [n, TK] hold token indices, mask [n, TQ, TK] (True = attend) and
own [n, TQ] which tile writes each query's row. Gathered tiles are "tile-major": [n, B * H, T, D],
so one SDPA call covers every tile of a group (batch and heads folded into SDPA's batch).

Why gather at all: SDPA's CPU kernel only takes dense boxes, so each tile's keys are gathered (or, for
runs of tiles whose keys are contiguous ranges, read through one strided view without copying), the
tiles attend in one call, and each query's row is scattered back from its owner tile only (one
writer per row keeps gradients exact).
"""
from __future__ import annotations

import functools
import math
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from attnopt.codegen.params import AttentionParams
from attnopt.codegen.reference import reference_attention


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


class Tiles:
    """A subset of a plan's tiles (kept as tensors so cached masks stay valid)."""

    def __init__(self, plan, sel: Tensor | None):  # plan: tiles.CpuTilePlan or Tiles
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

    def _runs(self, starts: list[int]) -> list[tuple["Tiles", int, int]]:
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
            runs.append((Tiles(self, torch.arange(i, j)), starts[i], step))
            i = j
        return runs

    @functools.cached_property
    def box_runs(self) -> tuple[Tensor, list[tuple["Tiles", int, int]]] | None:
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
    def kv_runs(self) -> list[tuple["Tiles", int, int]] | None:
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


def run_tiles(q, k, v, attn_mask, params: AttentionParams, tiles: Tiles, masked: bool, out: Tensor) -> None:
    """Attention of `tiles`, scattered into out [B, H, Sq, Dv]."""
    if tiles.n == 0:
        return
    Skv = k.shape[2]
    if tiles.kv_runs is not None:
        runs = tiles.kv_runs
    elif tiles.box_runs is not None:
        relayout, runs = tiles.box_runs
        grad = needs_grad(q, k, v, attn_mask)
        k, v = (_gathered(x, relayout, None if grad else slot) for x, slot in ((k, "kbox"), (v, "vbox")))
    else:
        _attend_tiles(q, k, v, False, Skv, attn_mask, params, tiles, masked, out)
        return
    for run, start, step in runs:
        T = int(run.kv_idx.shape[1])
        _attend_tiles(q, _kv_view(k, run.n, T, start, step), _kv_view(v, run.n, T, start, step), True,
                      Skv, attn_mask, params, run, masked, out)


def needs_grad(*xs: Tensor | None) -> bool:
    """Some input (a learned bias passed as the mask too) needs a gradient and grad mode records it:
    then the gathered tiles are fresh tensors, not the reused workspaces, which the next call would
    overwrite before backward reads what autograd saved of them. Under no_grad (a custom op's own
    forward runs so, below autograd) nothing is saved: the inference path runs."""
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def _gathered(x: Tensor, idx: Tensor, slot: str | None) -> Tensor:
    """x [B, Hx, S, D] at tokens idx -> [B, Hx, len(idx), D], contiguous (in a reused workspace
    with `slot`)."""
    if slot is None:
        return x.index_select(2, idx)
    B, Hx, _, D = x.shape
    return torch.index_select(x, 2, idx, out=_workspace(slot, (B, Hx, idx.numel(), D), x))


def _attend_tiles(q, k, v, kv_tiled: bool, Skv: int, attn_mask, params: AttentionParams, tiles: Tiles,
                  masked: bool, out: Tensor) -> None:
    """One SDPA call over `tiles`. k, v: the caller's [B, Hkv, Skv, D] (gathered here per tile), or
    with kv_tiled their tile views [n, B * Hkv, T, D] (_kv_view)."""
    B, H, Sq, _ = q.shape
    Hkv = k.shape[1] // B if kv_tiled else k.shape[1]
    group = H // Hkv
    # inference reuses the gather buffers (autograd would need them kept per call)
    grad = needs_grad(q, k, v, attn_mask)
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
