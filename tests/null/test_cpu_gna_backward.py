"""The compiled CPU tile backward (attnopt.codegen.cpu.native_backward / cpu_tiles.c
attnopt_tiles_backward_f32) against float64 autograd of the dense reference with the layout's mask.

Layouts: q [B, H, S, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], grad_out [B, H, S, Dv]; GNA tokens are the
row-major flattened grid, after `leading` and before `trailing` global tokens in the op's form; masks
broadcastable to [B, H, S, S]. Errors are relative to the largest reference gradient of each input.
Every test checks that the compiled backward actually ran (a silent fallback would test SDPA instead).
"""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

from attnopt.codegen.cpu import native_backward
from attnopt.codegen.cpu import tiles as cpu
from attnopt.codegen.gna_exact import and_mask, full_mask
from attnopt.codegen.gna_op import gna_attention_op
from attnopt.codegen.params import AttentionParams
from attnopt.ir import GNALayout

HAS_CC = shutil.which(os.environ.get("CC") or "cc") is not None
pytestmark = pytest.mark.skipif(not HAS_CC, reason="no C compiler: the native kernel cannot be built here")
TOL = 2e-5


@pytest.fixture
def calls(monkeypatch):
    """How many times the compiled backward ran."""
    n = [0]
    real = native_backward.backward

    def counted(*a, **kw):
        n[0] += 1
        return real(*a, **kw)

    monkeypatch.setattr(native_backward, "backward", counted)
    return n


def _inputs(B, H, Hkv, S, D, Dv, seed, layout="bhsd"):
    """q, k, v needing grad, and grad_out; layout "bshd" gives non-contiguous [B, H, S, D] views of
    [B, S, H, D] storage (what a model's projection reshaped without a copy passes)."""
    g = torch.Generator().manual_seed(seed)

    def make(h, d):
        if layout == "bshd":
            return torch.randn(B, S, h, d, generator=g).transpose(1, 2)
        return torch.randn(B, h, S, d, generator=g)

    q, k, v = make(H, D), make(Hkv, D), make(Hkv, Dv)
    return [x.requires_grad_() for x in (q, k, v)], make(H, Dv)


def _reference(q, k, v, allowed, grad_out, scale):
    """float64 (dq, dk, dv) of dense attention with `allowed` (bool, or float additive; -inf = not)."""
    xs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    group = q.shape[1] // k.shape[1]
    kk, vv = (x.repeat_interleave(group, 1) for x in xs[1:])
    s = (xs[0] @ kk.transpose(-1, -2)) * scale
    if allowed.dtype == torch.bool:
        s = s.masked_fill(~allowed, float("-inf"))
    else:
        s = s + allowed.double()
    out = torch.softmax(s, -1).nan_to_num(0.0) @ vv
    return torch.autograd.grad(out, xs, grad_out.double())


def _rel_errors(got, want):
    return [((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]


def _check(got, want, tol=TOL):
    errs = _rel_errors(got, want)
    assert max(errs) <= tol, f"relative errors dq/dk/dv {errs}"


def _user_mask(kind, B, H, S, seed):
    g = torch.Generator().manual_seed(seed + 7)
    if kind == "bool":  # padding-like, keeping the diagonal so no row goes dead
        return (torch.rand(B, 1, S, S, generator=g) < 0.8) | torch.eye(S, dtype=torch.bool)
    if kind == "float":  # a fixed additive bias (no gradient of its own)
        return torch.randn(1, H, S, S, generator=g)
    return None


CASES = {
    # name: (layout, q_tile, leading, trailing, (B, H, Hkv, D, Dv), mask kind, input layout)
    "odd_2d": (GNALayout((12, 10), (5, 5)), (4, 4), 0, 0, (2, 4, 2, 16, 16), None, "bhsd"),
    "odd_2d_box_3x5_dv8": (GNALayout((11, 9), (4, 6)), (3, 5), 0, 0, (1, 2, 1, 8, 24), None, "bhsd"),
    "strided_dilated": (GNALayout((12, 12), (4, 5), (2, 3), (2, 1)), (4, 4), 0, 0, (1, 3, 3, 16, 8), None, "bhsd"),
    "causal_2d": (GNALayout((9, 10), (5, 4), (1, 1), (1, 1), (True, False)), (4, 4), 0, 0, (2, 2, 2, 8, 8),
                  None, "bhsd"),
    "causal_1d": (GNALayout((70,), (17,), (1,), (1,), (True,)), (16,), 0, 0, (1, 2, 1, 16, 16), None, "bhsd"),
    "3d": (GNALayout((4, 6, 5), (3, 3, 3)), (2, 4, 4), 0, 0, (1, 2, 2, 8, 8), None, "bhsd"),
    "leading_trailing": (GNALayout((8, 9), (3, 5)), (4, 4), 2, 3, (1, 4, 2, 16, 16), None, "bhsd"),
    "bool_mask_strided_inputs": (GNALayout((10, 10), (5, 3)), (4, 4), 0, 0, (2, 2, 1, 16, 16), "bool", "bshd"),
    "float_mask": (GNALayout((10, 7), (4, 4)), (4, 8), 1, 0, (1, 2, 2, 16, 16), "float", "bhsd"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_gradients_match_float64(name, calls):
    layout, q_tile, leading, trailing, (B, H, Hkv, D, Dv), mask_kind, io = CASES[name]
    S = leading + math.prod(layout.shape) + trailing
    (q, k, v), grad_out = _inputs(B, H, Hkv, S, D, Dv, seed=len(name), layout=io)
    mask = _user_mask(mask_kind, B, H, S, seed=len(name))
    p = AttentionParams(scale=D ** -0.5)
    out = cpu.gna_attention(q, k, v, layout, p, mask, q_tile=q_tile, leading=leading, trailing=trailing)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    assert calls[0] == 1
    want = _reference(q, k, v, and_mask(mask, full_mask(layout, leading, trailing)), grad_out, p.scale)
    _check(got, want)


def test_the_op_backward_runs_the_kernel(calls):
    """attnopt::gna_attention's backward (its recomputation) reaches the compiled backward, also with
    a head selection (the other heads exact) and global tokens."""
    layout = GNALayout((10, 12), (5, 7))
    leading, trailing, B, H, D = 1, 2, 2, 4, 16
    S = leading + 120 + trailing
    (q, k, v), grad_out = _inputs(B, H, H, S, D, D, seed=3)
    out = gna_attention_op(q, k, v, None, scale=0.3, layout=layout, leading=leading, heads=(0, 2),
                           trailing=trailing)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    assert calls[0] >= 1
    allowed = full_mask(layout, leading, trailing).expand(B, H, S, S).clone()
    allowed[:, [1, 3]] = True  # the heads outside the selection are exact (dense)
    _check(got, _reference(q, k, v, allowed, grad_out, 0.3))


def test_sliding_window_gradients(calls):
    """The 1-D window plan (bounded causal window, bottom-right aligned, Sq < Skv) through the same kernel."""
    B, H, Hkv, Sq, Skv, D = 1, 4, 2, 90, 130, 16
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, Sq, D, generator=g).requires_grad_()
    k, v = (torch.randn(B, Hkv, Skv, D, generator=g).requires_grad_() for _ in range(2))
    grad_out = torch.randn(B, H, Sq, D, generator=g)
    p = AttentionParams(scale=0.25, causal=True, causal_alignment="bottom_right", window=(23, 0))
    out = cpu.sliding_window_attention(q, k, v, p, q_tile=32)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    assert calls[0] == 1
    i = torch.arange(Sq)[:, None] + (Skv - Sq)
    j = torch.arange(Skv)[None, :]
    _check(got, _reference(q, k, v, (j <= i) & (j >= i - 23), grad_out, 0.25))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_split_is_exact_and_deterministic(threads, calls):
    """Work ranges that cut (batch, kv head) slices in the middle go through private dk/dv copies:
    the same result for any thread count, bit for bit across runs."""
    layout = GNALayout((13, 11), (6, 5))
    (q, k, v), grad_out = _inputs(3, 2, 1, 143, 8, 8, seed=11)
    p = AttentionParams(scale=0.4)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = [torch.autograd.grad(cpu.gna_attention(q, k, v, layout, p, q_tile=(4, 4)), (q, k, v), grad_out)
                for _ in range(2)]
    finally:
        torch.set_num_threads(old)
    assert calls[0] == 2
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    _check(runs[0], _reference(q, k, v, full_mask(layout, 0), grad_out, 0.4))


def test_half_precision_inputs(calls):
    layout = GNALayout((8, 8), (3, 3))
    (q, k, v), grad_out = _inputs(1, 2, 2, 64, 16, 16, seed=2)
    q, k, v = (x.detach().bfloat16().requires_grad_() for x in (q, k, v))
    out = cpu.gna_attention(q, k, v, layout, AttentionParams(scale=0.25), q_tile=(4, 4))
    got = torch.autograd.grad(out, (q, k, v), grad_out.bfloat16())
    assert calls[0] == 1 and all(x.dtype == torch.bfloat16 for x in got)
    want = _reference(q.float(), k.float(), v.float(), full_mask(layout, 0), grad_out.bfloat16().float(), 0.25)
    _check([x.float() for x in got], want, tol=2e-2)


def test_near_miss_does_not_match(calls):
    """The check discriminates: gradients of a window one smaller, or of the layout with a query's
    row written by two tiles (overlapping border tiles without owners), miss the reference."""
    layout = GNALayout((12, 10), (5, 5))
    (q, k, v), grad_out = _inputs(1, 2, 2, 120, 16, 16, seed=4)
    p = AttentionParams(scale=0.25)
    want = _reference(q, k, v, full_mask(layout, 0), grad_out, p.scale)
    smaller = GNALayout((12, 10), (5, 4))
    got = torch.autograd.grad(cpu.gna_attention(q, k, v, smaller, p, q_tile=(4, 4)), (q, k, v), grad_out)
    assert max(_rel_errors(got, want)) > 100 * TOL
    plan = cpu.gna_plan(layout, (5, 4))  # 12 rows in tiles of 5: the last tile overlaps its neighbour
    tiles = plan.native_tiles
    assert int(tiles.owner.sum()) < tiles.owner.numel()
    saved = tiles.owner.clone()
    try:
        tiles.owner.fill_(1)
        got = native_backward.backward(grad_out, q.detach(), k.detach(), v.detach(), p.scale, tiles)
    finally:
        tiles.owner.copy_(saved)
    assert max(_rel_errors(got, want)) > 100 * TOL


def test_a_mask_that_needs_its_gradient_stays_on_sdpa(calls):
    layout = GNALayout((8, 8), (3, 3))
    (q, k, v), grad_out = _inputs(1, 2, 2, 64, 16, 16, seed=6)
    bias = torch.zeros(1, 2, 64, 64, requires_grad=True)
    ok, why = native_backward.can_run(q, k, v, bias)
    assert not ok and "gradient" in why
    out = cpu.gna_attention(q, k, v, layout, AttentionParams(scale=0.25), bias, q_tile=(4, 4))
    torch.autograd.grad(out, (q, k, v, bias), grad_out)
    assert calls[0] == 0


def test_dead_rows_and_a_large_scale(calls):
    """Rows whose every key the caller's mask removes give zeros and send back nothing; scale 8 makes
    the softmax nearly one-hot (the exp's range reduction and the max subtraction matter)."""
    layout = GNALayout((9, 9), (4, 4))
    (q, k, v), grad_out = _inputs(1, 2, 1, 81, 16, 16, seed=9)
    mask = torch.ones(1, 1, 81, 81, dtype=torch.bool)
    mask[..., [3, 40, 77], :] = False
    p = AttentionParams(scale=8.0)
    out = cpu.gna_attention(q, k, v, layout, p, mask, q_tile=(4, 4))
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    assert calls[0] == 1
    assert torch.equal(out[..., [3, 40, 77], :], torch.zeros_like(out[..., [3, 40, 77], :]))
    assert got[0][..., [3, 40, 77], :].abs().max() == 0
    _check(got, _reference(q, k, v, and_mask(mask, full_mask(layout, 0)), grad_out, 8.0))
