"""The compiled backward of the CPU tile kernels (cpu_tiles.c, attnopt_tiles_backward_f32) and the
autograd.Function that pairs it with the compiled forward (native.attend): a tile plan's attention,
differentiable, without SDPA per tile group.

Canonical layouts (as native.py): q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv] (unit stride
in the last dim), grad_out [B, H, Sq, Dv]; dq, dk, dv shaped like q, k, v (dk / dv summed over each KV
head's query group). The caller's attn_mask broadcastable to [B, H, Sq, Skv], bool or additive, read in
place; a mask that needs its own gradient (a learned bias) is not taken here (tiles.py keeps SDPA per
tile group for it). fp16 / bf16 are computed in fp32 and rounded once, as the forward does.

Why: the recomputation backward (codegen/autograd.py) differentiated SDPA per tile group, whose CPU
backward runs each tile's small GEMMs through autograd with masks as large as the scores. Here each tile
recomputes its queries' softmax whole (a tile holds every key its queries attend, so no log-sum-exp
from the forward is needed) and forms dS = P * (dP - rowsum(P * dP)) in cache; see cpu_tiles.c.

Exactness: the same function as the forward (each query's row from its owner tile only; the other tiles
holding it contribute nothing), summed in another order; tests/null/test_cpu_gna_backward.py checks it
against float64 autograd of the dense reference.
"""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from attnopt.codegen.cpu import native as cpu_native


def can_run(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None) -> tuple[bool, str]:
    """Whether the compiled forward + backward take these inputs (the caller has checked softmax
    without softcap)."""
    if attn_mask is not None and attn_mask.requires_grad:
        return False, "the mask needs a gradient (a learned bias)"
    if q.shape[3] % 8:
        return False, f"head dim {q.shape[3]} is not a multiple of 8"
    return cpu_native.can_run(q, k, v, False, attn_mask)


def _strides(x: Tensor):
    return (ctypes.c_int64 * 3)(*x.stride()[:3])


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, tiles: cpu_native.NativeTiles,
             attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in fp32, contiguous, of the tile attention of fp32 q, k, v (rows of queries in no
    tile get dq = 0: their rows are the caller's)."""
    lib = cpu_native._library()
    B, H, Sq, D = q.shape
    Hkv, Skv, Dv = k.shape[1], k.shape[2], v.shape[3]
    if grad_out.stride(3) != 1:
        grad_out = grad_out.contiguous()
    dq = torch.zeros((B, H, Sq, D), dtype=torch.float32)
    dk = torch.zeros((B, Hkv, Skv, D), dtype=torch.float32)
    dv = torch.zeros((B, Hkv, Skv, Dv), dtype=torch.float32)
    f = tiles  # short name for the long call below
    if f.n == 0:
        return dq, dk, dv
    um, um_float, ums, _keep = cpu_native._user_mask(attn_mask, B, H, Sq, Skv)
    strides = [_strides(x) for x in (q, k, v, grad_out)]
    threads = torch.get_num_threads() if lib.parallel else 1
    code = lib.attnopt_tiles_backward_f32(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), grad_out.data_ptr(), dq.data_ptr(), dk.data_ptr(),
        dv.data_ptr(), B, H, Hkv, Sq, Skv, D, Dv, *(ctypes.addressof(s) for s in strides),
        f.q_idx.data_ptr(), f.n, f.TQ, f.kv_idx.data_ptr(), f.TK, f.mask.data_ptr(), f.TQp, f.owner.data_ptr(), um, um_float, ctypes.addressof(ums), float(scale), threads)
    if code:
        raise RuntimeError(f"native CPU tile backward failed (code {code})")
    return dq, dk, dv


def _f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


class TileAttention(torch.autograd.Function):
    """out [B, H, Sq, Dv] = the compiled forward over a plan's tiles (rows of queries in no tile are
    left unset, as run_plan's); backward: the compiled backward. No double backward."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, scale, plan):
        out = torch.empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]), dtype=q.dtype)
        if q.dtype == torch.float32:
            cpu_native.attend(q, k, v, scale, plan.native_tiles, out, attn_mask)
        else:
            out32 = torch.empty(out.shape, dtype=torch.float32)
            cpu_native.attend(_f32(q), _f32(k), _f32(v), scale, plan.native_tiles, out32, attn_mask)
            out.copy_(out32)
        ctx.save_for_backward(q, k, v, attn_mask)
        ctx.scale, ctx.plan = scale, plan
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, attn_mask = ctx.saved_tensors
        scale = float(q.shape[3] ** -0.5 if ctx.scale is None else ctx.scale)
        dq, dk, dv = backward(_f32(grad_out), _f32(q), _f32(k), _f32(v), scale, ctx.plan.native_tiles,
                              attn_mask)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float | None, plan) -> Tensor:
    """The tile plan's attention with the compiled backward attached (`can_run` said yes)."""
    return TileAttention.apply(q, k, v, attn_mask, scale, plan)
