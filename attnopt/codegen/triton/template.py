"""Source template of the generated Triton forward kernels (FlashAttention-2 style).

Canonical layouts (what the host launcher passes):
  q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv], out [B, H, Sq, Dv] (any strides);
  mask: the user's attn_mask expanded to [B, H, Sq, Skv] (stride 0 on broadcast dims), bool or float.
  GNA kernels walk a token-permuted, tile-padded slot order (a tile is a box of the grid, padded to
  BLOCK_M / BLOCK_N slots) and gather each slot's row from the row-major tensors through the
  slot -> token maps; per Q tile the host passes the list of KV tiles to visit, full tiles first.

`render(family, kind)` substitutes the kernel name (`<family>_fwd_kernel`); everything else is
specialized through the UPPER_CASE constexpr arguments, so one rendered file serves every spec of
its family and Triton compiles one binary per constexpr combination.
"""
from __future__ import annotations

import hashlib

COMMON = r'''
import triton
import triton.language as tl

# Compiled kernels may only read constexpr globals.
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tanh(x):
    # libdevice tanh is unavailable under the interpreter; this form saturates cleanly to +-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _scores(b_q, b_k, scale, softcap, HAS_SOFTCAP: tl.constexpr, SIGMOID: tl.constexpr,
            INPUT_PRECISION: tl.constexpr):
    """Scores q @ kT * scale, soft-capped: in log2 units (x log2(e)) for softmax, so the online
    softmax feeds exp2 without a second multiply per element; natural units for sigmoid."""
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=INPUT_PRECISION)
    if HAS_SOFTCAP:
        b_s = softcap * _tanh(b_s * (scale / softcap))
        if not SIGMOID:
            b_s = b_s * LOG2E
    elif SIGMOID:
        b_s = b_s * scale
    else:
        b_s = b_s * (scale * LOG2E)
    return b_s


@triton.jit
def _add_bias(b_s, b_bias, SIGMOID: tl.constexpr):
    """An additive mask/bias (natural units) joins the scores in their units.

    A finite bias must stay finite: HF models mask with finfo.min, which overflows to -inf once
    multiplied by log2(e). SDPA and eager softmax give a row masked everywhere by finfo.min
    uniform weights (every score rounds to finfo.min), and a model's own dead-row handling may
    rely on that; -inf would give weight 0 instead. So clamp to the fp32 minimum, keeping only a
    real -inf infinite."""
    if SIGMOID:
        return b_s + b_bias
    b_b = tl.maximum(b_bias * LOG2E, -3.4028234663852886e38)
    b_b = tl.where(b_bias == float("-inf"), b_bias, b_b)
    return b_s + b_b


@triton.jit
def _load_kv(p_k, p_v, m_rows, offs_d, offs_dv, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
             CHECKED: tl.constexpr, UPCAST: tl.constexpr):
    """A K and a V tile; with CHECKED, rows outside m_rows and padded head-dim columns read 0."""
    if CHECKED:
        b_k = tl.load(p_k, mask=m_rows[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        b_v = tl.load(p_v, mask=m_rows[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    else:
        b_k = tl.load(p_k)
        b_v = tl.load(p_v)
    if UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    return b_k, b_v


@triton.jit
def _user_mask(b_s, p_mask, m_in, CHECKED: tl.constexpr, MASK_IS_BOOL: tl.constexpr, SIGMOID: tl.constexpr):
    """The caller's mask applied to the scores: bool (False -> -inf) or additive. With CHECKED,
    m_in marks the elements that exist (others read as 0 / no bias)."""
    if CHECKED:
        b_mk = tl.load(p_mask, mask=m_in, other=0)
    else:
        b_mk = tl.load(p_mask)
    if MASK_IS_BOOL:
        b_s = tl.where(b_mk != 0, b_s, float("-inf"))
    else:
        b_s = _add_bias(b_s, b_mk.to(tl.float32), SIGMOID)
    return b_s


@triton.jit
def _update(b_acc, b_m, b_l, b_s, b_v, SIGMOID: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One online-softmax step (exp2, fp32 state; b_s in log2 units) or a plain sigmoid
    accumulation (b_s in natural units)."""
    if SIGMOID:
        b_p = 1.0 / (1.0 + tl.exp(-b_s))  # sigmoid(-inf) == 0: masked keys add nothing
        b_acc += tl.dot(b_p.to(b_v.dtype), b_v, input_precision=INPUT_PRECISION)
    else:
        b_s2 = b_s
        b_m_new = tl.maximum(b_m, tl.max(b_s2, 1))
        # A fully masked row keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN.
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_p = tl.math.exp2(b_s2 - b_m_safe[:, None])
        b_alpha = tl.math.exp2(b_m - b_m_safe)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=INPUT_PRECISION)
        b_m = b_m_new
    return b_acc, b_m, b_l
'''

DENSE = r'''

@triton.jit
def _dense_inner(
    b_acc, b_m, b_l, b_q, p_k_base, p_v_base, p_mask_base,
    offs_m, offs_d, offs_dv, lo, hi,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
    Q_LEN, KV_LEN, scale, softcap, offset, win_left, win_right,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
    APPLY_STRUCTURE: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_LEFT: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    SIGMOID: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        m_n = offs_n < KV_LEN
        p_k = p_k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
        p_v = p_v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        # Interior tiles lie inside [0, KV_LEN) and the head dim fills the block: no predicates.
        b_k, b_v = _load_kv(p_k, p_v, m_n, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V,
                            APPLY_STRUCTURE or not EVEN_D, UPCAST)
        b_s = _scores(b_q, b_k, scale, softcap, HAS_SOFTCAP, SIGMOID, INPUT_PRECISION)
        if HAS_MASK:
            p_mask = p_mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
            b_s = _user_mask(b_s, p_mask, (offs_m[:, None] < Q_LEN) & m_n[None, :], True, MASK_IS_BOOL, SIGMOID)
        if APPLY_STRUCTURE:
            m_keep = m_n[None, :]
            rel = offs_n[None, :] - offs_m[:, None] - offset
            if HAS_UPPER:
                m_keep = m_keep & (rel <= win_right)
            if HAS_LEFT:
                m_keep = m_keep & (rel >= -win_left)
            b_s = tl.where(m_keep, b_s, float("-inf"))
        b_acc, b_m, b_l = _update(b_acc, b_m, b_l, b_s, b_v, SIGMOID, INPUT_PRECISION)
    return b_acc, b_m, b_l


@triton.jit
def @FAMILY@_fwd_kernel(
    Q, K, V, MASK, O,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Q_LEN, KV_LEN, scale, softcap, offset, win_left, win_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_UPPER: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SIGMOID: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Dense / causal / sliding-window attention on a 1-D sequence.

    Key j is allowed for query i iff offset - win_left <= j - i <= offset + win_right, sides
    switched off by HAS_LEFT / HAS_UPPER (causal is win_right = min(right, 0)). KV tiles outside
    the band are never visited; only tiles that cut the band (or the sequence end) are masked.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_hkv = off_h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_m = offs_m < Q_LEN

    p_q = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_m[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
    p_k_base = K + off_b * stride_kb + off_hkv * stride_kh
    p_v_base = V + off_b * stride_vb + off_hkv * stride_vh
    p_mask_base = MASK + off_b * stride_mb + off_h * stride_mh

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    m_last = tl.minimum(m0 + BLOCK_M, Q_LEN) - 1
    # Keys any row of this block may see: [lo_key, hi_key).
    lo_key = 0
    hi_key = KV_LEN
    if HAS_LEFT:
        lo_key = tl.maximum(m0 + offset - win_left, 0)
    if HAS_UPPER:
        hi_key = tl.minimum(tl.maximum(m_last + offset + win_right + 1, 0), KV_LEN)
    lo = (lo_key // BLOCK_N) * BLOCK_N
    hi = tl.maximum(((hi_key + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo)
    # Tiles every row sees entirely: [full_lo, full_hi).
    full_lo = lo
    full_hi = (KV_LEN // BLOCK_N) * BLOCK_N
    if HAS_LEFT:
        full_lo = ((tl.maximum(m_last + offset - win_left, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    if HAS_UPPER:
        full_hi = tl.minimum(full_hi, (tl.maximum(m0 + offset + win_right + 1, 0) // BLOCK_N) * BLOCK_N)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)

    b_acc, b_m, b_l = _dense_inner(
        b_acc, b_m, b_l, b_q, p_k_base, p_v_base, p_mask_base, offs_m, offs_d, offs_dv, lo, full_lo,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        Q_LEN, KV_LEN, scale, softcap, offset, win_left, win_right,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, True, HAS_UPPER, HAS_LEFT, HAS_MASK, MASK_IS_BOOL,
        HAS_SOFTCAP, SIGMOID, UPCAST, INPUT_PRECISION, EVEN_D)
    b_acc, b_m, b_l = _dense_inner(
        b_acc, b_m, b_l, b_q, p_k_base, p_v_base, p_mask_base, offs_m, offs_d, offs_dv, full_lo, full_hi,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        Q_LEN, KV_LEN, scale, softcap, offset, win_left, win_right,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, False, HAS_UPPER, HAS_LEFT, HAS_MASK, MASK_IS_BOOL,
        HAS_SOFTCAP, SIGMOID, UPCAST, INPUT_PRECISION, EVEN_D)
    b_acc, b_m, b_l = _dense_inner(
        b_acc, b_m, b_l, b_q, p_k_base, p_v_base, p_mask_base, offs_m, offs_d, offs_dv, full_hi, hi,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
        Q_LEN, KV_LEN, scale, softcap, offset, win_left, win_right,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, True, HAS_UPPER, HAS_LEFT, HAS_MASK, MASK_IS_BOOL,
        HAS_SOFTCAP, SIGMOID, UPCAST, INPUT_PRECISION, EVEN_D)

    if not SIGMOID:
        b_acc = b_acc / tl.maximum(b_l, 1.17549435e-38)[:, None]
    p_o = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(p_o, b_acc.to(O.dtype.element_ty), mask=m_m[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
'''

GNA = r'''

@triton.jit
def _gna_inner(
    b_acc, b_m, b_l, b_q, p_k_base, p_v_base, p_mask_base, p_tiles,
    offs_d, offs_dv, b_qlo0, b_qhi0, b_qlo1, b_qhi1, b_qlo2, b_qhi2, b_qidx,
    KCOORD, KIDX, lo, hi,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale, softcap,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, NDIM: tl.constexpr,
    LEADING: tl.constexpr, ELEMENT_MASK: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, SIGMOID: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
):
    for i in range(lo, hi):
        tile = tl.load(p_tiles + i)
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        # Slot -> original token (padding slots read grid token 0; the element mask drops them).
        b_kidx = tl.load(KIDX + offs_n) + LEADING
        p_k = p_k_base + b_kidx[:, None] * stride_kn + offs_d[None, :] * stride_kd
        p_v = p_v_base + b_kidx[:, None] * stride_vn + offs_dv[None, :] * stride_vd
        if EVEN_D:
            b_k = tl.load(p_k)
            b_v = tl.load(p_v)
        else:
            b_k = tl.load(p_k, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            b_v = tl.load(p_v, mask=offs_dv[None, :] < HEAD_DIM_V, other=0.0)
        if UPCAST:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        b_s = _scores(b_q, b_k, scale, softcap, HAS_SOFTCAP, SIGMOID, INPUT_PRECISION)
        if HAS_MASK:
            p_mask = p_mask_base + b_qidx[:, None] * stride_mm + b_kidx[None, :] * stride_mn
            b_s = _user_mask(b_s, p_mask, None, False, MASK_IS_BOOL, SIGMOID)
        if ELEMENT_MASK:
            # Exact GNA mask in permuted coordinates: per dimension, lo <= key < hi.
            # Padding keys carry coordinate -1 and never attend.
            b_kc = tl.load(KCOORD + offs_n * 4 + 0)
            m_keep = (b_kc[None, :] >= b_qlo0[:, None]) & (b_kc[None, :] < b_qhi0[:, None])
            if NDIM > 1:
                b_kc = tl.load(KCOORD + offs_n * 4 + 1)
                m_keep = m_keep & (b_kc[None, :] >= b_qlo1[:, None]) & (b_kc[None, :] < b_qhi1[:, None])
            if NDIM > 2:
                b_kc = tl.load(KCOORD + offs_n * 4 + 2)
                m_keep = m_keep & (b_kc[None, :] >= b_qlo2[:, None]) & (b_kc[None, :] < b_qhi2[:, None])
            b_s = tl.where(m_keep, b_s, float("-inf"))
        b_acc, b_m, b_l = _update(b_acc, b_m, b_l, b_s, b_v, SIGMOID, INPUT_PRECISION)
    return b_acc, b_m, b_l


@triton.jit
def _global_keys(
    b_acc, b_m, b_l, b_q, p_k_base, p_v_base, p_mask_base, offs_d, offs_dv, b_qidx,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale, softcap,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, KEY0: tl.constexpr, COUNT: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    SIGMOID: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # Every grid query attends the COUNT global keys KEY0.. (leading ones: [CLS], sinks, tokens
    # 0..LEADING-1, causal or not; trailing ones after the grid: the host passes none when causal).
    offs_l = KEY0 + tl.arange(0, BLOCK_L)
    m_l = offs_l < KEY0 + COUNT
    p_k = p_k_base + offs_l[:, None] * stride_kn + offs_d[None, :] * stride_kd
    p_v = p_v_base + offs_l[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    b_k, b_v = _load_kv(p_k, p_v, m_l, offs_d, offs_dv, HEAD_DIM, HEAD_DIM_V, True, UPCAST)
    b_s = _scores(b_q, b_k, scale, softcap, HAS_SOFTCAP, SIGMOID, INPUT_PRECISION)
    if HAS_MASK:
        p_mask = p_mask_base + b_qidx[:, None] * stride_mm + offs_l[None, :] * stride_mn
        b_s = _user_mask(b_s, p_mask, m_l[None, :], True, MASK_IS_BOOL, SIGMOID)
    b_s = tl.where(m_l[None, :], b_s, float("-inf"))
    return _update(b_acc, b_m, b_l, b_s, b_v, SIGMOID, INPUT_PRECISION)


@triton.jit
def @FAMILY@_fwd_kernel(
    Q, K, V, MASK, O, TILES, COUNTS, QRANGE, KCOORD, QIDX, KIDX,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    H, MAX_TILES, scale, softcap,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NDIM: tl.constexpr, LEADING: tl.constexpr, BLOCK_L: tl.constexpr, ELEMENT_MASK: tl.constexpr,
    HAS_MASK: tl.constexpr, TRAIL0: tl.constexpr, TRAILING: tl.constexpr, BLOCK_T: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SIGMOID: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Block-sparse GNA attention over tile-permuted tokens.

    Q tile pid_m owns slots [pid_m*BLOCK_M, +BLOCK_M) of the permuted, padded token order; QIDX /
    KIDX map a slot to its original token (QIDX -1 = padding), so q, k, v and out stay in the
    caller's row-major order and rows are gathered in the kernel (no permutation passes over
    memory). It visits the KV tiles TILES[pid_m, :COUNTS[pid_m, 1]]; the first COUNTS[pid_m, 0]
    are full (no element mask). With ELEMENT_MASK false the layout is perfectly block-sparse and
    no mask code is compiled. With LEADING > 0 the grid starts at token LEADING (q/k/v/out hold the
    whole sequence) and each Q tile first visits one extra block holding the leading keys; with
    TRAILING > 0 it visits one more holding the trailing keys TRAIL0.. (TRAIL0 = LEADING + grid
    tokens). The global queries' own rows are the host's to fill.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_hkv = off_h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    b_qslot = tl.load(QIDX + offs_m)
    m_q = b_qslot >= 0
    b_qidx = tl.maximum(b_qslot, 0) + LEADING
    p_q = Q + off_b * stride_qb + off_h * stride_qh + b_qidx[:, None] * stride_qm + offs_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_q[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
    p_k_base = K + off_b * stride_kb + off_hkv * stride_kh
    p_v_base = V + off_b * stride_vb + off_hkv * stride_vh
    p_mask_base = MASK + off_b * stride_mb + off_h * stride_mh
    p_tiles = TILES + pid_m * MAX_TILES
    n_full = tl.load(COUNTS + pid_m * 2)
    n_all = tl.load(COUNTS + pid_m * 2 + 1)

    # Per query and dimension: its key range [lo, hi) in permuted coordinates (QRANGE [M, 6]).
    if ELEMENT_MASK:
        b_qlo0 = tl.load(QRANGE + offs_m * 6 + 0)
        b_qhi0 = tl.load(QRANGE + offs_m * 6 + 1)
        b_qlo1 = tl.load(QRANGE + offs_m * 6 + 2)
        b_qhi1 = tl.load(QRANGE + offs_m * 6 + 3)
        b_qlo2 = tl.load(QRANGE + offs_m * 6 + 4)
        b_qhi2 = tl.load(QRANGE + offs_m * 6 + 5)
    else:  # perfectly block-sparse: the ranges are never read
        b_qlo0 = tl.zeros([BLOCK_M], dtype=tl.int32)
        b_qhi0 = b_qlo0
        b_qlo1 = b_qlo0
        b_qhi1 = b_qlo0
        b_qlo2 = b_qlo0
        b_qhi2 = b_qlo0

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    if LEADING > 0:
        b_acc, b_m, b_l = _global_keys(
            b_acc, b_m, b_l, b_q, p_k_base, p_v_base, p_mask_base, offs_d, offs_dv, b_qidx,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale, softcap,
            HEAD_DIM, HEAD_DIM_V, 0, LEADING, BLOCK_L, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP, SIGMOID,
            UPCAST, INPUT_PRECISION)
    if TRAILING > 0:
        b_acc, b_m, b_l = _global_keys(
            b_acc, b_m, b_l, b_q, p_k_base, p_v_base, p_mask_base, offs_d, offs_dv, b_qidx,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale, softcap,
            HEAD_DIM, HEAD_DIM_V, TRAIL0, TRAILING, BLOCK_T, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP, SIGMOID,
            UPCAST, INPUT_PRECISION)
    b_acc, b_m, b_l = _gna_inner(
        b_acc, b_m, b_l, b_q, p_k_base, p_v_base, p_mask_base, p_tiles,
        offs_d, offs_dv, b_qlo0, b_qhi0, b_qlo1, b_qhi1, b_qlo2, b_qhi2, b_qidx, KCOORD, KIDX, 0, n_full,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale, softcap,
        HEAD_DIM, HEAD_DIM_V, BLOCK_N, NDIM, LEADING, False, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP, SIGMOID,
        UPCAST, INPUT_PRECISION, EVEN_D)
    if ELEMENT_MASK:
        b_acc, b_m, b_l = _gna_inner(
            b_acc, b_m, b_l, b_q, p_k_base, p_v_base, p_mask_base, p_tiles,
            offs_d, offs_dv, b_qlo0, b_qhi0, b_qlo1, b_qhi1, b_qlo2, b_qhi2, b_qidx, KCOORD, KIDX,
            n_full, n_all,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, scale, softcap,
            HEAD_DIM, HEAD_DIM_V, BLOCK_N, NDIM, LEADING, True, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP, SIGMOID,
            UPCAST, INPUT_PRECISION, EVEN_D)

    if not SIGMOID:
        b_acc = b_acc / tl.maximum(b_l, 1.17549435e-38)[:, None]
    p_o = O + off_b * stride_ob + off_h * stride_oh + b_qidx[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(p_o, b_acc.to(O.dtype.element_ty), mask=m_q[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
'''

KINDS = {"dense": DENSE, "gna": GNA}


def render(family: str, kind: str) -> str:
    """Python source of a module defining `<family>_fwd_kernel` for the kernel kind "dense" or "gna"."""
    if not family.isidentifier():
        raise ValueError(f"family must be an identifier, got {family!r}")
    header = f'"""Generated by attnopt.codegen.triton: {family}_fwd_kernel ({kind} template)."""\n'
    return header + COMMON + KINDS[kind].replace("@FAMILY@", family)


def template_hash() -> str:
    return hashlib.sha256((COMMON + DENSE + GNA).encode()).hexdigest()[:12]
