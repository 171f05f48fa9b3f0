"""Triton source of the GNA backward kernels (gna_backward.py holds the host side, the layouts and
the math): gna_bwd_lse_kernel, gna_bwd_dq_kernel, gna_bwd_dkdv_kernel, run from this text as
backward.py's kernels are.

Canonical layouts (what gna_backward.backward_calls passes; contiguous):
  q [B, H, S, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], dO [B, H, S, Dv]; lse, delta [B, H, S] fp32;
  dq / dk / dv fp32 like q / k / v; ds [B, H, S, S] fp32; the mask expanded to [B, H, S, S]
  (stride 0 on broadcast dims). Grid token t is row LEADING + t; slot maps and tile lists as
  gna_tiles.py builds them (padding slots -1).
"""
from __future__ import annotations

import linecache
import sys
import types

from attnopt.codegen.triton import generator

SOURCE = r'''
import triton
import triton.language as tl


@triton.jit
def _rows(ptr, tok, m_rows, offs_c, N_COLS: tl.constexpr, UPCAST: tl.constexpr):
    """Rows `tok` of a contiguous [S, N_COLS] matrix; rows where m_rows is false read 0."""
    b_x = tl.load(ptr + tok[:, None] * N_COLS + offs_c[None, :],
                  mask=m_rows[:, None] & (offs_c[None, :] < N_COLS), other=0.0)
    if UPCAST:
        b_x = b_x.to(tl.float32)
    return b_x


@triton.jit
def _slots(IDX, offs, LEADING: tl.constexpr):
    """(token, valid) of slots `offs`: padding slots (-1) read token LEADING and are invalid."""
    b_slot = tl.load(IDX + offs)
    return tl.maximum(b_slot, 0) + LEADING, b_slot >= 0


@triton.jit
def _keep(QRANGE, KCOORD, offs_m, offs_n, NDIM: tl.constexpr):
    """The exact GNA mask [M, N] in permuted coordinates: per dimension lo <= key < hi (padding
    keys carry coordinate -1, padding queries the range [0, 0): never)."""
    b_kc = tl.load(KCOORD + offs_n * 4 + 0)
    m = (b_kc[None, :] >= tl.load(QRANGE + offs_m * 6 + 0)[:, None]) & \
        (b_kc[None, :] < tl.load(QRANGE + offs_m * 6 + 1)[:, None])
    if NDIM > 1:
        b_kc = tl.load(KCOORD + offs_n * 4 + 1)
        m = m & (b_kc[None, :] >= tl.load(QRANGE + offs_m * 6 + 2)[:, None]) & \
            (b_kc[None, :] < tl.load(QRANGE + offs_m * 6 + 3)[:, None])
    if NDIM > 2:
        b_kc = tl.load(KCOORD + offs_n * 4 + 2)
        m = m & (b_kc[None, :] >= tl.load(QRANGE + offs_m * 6 + 4)[:, None]) & \
            (b_kc[None, :] < tl.load(QRANGE + offs_m * 6 + 5)[:, None])
    return m


@triton.jit
def _scores(b_q, b_k, p_mask_base, b_qtok, b_ktok, m_pair, stride_mm, stride_mn, scale,
            HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Scores in natural units with the user's mask, -inf outside m_pair."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=INPUT_PRECISION) * scale
    if HAS_MASK:
        # int64 offsets: a dense [S, S] mask passes 2^31 elements at S = 46341
        b_mk = tl.load(p_mask_base + b_qtok[:, None].to(tl.int64) * stride_mm + b_ktok[None, :] * stride_mn,
                       mask=m_pair, other=0)
        if MASK_IS_BOOL:
            b_s = tl.where(b_mk != 0, b_s, float("-inf"))
        else:
            b_s = b_s + b_mk.to(tl.float32)
    return tl.where(m_pair, b_s, float("-inf"))


@triton.jit
def _online(b_acc, b_m, b_l, b_s, b_v, INPUT_PRECISION: tl.constexpr):
    """One online-softmax step in natural units (fp32 state)."""
    b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
    # A fully masked row keeps max -inf; subtract 0 instead so exp gives 0, not NaN.
    b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    b_p = tl.exp(b_s - b_m_safe[:, None])
    b_alpha = tl.exp(b_m - b_m_safe)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=INPUT_PRECISION)
    return b_acc, b_m_new, b_l


@triton.jit
def _lse_globals(b_acc, b_m, b_l, b_q, p_k, p_v, p_mask_base, b_qtok, m_q, offs_d, offs_dv,
                 stride_mm, stride_mn, scale, KEY0: tl.constexpr, COUNT: tl.constexpr, BLOCK_L: tl.constexpr,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, HAS_MASK: tl.constexpr,
                 MASK_IS_BOOL: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """The COUNT global keys KEY0.. in blocks of BLOCK_L (every grid query sees them)."""
    for start in range(KEY0, KEY0 + COUNT, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        m_l = offs_l < KEY0 + COUNT
        b_k = _rows(p_k, offs_l, m_l, offs_d, HEAD_DIM, UPCAST)
        b_v = _rows(p_v, offs_l, m_l, offs_dv, HEAD_DIM_V, UPCAST)
        b_s = _scores(b_q, b_k, p_mask_base, b_qtok, offs_l, m_q[:, None] & m_l[None, :], stride_mm, stride_mn,
                      scale, HAS_MASK, MASK_IS_BOOL, INPUT_PRECISION)
        b_acc, b_m, b_l = _online(b_acc, b_m, b_l, b_s, b_v, INPUT_PRECISION)
    return b_acc, b_m, b_l


@triton.jit
def _lse_tiles(b_acc, b_m, b_l, b_q, p_k, p_v, p_mask_base, p_tiles, QRANGE, KCOORD, KIDX, offs_m, b_qtok, m_q,
               offs_d, offs_dv, lo, hi, stride_mm, stride_mn, scale,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, NDIM: tl.constexpr,
               LEADING: tl.constexpr, ELEMENT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
               UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    for i in range(lo, hi):
        offs_n = tl.load(p_tiles + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        b_ktok, m_k = _slots(KIDX, offs_n, LEADING)
        b_k = _rows(p_k, b_ktok, m_k, offs_d, HEAD_DIM, UPCAST)
        b_v = _rows(p_v, b_ktok, m_k, offs_dv, HEAD_DIM_V, UPCAST)
        m_pair = m_q[:, None] & m_k[None, :]
        if ELEMENT:
            m_pair = m_pair & _keep(QRANGE, KCOORD, offs_m, offs_n, NDIM)
        b_s = _scores(b_q, b_k, p_mask_base, b_qtok, b_ktok, m_pair, stride_mm, stride_mn, scale,
                      HAS_MASK, MASK_IS_BOOL, INPUT_PRECISION)
        b_acc, b_m, b_l = _online(b_acc, b_m, b_l, b_s, b_v, INPUT_PRECISION)
    return b_acc, b_m, b_l


@triton.jit
def gna_bwd_lse_kernel(
    Q, K, V, MASK, DO, LSE, DELTA, TILES, COUNTS, QRANGE, KCOORD, QIDX, KIDX,
    stride_mb, stride_mh, stride_mm, stride_mn, H, S, MAX_TILES, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NDIM: tl.constexpr,
    LEADING: tl.constexpr, BLOCK_L: tl.constexpr, TRAIL0: tl.constexpr, TRAILING: tl.constexpr,
    BLOCK_T: tl.constexpr, ELEMENT_MASK: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """lse and delta of one Q tile's grid rows (the forward's visit order and masks)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H
    kv_bh = off_b * (H // GROUP) + off_h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b_qtok, m_q = _slots(QIDX, offs_m, LEADING)
    b_q = _rows(Q + pid_bh * S * HEAD_DIM, b_qtok, m_q, offs_d, HEAD_DIM, UPCAST)
    p_k = K + kv_bh * S * HEAD_DIM
    p_v = V + kv_bh * S * HEAD_DIM_V
    p_mask_base = MASK + off_b * stride_mb + off_h * stride_mh
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if LEADING > 0:
        b_acc, b_m, b_l = _lse_globals(b_acc, b_m, b_l, b_q, p_k, p_v, p_mask_base, b_qtok, m_q, offs_d, offs_dv,
                                       stride_mm, stride_mn, scale, 0, LEADING, BLOCK_L, HEAD_DIM, HEAD_DIM_V,
                                       HAS_MASK, MASK_IS_BOOL, UPCAST, INPUT_PRECISION)
    if TRAILING > 0:
        b_acc, b_m, b_l = _lse_globals(b_acc, b_m, b_l, b_q, p_k, p_v, p_mask_base, b_qtok, m_q, offs_d, offs_dv,
                                       stride_mm, stride_mn, scale, TRAIL0, TRAILING, BLOCK_T, HEAD_DIM,
                                       HEAD_DIM_V, HAS_MASK, MASK_IS_BOOL, UPCAST, INPUT_PRECISION)
    p_tiles = TILES + pid_m * MAX_TILES
    n_full = tl.load(COUNTS + pid_m * 2)
    n_all = tl.load(COUNTS + pid_m * 2 + 1)
    b_acc, b_m, b_l = _lse_tiles(b_acc, b_m, b_l, b_q, p_k, p_v, p_mask_base, p_tiles, QRANGE, KCOORD, KIDX,
                                 offs_m, b_qtok, m_q, offs_d, offs_dv, 0, n_full, stride_mm, stride_mn, scale,
                                 HEAD_DIM, HEAD_DIM_V, BLOCK_N, NDIM, LEADING, False, HAS_MASK, MASK_IS_BOOL,
                                 UPCAST, INPUT_PRECISION)
    if ELEMENT_MASK:
        b_acc, b_m, b_l = _lse_tiles(b_acc, b_m, b_l, b_q, p_k, p_v, p_mask_base, p_tiles, QRANGE, KCOORD, KIDX,
                                     offs_m, b_qtok, m_q, offs_d, offs_dv, n_full, n_all, stride_mm, stride_mn,
                                     scale, HEAD_DIM, HEAD_DIM_V, BLOCK_N, NDIM, LEADING, True, HAS_MASK,
                                     MASK_IS_BOOL, UPCAST, INPUT_PRECISION)
    b_o = b_acc / tl.maximum(b_l, 1.17549435e-38)[:, None]
    b_lse = tl.where(b_l > 0.0, b_m + tl.log(tl.maximum(b_l, 1.17549435e-38)), float("-inf"))
    b_do = _rows(DO + pid_bh * S * HEAD_DIM_V, b_qtok, m_q, offs_dv, HEAD_DIM_V, True)
    tl.store(LSE + pid_bh * S + b_qtok, b_lse, mask=m_q)
    tl.store(DELTA + pid_bh * S + b_qtok, tl.sum(b_o * b_do, 1), mask=m_q)


@triton.jit
def _row_stats(LSE, DELTA, row0, b_qtok, m_q):
    """lse (a dead row's -inf and padding rows read as +inf: p = 0 there) and delta."""
    b_lse = tl.load(LSE + row0 + b_qtok, mask=m_q, other=float("inf"))
    b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)
    return b_lse, tl.load(DELTA + row0 + b_qtok, mask=m_q, other=0.0)


@triton.jit
def _dq_tiles(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, p_mask_base, p_tiles, QRANGE, KCOORD, KIDX, offs_m,
              b_qtok, m_q, offs_d, offs_dv, lo, hi, stride_mm, stride_mn, scale,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, NDIM: tl.constexpr,
              LEADING: tl.constexpr, ELEMENT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
              UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    for i in range(lo, hi):
        offs_n = tl.load(p_tiles + i) * BLOCK_N + tl.arange(0, BLOCK_N)
        b_ktok, m_k = _slots(KIDX, offs_n, LEADING)
        b_k = _rows(p_k, b_ktok, m_k, offs_d, HEAD_DIM, UPCAST)
        b_v = _rows(p_v, b_ktok, m_k, offs_dv, HEAD_DIM_V, UPCAST)
        m_pair = m_q[:, None] & m_k[None, :]
        if ELEMENT:
            m_pair = m_pair & _keep(QRANGE, KCOORD, offs_m, offs_n, NDIM)
        b_s = _scores(b_q, b_k, p_mask_base, b_qtok, b_ktok, m_pair, stride_mm, stride_mn, scale,
                      HAS_MASK, MASK_IS_BOOL, INPUT_PRECISION)
        b_p = tl.exp(b_s - b_lse[:, None])
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=INPUT_PRECISION)
        b_dx = b_p * (b_dp - b_delta[:, None]) * scale
        b_dq += tl.dot(b_dx.to(b_k.dtype), b_k, input_precision=INPUT_PRECISION)
    return b_dq


@triton.jit
def gna_bwd_dq_kernel(
    Q, K, V, MASK, DO, LSE, DELTA, DQ, TILES, COUNTS, QRANGE, KCOORD, QIDX, KIDX,
    stride_mb, stride_mh, stride_mm, stride_mn, H, S, MAX_TILES, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NDIM: tl.constexpr,
    LEADING: tl.constexpr, ELEMENT_MASK: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dQ (fp32) of one Q tile's grid rows from the grid keys of the forward's KV tile list."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H
    kv_bh = off_b * (H // GROUP) + off_h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b_qtok, m_q = _slots(QIDX, offs_m, LEADING)
    b_q = _rows(Q + pid_bh * S * HEAD_DIM, b_qtok, m_q, offs_d, HEAD_DIM, UPCAST)
    b_do = _rows(DO + pid_bh * S * HEAD_DIM_V, b_qtok, m_q, offs_dv, HEAD_DIM_V, UPCAST)
    b_lse, b_delta = _row_stats(LSE, DELTA, pid_bh * S, b_qtok, m_q)
    p_k = K + kv_bh * S * HEAD_DIM
    p_v = V + kv_bh * S * HEAD_DIM_V
    p_mask_base = MASK + off_b * stride_mb + off_h * stride_mh
    p_tiles = TILES + pid_m * MAX_TILES
    n_full = tl.load(COUNTS + pid_m * 2)
    n_all = tl.load(COUNTS + pid_m * 2 + 1)
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_dq = _dq_tiles(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, p_mask_base, p_tiles, QRANGE, KCOORD, KIDX,
                     offs_m, b_qtok, m_q, offs_d, offs_dv, 0, n_full, stride_mm, stride_mn, scale,
                     HEAD_DIM, HEAD_DIM_V, BLOCK_N, NDIM, LEADING, False, HAS_MASK, MASK_IS_BOOL, UPCAST,
                     INPUT_PRECISION)
    if ELEMENT_MASK:
        b_dq = _dq_tiles(b_dq, b_q, b_do, b_lse, b_delta, p_k, p_v, p_mask_base, p_tiles, QRANGE, KCOORD,
                         KIDX, offs_m, b_qtok, m_q, offs_d, offs_dv, n_full, n_all, stride_mm, stride_mn, scale,
                         HEAD_DIM, HEAD_DIM_V, BLOCK_N, NDIM, LEADING, True, HAS_MASK, MASK_IS_BOOL, UPCAST,
                         INPUT_PRECISION)
    tl.store(DQ + pid_bh * S * HEAD_DIM + b_qtok[:, None] * HEAD_DIM + offs_d[None, :], b_dq,
             mask=m_q[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _dkdv_tiles(b_dk, b_dv, b_k, b_v, Q, DO, LSE, DELTA, DS, p_mask_base, p_qtiles, QRANGE, KCOORD, QIDX,
                offs_n, b_ktok, m_k, offs_d, offs_dv, bh, S, lo, hi, stride_mm, stride_mn, scale,
                HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, NDIM: tl.constexpr,
                LEADING: tl.constexpr, ELEMENT: tl.constexpr, HAS_MASK: tl.constexpr,
                MASK_IS_BOOL: tl.constexpr, WRITE_DS: tl.constexpr, UPCAST: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    for i in range(lo, hi):
        offs_m = tl.load(p_qtiles + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        b_qtok, m_q = _slots(QIDX, offs_m, LEADING)
        b_q = _rows(Q + bh * S * HEAD_DIM, b_qtok, m_q, offs_d, HEAD_DIM, UPCAST)
        b_do = _rows(DO + bh * S * HEAD_DIM_V, b_qtok, m_q, offs_dv, HEAD_DIM_V, UPCAST)
        b_lse, b_delta = _row_stats(LSE, DELTA, bh * S, b_qtok, m_q)
        m_pair = m_q[:, None] & m_k[None, :]
        m_valid = m_pair
        if ELEMENT:
            m_pair = m_pair & _keep(QRANGE, KCOORD, offs_m, offs_n, NDIM)
        b_s = _scores(b_q, b_k, p_mask_base, b_qtok, b_ktok, m_pair, stride_mm, stride_mn, scale,
                      HAS_MASK, MASK_IS_BOOL, INPUT_PRECISION)
        b_p = tl.exp(b_s - b_lse[:, None])
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=INPUT_PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=INPUT_PRECISION)
        b_dk += tl.dot(tl.trans((b_ds * scale).to(b_q.dtype)), b_q, input_precision=INPUT_PRECISION)
        if WRITE_DS:
            # real (query, key) pairs only: padding slots alias token LEADING
            tl.store(DS + bh * S * S + b_qtok[:, None].to(tl.int64) * S + b_ktok[None, :], b_ds, mask=m_valid)
    return b_dk, b_dv


@triton.jit
def gna_bwd_dkdv_kernel(
    Q, K, V, MASK, DO, LSE, DELTA, DK, DV, DS, QTILES, QCOUNTS, QRANGE, KCOORD, QIDX, KIDX,
    stride_mb, stride_mh, stride_mm, stride_mn, H, S, MAX_Q, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NDIM: tl.constexpr,
    LEADING: tl.constexpr, ELEMENT_MASK: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    WRITE_DS: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dK, dV (fp32) of one KV tile's grid keys from the grid queries of the Q tiles that visit it,
    summed over the KV head's query group; dS per pair if WRITE_DS."""
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1).to(tl.int64)
    off_b = pid_bkv // (H // GROUP)
    off_hkv = pid_bkv % (H // GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b_ktok, m_k = _slots(KIDX, offs_n, LEADING)
    b_k = _rows(K + pid_bkv * S * HEAD_DIM, b_ktok, m_k, offs_d, HEAD_DIM, UPCAST)
    b_v = _rows(V + pid_bkv * S * HEAD_DIM_V, b_ktok, m_k, offs_dv, HEAD_DIM_V, UPCAST)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    p_qtiles = QTILES + pid_n * MAX_Q
    n_full = tl.load(QCOUNTS + pid_n * 2)
    n_all = tl.load(QCOUNTS + pid_n * 2 + 1)
    for g in range(0, GROUP):
        off_h = off_hkv * GROUP + g
        bh = off_b * H + off_h
        p_mask_base = MASK + off_b * stride_mb + off_h * stride_mh
        b_dk, b_dv = _dkdv_tiles(b_dk, b_dv, b_k, b_v, Q, DO, LSE, DELTA, DS, p_mask_base, p_qtiles, QRANGE,
                                 KCOORD, QIDX, offs_n, b_ktok, m_k, offs_d, offs_dv, bh, S, 0, n_full,
                                 stride_mm, stride_mn, scale, HEAD_DIM, HEAD_DIM_V, BLOCK_M, NDIM, LEADING, False,
                                 HAS_MASK, MASK_IS_BOOL, WRITE_DS, UPCAST, INPUT_PRECISION)
        if ELEMENT_MASK:
            b_dk, b_dv = _dkdv_tiles(b_dk, b_dv, b_k, b_v, Q, DO, LSE, DELTA, DS, p_mask_base, p_qtiles, QRANGE,
                                     KCOORD, QIDX, offs_n, b_ktok, m_k, offs_d, offs_dv, bh, S, n_full, n_all,
                                     stride_mm, stride_mn, scale, HEAD_DIM, HEAD_DIM_V, BLOCK_M, NDIM, LEADING,
                                     True, HAS_MASK, MASK_IS_BOOL, WRITE_DS, UPCAST, INPUT_PRECISION)
    tl.store(DK + pid_bkv * S * HEAD_DIM + b_ktok[:, None] * HEAD_DIM + offs_d[None, :], b_dk,
             mask=m_k[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + pid_bkv * S * HEAD_DIM_V + b_ktok[:, None] * HEAD_DIM_V + offs_dv[None, :], b_dv,
             mask=m_k[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
'''

KERNELS = ("gna_bwd_lse_kernel", "gna_bwd_dq_kernel", "gna_bwd_dkdv_kernel")
_MODULES: dict[bool, types.ModuleType] = {}


def kernels() -> types.ModuleType:
    """The module holding KERNELS, run from SOURCE (one per interpreter mode, as backward.py)."""
    interp = generator.interpreter_active()
    if interp not in _MODULES:
        filename = f"<attnopt generated gna_attention_backward{'_interp' if interp else ''}.py>"
        linecache.cache[filename] = (len(SOURCE), None, SOURCE.splitlines(keepends=True), filename)
        name = f"attnopt_generated.gna_attention_backward{'_interp' if interp else ''}"
        module = types.ModuleType(name)
        module.__file__ = filename
        sys.modules[name] = module
        exec(compile(SOURCE, filename, "exec"), module.__dict__)  # noqa: S102  our own source text
        _MODULES[interp] = module
    return _MODULES[interp]
