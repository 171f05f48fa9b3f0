"""Triton backward of attnopt::attention's dense family (FlashAttention-2 style): dQ, dK, dV and a
learned additive mask's gradient, without materializing the S x S probabilities.

Canonical layouts (BHSD, as the forward op; the host makes q, k, v, grad_out contiguous):
  q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv], grad_out [B, H, Sq, Dv],
  attn_mask broadcastable to [B, H, Sq, Skv] (bool: True = attend; float: added), passed expanded
  (stride 0 on broadcast dims).
  lse [B, H, Sq] fp32, natural log units, -inf on a row that sees no key; o [B, H, Sq, Dv] fp32;
  delta [B, H, Sq] fp32 = rowsum(grad_out * o).
  dq like q, dk like k, dv like v (GQA: summed over each KV head's query group), dmask shaped like
  attn_mask (dS written densely [B, H, Sq, Skv] fp32 by the dK/dV kernel, then summed over the
  mask's broadcast dims in torch), all contiguous.

Kernels (one source, rendered and run from its text as generator.kernel does):
  attn_fwd_lse_kernel  per (Q tile, b*h): the forward again, writing o and lse. The forward op's
                       schema carries no log-sum-exp (saved .pt2 programs hold it), so the backward
                       recomputes it: one extra forward, O(S) memory, no S^2 scores.
  attn_bwd_pre_kernel  per (Q tile, b*h): delta.
  attn_bwd_dkdv_kernel per (KV tile, b*hkv): loops over the group's query heads, then over the Q
                       tiles that can see the tile (the causal / window band), so GQA needs no atomics
                       and every (b, h, i, j) is visited once (where dS is written for a learned mask).
  attn_bwd_dq_kernel   per (Q tile, b*h): loops over the band's KV tiles; separate from dK/dV so
                       dQ is deterministic (no atomics).
Math (natural units; s = softcap(x * scale) + mask, masked entries -inf, x = q . k):
  softmax: p = exp(s - lse); dP = dO v^T; dS = p * (dP - delta)
  sigmoid: p = sigmoid(s);   dS = dP * p * (1 - p)           (no lse, no delta: both kernels skip them)
  softcap: dx = dS * scale * (1 - tanh^2(x * scale / cap)), else dx = dS * scale
  dV = p^T dO, dK = dx^T q, dQ = dx k; dmask = dS.
A row with no visible key has lse -inf; the kernels read it as +inf so p = 0 and every gradient of
it is 0 (SDPA's safe softmax). fp16 / bf16 inputs accumulate in fp32 (p and dS are cast to the input
dtype for the tensor-core dots, as FlashAttention-2 does). Under the interpreter bf16 tiles are
upcast (its bf16 tl.dot is wrong). Every tile load is bounds-checked (no interior fast path yet).
Tiles: `candidates(q)` per dtype (each compiled for sm_90 by aot.py), tuned per case on a GPU by
`tuned_tiles` (autotune.fastest: timed once per key with lengths bucketed, remembered in memory and on
disk, as the forward's configs); the GNA backward tunes its tile plans the same way.
Not here: GNA layouts (gna_backward.py: the GNA tile plan, and its transpose for dK/dV; it runs the
exact heads of a per-head selection through these kernels and uses `reduce_to`), decode-only
kernels, head dims over MAX_HEAD_DIM.
"""
from __future__ import annotations

import linecache
import sys
import types
from dataclasses import dataclass

import torch
from torch import Tensor

from attnopt.codegen.params import AttentionParams
from attnopt.codegen.reference import alignment_offset
from attnopt.codegen.triton import generator, launcher
from attnopt.codegen.triton.launcher import KernelCall

MAX_HEAD_DIM = 128  # dK, dV, K, V tiles and the q / dO tiles share the SM: larger would spill

SOURCE = r'''
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # libdevice tanh is unavailable under the interpreter; this form saturates cleanly to +-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _load_rows(ptr, offs_r, n_rows, offs_c, n_cols: tl.constexpr, UPCAST: tl.constexpr):
    """Rows offs_r (< n_rows) of a contiguous [rows, n_cols] matrix; out of range reads 0."""
    b_x = tl.load(ptr + offs_r[:, None] * n_cols + offs_c[None, :],
                  mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < n_cols), other=0.0)
    if UPCAST:
        b_x = b_x.to(tl.float32)
    return b_x


@triton.jit
def _kv_blocks(m0, offset, win_left, win_right, Q_LEN, KV_LEN, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_LEFT: tl.constexpr, HAS_UPPER: tl.constexpr):
    """[lo, hi): the KV blocks the Q tile starting at m0 can see (causal / window limits), aligned to
    BLOCK_N; the LSE forward and the dQ kernel walk the same range."""
    lo_key = 0
    hi_key = KV_LEN
    if HAS_LEFT:
        lo_key = tl.maximum(m0 + offset - win_left, 0)
    if HAS_UPPER:
        hi_key = tl.minimum(tl.maximum(tl.minimum(m0 + BLOCK_M, Q_LEN) - 1 + offset + win_right + 1, 0), KV_LEN)
    lo = (lo_key // BLOCK_N) * BLOCK_N
    hi = tl.maximum(((hi_key + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo)
    return lo, hi


@triton.jit
def _scores(b_q, b_k, p_mask_base, offs_m, offs_n, Q_LEN, KV_LEN, stride_mm, stride_mn,
            scale, softcap, offset, win_left, win_right,
            HAS_UPPER: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_MASK: tl.constexpr,
            MASK_IS_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(s, t): the scores in natural units with every mask applied (-inf), and tanh(x*scale/cap)
    (the softcap's chain-rule factor; s itself without a softcap)."""
    b_x = tl.dot(b_q, tl.trans(b_k), input_precision=INPUT_PRECISION) * scale
    if HAS_SOFTCAP:
        b_t = _tanh(b_x / softcap)
        b_s = softcap * b_t
    else:
        b_t = b_x
        b_s = b_x
    m_in = (offs_m[:, None] < Q_LEN) & (offs_n[None, :] < KV_LEN)
    if HAS_MASK:
        b_mk = tl.load(p_mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn, mask=m_in, other=0)
        if MASK_IS_BOOL:
            b_s = tl.where(b_mk != 0, b_s, float("-inf"))
        else:
            b_s = b_s + b_mk.to(tl.float32)
    rel = offs_n[None, :] - offs_m[:, None] - offset
    if HAS_UPPER:
        m_in = m_in & (rel <= win_right)
    if HAS_LEFT:
        m_in = m_in & (rel >= -win_left)
    return tl.where(m_in, b_s, float("-inf")), b_t


@triton.jit
def _dscores(b_s, b_t, b_dp, b_lse, b_delta, scale, SIGMOID: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """(p, dS, dx): probabilities, the gradient at s (a learned mask's) and at x = q . k."""
    if SIGMOID:
        b_p = 1.0 / (1.0 + tl.exp(-b_s))
        b_ds = b_dp * b_p * (1.0 - b_p)
    else:
        b_p = tl.exp(b_s - b_lse[:, None])
        b_ds = b_p * (b_dp - b_delta[:, None])
    if HAS_SOFTCAP:
        b_dx = b_ds * (scale * (1.0 - b_t * b_t))
    else:
        b_dx = b_ds * scale
    return b_p, b_ds, b_dx


@triton.jit
def _row_stats(LSE, DELTA, row0, offs_m, Q_LEN, BLOCK_M: tl.constexpr, SIGMOID: tl.constexpr):
    """lse (a dead row's -inf read as +inf, padding rows +inf: p = 0 there) and delta of Q rows."""
    m_m = offs_m < Q_LEN
    if SIGMOID:
        b_lse = tl.zeros([BLOCK_M], dtype=tl.float32)
        b_delta = b_lse
    else:
        b_lse = tl.load(LSE + row0 + offs_m, mask=m_m, other=float("inf"))
        b_lse = tl.where(b_lse == float("-inf"), float("inf"), b_lse)
        b_delta = tl.load(DELTA + row0 + offs_m, mask=m_m, other=0.0)
    return b_lse, b_delta


@triton.jit
def attn_fwd_lse_kernel(
    Q, K, V, MASK, O, LSE, stride_mb, stride_mh, stride_mm, stride_mn,
    H, Q_LEN, KV_LEN, scale, softcap, offset, win_left, win_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_UPPER: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Softmax attention forward (online softmax, natural units) writing o (fp32) and lse."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // H
    off_hkv = (pid_bh % H) // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kv_bh = off_b * (H // GROUP) + off_hkv
    b_q = _load_rows(Q + pid_bh * Q_LEN * HEAD_DIM, offs_m, Q_LEN, offs_d, HEAD_DIM, UPCAST)
    p_mask_base = MASK + off_b * stride_mb + (pid_bh % H) * stride_mh
    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo, hi = _kv_blocks(m0, offset, win_left, win_right, Q_LEN, KV_LEN, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_UPPER)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        b_k = _load_rows(K + kv_bh * KV_LEN * HEAD_DIM, offs_n, KV_LEN, offs_d, HEAD_DIM, UPCAST)
        b_v = _load_rows(V + kv_bh * KV_LEN * HEAD_DIM_V, offs_n, KV_LEN, offs_dv, HEAD_DIM_V, UPCAST)
        b_s, b_t = _scores(b_q, b_k, p_mask_base, offs_m, offs_n, Q_LEN, KV_LEN, stride_mm, stride_mn,
                           scale, softcap, offset, win_left, win_right, HAS_UPPER, HAS_LEFT, HAS_MASK,
                           MASK_IS_BOOL, HAS_SOFTCAP, INPUT_PRECISION)
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        # A fully masked row keeps max -inf; subtract 0 instead so exp gives 0, not NaN.
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_p = tl.exp(b_s - b_m_safe[:, None])
        b_alpha = tl.exp(b_m - b_m_safe)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=INPUT_PRECISION)
        b_m = b_m_new
    b_o = b_acc / tl.maximum(b_l, 1.17549435e-38)[:, None]
    b_lse = tl.where(b_l > 0.0, b_m + tl.log(tl.maximum(b_l, 1.17549435e-38)), float("-inf"))
    m_m = offs_m < Q_LEN
    tl.store(O + pid_bh * Q_LEN * HEAD_DIM_V + offs_m[:, None] * HEAD_DIM_V + offs_dv[None, :], b_o,
             mask=m_m[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(LSE + pid_bh * Q_LEN + offs_m, b_lse, mask=m_m)


@triton.jit
def attn_bwd_pre_kernel(O, DO, DELTA, Q_LEN, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                        BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * o) in fp32."""
    pid_bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    b_o = _load_rows(O + pid_bh * Q_LEN * HEAD_DIM_V, offs_m, Q_LEN, offs_dv, HEAD_DIM_V, True)
    b_do = _load_rows(DO + pid_bh * Q_LEN * HEAD_DIM_V, offs_m, Q_LEN, offs_dv, HEAD_DIM_V, True)
    tl.store(DELTA + pid_bh * Q_LEN + offs_m, tl.sum(b_o * b_do, 1), mask=offs_m < Q_LEN)


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, MASK, DO, LSE, DELTA, DK, DV, DS, stride_mb, stride_mh, stride_mm, stride_mn,
    H, Q_LEN, KV_LEN, scale, softcap, offset, win_left, win_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_UPPER: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, SIGMOID: tl.constexpr, WRITE_DS: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dK, dV of one KV tile, summed over the KV head's query group; dS per element if WRITE_DS."""
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1).to(tl.int64)
    HKV = H // GROUP
    off_b = pid_bkv // HKV
    off_hkv = pid_bkv % HKV
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b_k = _load_rows(K + pid_bkv * KV_LEN * HEAD_DIM, offs_n, KV_LEN, offs_d, HEAD_DIM, UPCAST)
    b_v = _load_rows(V + pid_bkv * KV_LEN * HEAD_DIM_V, offs_n, KV_LEN, offs_dv, HEAD_DIM_V, UPCAST)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # Queries that may see a key of this tile: j - i - offset in [-win_left, win_right].
    lo_q = 0
    hi_q = Q_LEN
    if HAS_UPPER:
        lo_q = tl.maximum(n0 - offset - win_right, 0)
    if HAS_LEFT:
        hi_q = tl.minimum(tl.maximum(tl.minimum(n0 + BLOCK_N, KV_LEN) - 1 - offset + win_left + 1, 0), Q_LEN)
    lo = (lo_q // BLOCK_M) * BLOCK_M
    hi = tl.maximum(((hi_q + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
    for g in range(0, GROUP):
        off_h = off_hkv * GROUP + g
        bh = off_b * H + off_h
        p_mask_base = MASK + off_b * stride_mb + off_h * stride_mh
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            b_q = _load_rows(Q + bh * Q_LEN * HEAD_DIM, offs_m, Q_LEN, offs_d, HEAD_DIM, UPCAST)
            b_do = _load_rows(DO + bh * Q_LEN * HEAD_DIM_V, offs_m, Q_LEN, offs_dv, HEAD_DIM_V, UPCAST)
            b_lse, b_delta = _row_stats(LSE, DELTA, bh * Q_LEN, offs_m, Q_LEN, BLOCK_M, SIGMOID)
            b_s, b_t = _scores(b_q, b_k, p_mask_base, offs_m, offs_n, Q_LEN, KV_LEN, stride_mm, stride_mn,
                               scale, softcap, offset, win_left, win_right, HAS_UPPER, HAS_LEFT, HAS_MASK,
                               MASK_IS_BOOL, HAS_SOFTCAP, INPUT_PRECISION)
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=INPUT_PRECISION)
            b_p, b_ds, b_dx = _dscores(b_s, b_t, b_dp, b_lse, b_delta, scale, SIGMOID, HAS_SOFTCAP)
            b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=INPUT_PRECISION)
            b_dk += tl.dot(tl.trans(b_dx.to(b_q.dtype)), b_q, input_precision=INPUT_PRECISION)
            if WRITE_DS:
                p_ds = DS + bh * Q_LEN * KV_LEN + offs_m[:, None] * KV_LEN + offs_n[None, :]
                tl.store(p_ds, b_ds, mask=(offs_m[:, None] < Q_LEN) & (offs_n[None, :] < KV_LEN))
    m_n = offs_n[:, None] < KV_LEN
    tl.store(DK + pid_bkv * KV_LEN * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
             b_dk.to(DK.dtype.element_ty), mask=m_n & (offs_d[None, :] < HEAD_DIM))
    tl.store(DV + pid_bkv * KV_LEN * HEAD_DIM_V + offs_n[:, None] * HEAD_DIM_V + offs_dv[None, :],
             b_dv.to(DV.dtype.element_ty), mask=m_n & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, MASK, DO, LSE, DELTA, DQ, stride_mb, stride_mh, stride_mm, stride_mn,
    H, Q_LEN, KV_LEN, scale, softcap, offset, win_left, win_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_UPPER: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, SIGMOID: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dQ of one Q tile over the KV tiles of its band."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    off_b = pid_bh // H
    off_h = pid_bh % H
    kv_bh = off_b * (H // GROUP) + off_h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b_q = _load_rows(Q + pid_bh * Q_LEN * HEAD_DIM, offs_m, Q_LEN, offs_d, HEAD_DIM, UPCAST)
    b_do = _load_rows(DO + pid_bh * Q_LEN * HEAD_DIM_V, offs_m, Q_LEN, offs_dv, HEAD_DIM_V, UPCAST)
    b_lse, b_delta = _row_stats(LSE, DELTA, pid_bh * Q_LEN, offs_m, Q_LEN, BLOCK_M, SIGMOID)
    p_mask_base = MASK + off_b * stride_mb + off_h * stride_mh
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _kv_blocks(m0, offset, win_left, win_right, Q_LEN, KV_LEN, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_UPPER)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        b_k = _load_rows(K + kv_bh * KV_LEN * HEAD_DIM, offs_n, KV_LEN, offs_d, HEAD_DIM, UPCAST)
        b_v = _load_rows(V + kv_bh * KV_LEN * HEAD_DIM_V, offs_n, KV_LEN, offs_dv, HEAD_DIM_V, UPCAST)
        b_s, b_t = _scores(b_q, b_k, p_mask_base, offs_m, offs_n, Q_LEN, KV_LEN, stride_mm, stride_mn,
                           scale, softcap, offset, win_left, win_right, HAS_UPPER, HAS_LEFT, HAS_MASK,
                           MASK_IS_BOOL, HAS_SOFTCAP, INPUT_PRECISION)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=INPUT_PRECISION)
        b_p, b_ds, b_dx = _dscores(b_s, b_t, b_dp, b_lse, b_delta, scale, SIGMOID, HAS_SOFTCAP)
        b_dq += tl.dot(b_dx.to(b_k.dtype), b_k, input_precision=INPUT_PRECISION)
    tl.store(DQ + pid_bh * Q_LEN * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             b_dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Q_LEN) & (offs_d[None, :] < HEAD_DIM))
'''

KERNELS = ("attn_fwd_lse_kernel", "attn_bwd_pre_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel")
_MODULES: dict[bool, types.ModuleType] = {}


def kernels() -> types.ModuleType:
    """The module holding KERNELS, run from SOURCE (one per interpreter mode: triton.jit reads the
    flag when it decorates)."""
    interp = generator.interpreter_active()
    if interp not in _MODULES:
        filename = f"<attnopt generated attention_backward{'_interp' if interp else ''}.py>"
        # triton.jit reads its function's source through inspect / linecache: hand it the text.
        linecache.cache[filename] = (len(SOURCE), None, SOURCE.splitlines(keepends=True), filename)
        name = f"attnopt_generated.attention_backward{'_interp' if interp else ''}"
        module = types.ModuleType(name)
        module.__file__ = filename
        sys.modules[name] = module
        exec(compile(SOURCE, filename, "exec"), module.__dict__)  # noqa: S102  our own source text
        _MODULES[interp] = module
    return _MODULES[interp]


# ---- host side ---------------------------------------------------------------------------------

def can_run(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams
            ) -> tuple[bool, str]:
    """Whether these kernels compute this call's gradients (the dense forward family's check, and
    a head dim the backward's tiles hold)."""
    ok, why = launcher.can_run_dense(q, k, v, attn_mask, params)
    if ok and max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        ok, why = False, f"head dim {max(q.shape[-1], v.shape[-1])} > {MAX_HEAD_DIM} (backward tiles)"
    return ok, why


@dataclass(frozen=True)
class Tiles:
    """block_m x block_n: the Q tile and KV step of the LSE forward and dQ; block_n x dkdv_block_m:
    the KV tile and Q step of dK/dV (it holds k, v, dk, dv for the whole loop, so its Q step is
    smaller)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    dkdv_block_m: int


def tiles(q: Tensor) -> Tiles:
    """The first candidate (what aot.py compiles, and what runs untuned), chosen by compiling for
    sm_90 (aot.py's resource rows): 32 under the interpreter (few numpy steps at test sizes).
    fp16/bf16: 64 x 64 (wgmma) and a dK/dV Q step of 32, no spills at head dim 128 (64 x 64 dK/dV
    spilled 328 bytes). fp32 (ieee FMA dots, no tensor cores): 16 x 32 and 16, no spills at head
    dim 80 (64 x 64 spilled kilobytes, 32 x 32 dQ 288 bytes)."""
    return candidates(q)[0]


def candidates(q: Tensor) -> list[Tiles]:
    """The tile configs the backward is tuned over on a GPU, `tiles(q)` first. The others trade
    the Q tile against pipelining depth and warps (each compiles for sm_90: aot.py's
    TUNING_CANDIDATE_SPECS rows); the interpreter has one (nothing to time there)."""
    if generator.interpreter_active():
        return [Tiles(32, 32, 4, 1, 32)]
    if q.dtype == torch.float32:
        # 16 x 64 was tried and left out: its dK/dV kernel spilled 7 KB at head dim 80 (aot.py)
        return [Tiles(16, 32, 4, 1, 16), Tiles(32, 32, 8, 1, 16)]
    warps = 4 if q.shape[-1] <= 64 else 8
    # 64 x 32 was tried and left out: its dK/dV kernel's 32-row KV tile is below wgmma's 64 (aot.py
    # checks every half-precision dot reaches Hopper's tensor-core instruction)
    return [Tiles(64, 64, warps, 2, 32), Tiles(64, 64, warps, 3, 32), Tiles(128, 64, 8, 2, 32)]


_TUNED: dict[str, object] = {}  # tuning key hash -> tiles (autotune.fastest's memory)


def tuned_tiles(key: dict, cands: list, run):
    """The fastest of `cands` for `key` (memory, then disk, then timing `run(tiles)` with triton's
    do_bench), as the forward's configs are tuned (autotune.fastest: a candidate that fails to
    compile is skipped; the disk entry is plain JSON). One candidate, or ATTNOPT_AUTOTUNE=0: the
    first, untimed. `key` must hold bucketed lengths (autotune.bucket), so a growing sequence
    tunes once per power of two."""
    import dataclasses

    import triton

    from attnopt.codegen import autotune

    if len(cands) == 1 or not autotune.enabled():
        return cands[0]
    cls = type(cands[0])

    def decode(d):  # JSON gives lists where the tiles hold tuples
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    key = {**key, "triton": triton.__version__}
    return autotune.fastest(key, cands, lambda c: launcher._bench(lambda: run(c)), subdir="triton",
                            encode=dataclasses.asdict, decode=decode, memo=_TUNED)


def _pow2(x: int) -> int:
    return max(16, 1 << (int(x) - 1).bit_length())


def backward_calls(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                   params: AttentionParams, needs: tuple[bool, ...] | list[bool] = (True, True, True, False),
                   cfg: Tiles | None = None) -> tuple[list[tuple[str, KernelCall]], dict[str, Tensor]]:
    """The launches, built but not run (aot.py compiles them), in order, and the buffers they write
    (dq, dk, dv, ds: ds only when a float mask's gradient is needed). Inputs must be contiguous."""
    mod = kernels()
    cfg = cfg or tiles(q)
    B, H, Sq, D = q.shape
    Hkv, Skv, Dv = k.shape[1], k.shape[2], v.shape[3]
    sigmoid = params.normalizer == "sigmoid"
    interp = generator.interpreter_active()
    m = attn_mask
    if m is None:
        m, ms = q, (0, 0, 0, 0)
    else:
        while m.dim() < 4:
            m = m.unsqueeze(0)
        m = m.expand(B, H, Sq, Skv)
        ms = tuple(int(s) if n > 1 else 0 for s, n in zip(m.stride(), m.shape))
    left, right = params.window if params.window is not None else (None, None)
    upper = (0 if right is None else min(right, 0)) if params.causal else right
    scalars = (H, Sq, Skv, float(params.scale), float(params.softcap or 0.0),
               int(alignment_offset(Sq, Skv, params.causal_alignment)), int(left or 0), int(upper or 0))
    flags = dict(GROUP=H // Hkv, HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv),
                 BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_UPPER=upper is not None,
                 HAS_LEFT=left is not None, HAS_MASK=attn_mask is not None,
                 MASK_IS_BOOL=attn_mask is not None and attn_mask.dtype == torch.bool,
                 HAS_SOFTCAP=params.softcap is not None,
                 UPCAST=interp and q.dtype == torch.bfloat16,
                 INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    f32 = dict(dtype=torch.float32, device=q.device)
    lse = torch.empty((B, H, Sq), **f32)
    delta = torch.empty((B, H, Sq), **f32)
    grid_q = (-(-Sq // cfg.block_m), B * H)
    calls: list[tuple[str, KernelCall]] = []

    def call(name, grid, args, constexprs, out):
        calls.append((name, KernelCall(getattr(mod, name), grid, args, constexprs, cfg.num_warps,
                                       cfg.num_stages, out)))

    if not sigmoid:  # sigmoid's gradient needs neither lse nor delta
        o = torch.empty((B, H, Sq, Dv), **f32)
        call("attn_fwd_lse_kernel", grid_q, (q, k, v, m, o, lse, *ms, *scalars), flags, o)
        call("attn_bwd_pre_kernel", grid_q, (o, grad_out, delta, Sq),
             dict(HEAD_DIM_V=Dv, BLOCK_DV=_pow2(Dv), BLOCK_M=cfg.block_m), delta)
    needs = list(needs) + [False] * (4 - len(needs))
    write_ds = bool(needs[3]) and attn_mask is not None and attn_mask.is_floating_point()
    bufs: dict[str, Tensor] = {}
    per_group = dict(flags, SIGMOID=sigmoid)
    if needs[1] or needs[2] or write_ds:
        bufs["dk"], bufs["dv"] = torch.empty_like(k), torch.empty_like(v)
        bufs["ds"] = torch.zeros((B, H, Sq, Skv), **f32) if write_ds else lse
        call("attn_bwd_dkdv_kernel", (-(-Skv // cfg.block_n), B * Hkv),
             (q, k, v, m, grad_out, lse, delta, bufs["dk"], bufs["dv"], bufs["ds"], *ms, *scalars),
             dict(per_group, WRITE_DS=write_ds, BLOCK_M=cfg.dkdv_block_m), bufs["dk"])
        if not write_ds:
            del bufs["ds"]
    if needs[0]:
        bufs["dq"] = torch.empty_like(q)
        call("attn_bwd_dq_kernel", grid_q, (q, k, v, m, grad_out, lse, delta, bufs["dq"], *ms, *scalars),
             per_group, bufs["dq"])
    return calls, bufs


def _tune_key(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
              needs) -> dict:
    """What the backward's best tiles depend on: dtype, head counts and dims, the lengths bucketed
    (autotune.bucket), which mask, the params (causal, window, softcap, normalizer), which
    gradients, the device."""
    from attnopt.codegen import autotune

    B, H, Sq, D = q.shape
    return {"kernel": "attention_backward", "dtype": str(q.dtype).replace("torch.", ""), "batch": B,
            "heads": H, "kv_heads": k.shape[1], "q_len": autotune.bucket(Sq), "kv_len": autotune.bucket(k.shape[2]),
            "head_dim": D, "v_head_dim": v.shape[3], "mask": mask_key(attn_mask), "causal": params.causal,
            "alignment": params.causal_alignment, "window": params.window is not None,
            "softcap": params.softcap is not None, "normalizer": params.normalizer,
            "needs": [bool(n) for n in needs], "device": generator.device_name(q.device)}


def mask_key(attn_mask: Tensor | None) -> list | None:
    """A mask as a tuning key sees it: its dtype and which dims it spans (not its sizes)."""
    if attn_mask is None:
        return None
    return [str(attn_mask.dtype).replace("torch.", ""), [int(n > 1) for n in attn_mask.shape]]


def reduce_to(ds: Tensor, mask: Tensor) -> Tensor:
    """dS [B, H, Sq, Skv] summed over the dims `mask` broadcasts over, in mask's shape and dtype."""
    lead = ds.dim() - mask.dim()
    g = ds.sum(dim=tuple(range(lead))) if lead else ds
    dims = tuple(i for i, n in enumerate(mask.shape) if n == 1 and g.shape[i] != 1)
    if dims:
        g = g.sum(dim=dims, keepdim=True)
    return g.reshape(mask.shape).to(mask.dtype).contiguous()


def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                       params: AttentionParams, needs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dmask) as autograd.attention_backward returns them (empty where not needed;
    the caller checked `can_run`)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out = grad_out.to(q.dtype).contiguous()
    needs = [bool(n) for n in needs] + [False] * (4 - len(needs))

    def run(cfg):
        calls, bufs = backward_calls(grad_out, q, k, v, attn_mask, params, needs, cfg)
        for _, c in calls:
            c.run()
        return bufs

    bufs = run(tuned_tiles(_tune_key(q, k, v, attn_mask, params, needs), candidates(q), run))
    if needs[3] and attn_mask is not None and attn_mask.is_floating_point():
        bufs["dmask"] = reduce_to(bufs["ds"], attn_mask)
    # A custom op's outputs may not alias each other: one fresh empty tensor per gradient not needed.
    return tuple(bufs[name] if name in bufs and n else q.new_empty(0)
                 for name, n in zip(("dq", "dk", "dv", "dmask"), needs))
