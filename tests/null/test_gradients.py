"""Gradients are exact or absent: dQ/dK/dV (and a learned bias's) of every differentiable path of
attnopt.attention against float64 autograd through the dense reference with the layout's own mask;
paths that cannot differentiate raise.

Layouts: q [B, H, S, D], k/v [B, Hkv, S, D]; GNA tokens are the row-major flattened grid (after
`leading` global tokens in the op's form); mask / bias [1 | B, 1 | H, S, S].
Errors are relative to the largest reference gradient of each input (1e-5 for fp32 inputs), with a
floor at 4x the error of dense fp32 attention itself (tiny problems have tiny, cancelling gradients).
"""
from __future__ import annotations

import math

import pytest
from gna_strategies import layouts
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F

import attnopt
from attnopt.codegen.cpu import tiles as cpu
from attnopt.codegen.gna_exact import full_mask
from attnopt.codegen.gna_op import gna_attention_op
from attnopt.codegen.params import AttentionParams
from attnopt.codegen.reference import reference_attention, structural_mask
from attnopt.sparsity.gna import dense_mask
from attnopt.ir import GNALayout

TOL = 1e-5


def _inputs(B, H, Hkv, Sq, Skv, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).requires_grad_()
            for shape in ((B, H, Sq, D), (B, Hkv, Skv, D), (B, Hkv, Skv, D))]


def _masks(kind: str, B, H, Sq, Skv, seed):
    """(mask, bias) for attnopt.attention: a bool padding-like mask that keeps the diagonal (no row
    goes dead), a learned float bias (needs its gradient), both, or neither."""
    g = torch.Generator().manual_seed(seed + 1)
    mask = bias = None
    if kind in ("bool", "both"):
        mask = (torch.rand(B, 1, Sq, Skv, generator=g) < 0.8) | torch.eye(Sq, Skv, dtype=torch.bool)
    if kind in ("bias", "both"):
        bias = torch.randn(1, H, Sq, Skv, generator=g).requires_grad_()
    return mask, bias


def _reference_grads(q, k, v, allowed, mask, bias, params: AttentionParams, grad_out):
    """[(float64 gradient, fp32 noise)] per input (q, k, v, bias if given) of the reference with the
    layout's bool `allowed` [Sq, Skv] (or None) AND the caller's mask, the bias added. The noise is
    how far dense fp32 attention (SDPA where it applies, as the CPU kernels run it) lands from the
    float64 gradient: the floor of what "exact" can mean for these inputs (tiny problems have tiny,
    cancelling gradients whose fp32 error is not small relative to themselves)."""
    keep = allowed
    if mask is not None:
        keep = mask if keep is None else mask & keep
    grads = []
    for dtype in (torch.float64, torch.float32):
        xs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, bias) if x is not None]
        m = keep
        if bias is not None:
            m = xs[3] if keep is None else torch.where(keep, xs[3], torch.tensor(float("-inf"), dtype=dtype))
        if dtype == torch.float32 and params.normalizer == "softmax" and params.softcap is None:
            m = _structural_and(m, params, q.shape[2], k.shape[2])
            out = F.scaled_dot_product_attention(*xs[:3], attn_mask=m, scale=params.scale,
                                                 enable_gqa=q.shape[1] != k.shape[1])
        else:
            out = reference_attention(*xs[:3], m, **params.kwargs())
        out.backward(grad_out.to(dtype))
        grads.append([x.grad for x in xs])
    return [(w, (n.double() - w).abs().max().item()) for w, n in zip(*grads)]


def _structural_and(m, params: AttentionParams, Sq, Skv):
    """m with the params' causal / window limits folded in (SDPA takes one mask)."""
    allowed = structural_mask(Sq, Skv, causal=params.causal, causal_alignment=params.causal_alignment,
                              window=params.window)
    if allowed is None:
        return m
    if m is None:
        return allowed
    if m.dtype == torch.bool:
        return m & allowed
    return torch.where(allowed, m, torch.tensor(float("-inf"), dtype=m.dtype))


def _check(out, q, k, v, bias, want, grad_out, tol=TOL):
    """Each gradient within tol of the largest reference gradient, or within 4x dense fp32's noise."""
    out.backward(grad_out)
    got = [x.grad for x in (q, k, v, bias) if x is not None]
    # a gradient that is exactly zero in float64 (every row attends one key: the softmax is the
    # constant 1, so dq = dk = 0) is checked against the scale of the others, not against 0
    floor = 1e-6 * max(w.abs().max().item() for w, _ in want)
    for name, g, (w, noise) in zip("qkvb", got, want):
        assert g is not None, f"d{name} is missing"
        err, top = (g.double() - w).abs().max().item(), w.abs().max().item()
        assert err <= max(tol * top, 4 * noise, floor), \
            f"d{name}: {err:.2e} ({err / max(top, 1e-300):.2e} of the largest; fp32 noise {noise:.2e})"


def _gna_case(grid, window, *, stride=None, dilation=None, causal=False, heads=(2, 2), D=8,
              mask_kind="none", softcap=None, normalizer="softmax", backend="cpu", seed=0, tol=TOL):
    n = math.prod(grid)
    (H, Hkv), B = heads, 1 + seed % 2
    q, k, v = _inputs(B, H, Hkv, n, n, D, seed)
    mask, bias = _masks(mask_kind, B, H, n, n, seed)
    out = attnopt.attention(q, k, v, mask=mask, bias=bias, grid=grid, window=window, stride=stride,
                            dilation=dilation, causal=causal, softcap=softcap, normalizer=normalizer,
                            backend=backend)
    layout = attnopt.functional.gna_layout(grid, window, stride, dilation, causal)
    params = AttentionParams(scale=D ** -0.5, softcap=softcap, normalizer=normalizer)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 2))
    want = _reference_grads(q, k, v, torch.from_numpy(dense_mask(layout)), mask, bias, params, grad_out)
    _check(out, q, k, v, bias, want, grad_out, tol)


# ---- regressions -------------------------------------------------------------------------------

@pytest.mark.parametrize("grid, window", [((12, 10), 5), ((16, 16), 8), ((8, 8), 3)])
def test_issue_16_grids(grid, window):
    # (12, 10) / 5: the tuned tiles overlap at the border, and a row written by two tiles sent its
    # gradient back through both (dQ/dK/dV 50-100% of the largest off). The others tile the grid exactly.
    _gna_case(grid, window)


def test_issue_16_tiles_do_overlap():
    # what keeps the regression above meaningful: a query held by two tiles, written by one
    layout = GNALayout((12, 10), (5, 5))
    plan = cpu.gna_plan(layout, cpu.choose_gna_tile(layout))
    q_idx = plan.q_idx.reshape(-1)
    assert q_idx.numel() > q_idx.unique().numel()
    owners = torch.zeros(q_idx.max() + 1, dtype=torch.long).index_add_(0, q_idx, plan.own.reshape(-1).long())
    assert (owners == 1).all()


@pytest.mark.parametrize("q_tile", [(5, 3), (8, 8), (7, 10), (12, 4)])
@pytest.mark.parametrize("mask_kind", ["none", "bias"])
def test_overlapping_tiles_any_box(q_tile, mask_kind):
    # the kernel itself, each box: full and partial tiles overlapping in one SDPA call and across two
    layout = GNALayout((12, 10), (5, 5))
    q, k, v = _inputs(2, 4, 2, 120, 120, 8, seed=3)
    _, bias = _masks(mask_kind, 2, 4, 120, 120, seed=3)
    p = AttentionParams(scale=0.35)
    out = cpu.gna_attention(q, k, v, layout, p, bias, q_tile=q_tile)
    grad_out = torch.randn(out.shape)
    want = _reference_grads(q, k, v, torch.from_numpy(dense_mask(layout)), None, bias, p, grad_out)
    _check(out, q, k, v, bias, want, grad_out)


@pytest.mark.parametrize("S, q_tile", [(48, 32), (100, 32), (70, 64)])
def test_sliding_window_overlapping_runs(S, q_tile):
    # 48 / 32: the shifted last run continues the first one's stride, so both land in one call
    q, k, v = _inputs(1, 2, 1, S, S, 8, seed=4)
    p = AttentionParams(scale=0.35, window=(6, 3))
    out = cpu.sliding_window_attention(q, k, v, p, q_tile=q_tile)
    grad_out = torch.randn(out.shape)
    _check(out, q, k, v, None, _reference_grads(q, k, v, None, None, None, p, grad_out), grad_out)


def test_learned_bias_alone_over_two_calls():
    # q/k/v frozen, bias learned (the kernels then keep q/k/v out of the compiled forward-only kernel
    # and their gathered tiles out of the reused workspaces): two calls, then one backward
    layout = GNALayout((12, 10), (5, 5))
    q, k, v = (x.detach() for x in _inputs(1, 2, 2, 120, 120, 8, seed=5))
    bias = torch.randn(1, 2, 120, 120, requires_grad=True)
    p = AttentionParams(scale=0.35)
    outs = [cpu.gna_attention(q * s, k * s, v * s, layout, p, bias) for s in (1.0, 0.5)]
    grad_out = torch.randn(outs[0].shape)
    (outs[0] * grad_out + outs[1] * grad_out).sum().backward()
    want = torch.zeros_like(bias, dtype=torch.float64)
    for s in (1.0, 0.5):
        allowed = torch.from_numpy(dense_mask(layout))
        want += _reference_grads(q * s, k * s, v * s, allowed, None, bias, p, grad_out)[3][0]
    assert (bias.grad.double() - want).abs().max() <= TOL * want.abs().max()


def test_leading_global_tokens():
    layout = GNALayout((6, 5), (3, 3), (1, 1), (1, 1), (True, False))
    q, k, v = _inputs(1, 2, 1, 33, 33, 8, seed=6)
    p = AttentionParams(scale=0.35)
    out = cpu.gna_attention(q, k, v, layout, p, q_tile=(4, 4), leading=3)
    grad_out = torch.randn(out.shape)
    _check(out, q, k, v, None, _reference_grads(q, k, v, full_mask(layout, 3), None, None, p, grad_out), grad_out)


def test_triton_backend_refuses_gradients():
    # the generated kernels are forward only: their result would be cut off from the graph
    q, k, v = _inputs(1, 2, 2, 64, 64, 16, seed=7)
    with pytest.raises(RuntimeError, match="forward only"):
        attnopt.attention(q, k, v, grid=(8, 8), window=3, backend="triton")


@pytest.mark.parametrize("op", ["gna_attention", "attention"])
def test_custom_ops_have_gradients(op):
    # the rewrite's ops have autograd formulas (codegen/autograd.py; checked against float64 in
    # test_op_autograd.py): here only that backward runs and agrees with attnopt.attention's
    q, k, v = _inputs(1, 2, 2, 20, 20, 8, seed=8)
    if op == "gna_attention":
        out = gna_attention_op(q, k, v, None, scale=0.3, layout=GNALayout((4, 5), (3, 3)))
        ref = attnopt.attention(q, k, v, scale=0.3, grid=(4, 5), window=3)
    else:
        out = torch.ops.attnopt.attention(q, k, v, None, 0.3, True, "top_left", -1, -1, 0.0, "softmax")
        ref = attnopt.attention(q, k, v, scale=0.3, causal=True)
    g = torch.randn(out.shape)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---- properties --------------------------------------------------------------------------------

heads = st.sampled_from([(1, 1), (2, 2), (4, 2), (4, 1)])
mask_kinds = st.sampled_from(["none", "bool", "bias", "both"])
scores = st.sampled_from([(None, "softmax"), (None, "softmax"), (5.0, "softmax"), (None, "sigmoid")])


@settings(max_examples=30, deadline=None)
@given(layout=layouts(max_tokens=120), heads=heads, mask_kind=mask_kinds, score=scores,
       backend=st.sampled_from(["cpu", "auto", "reference"]), seed=st.integers(0, 2**16))
def test_gna_gradients(layout, heads, mask_kind, score, backend, seed):
    softcap, normalizer = score
    _gna_case(layout.shape, layout.window, stride=layout.stride, dilation=layout.dilation, causal=layout.causal,
              heads=heads, mask_kind=mask_kind, softcap=softcap, normalizer=normalizer, backend=backend, seed=seed)


@settings(max_examples=25, deadline=None)
@given(layout=layouts(max_tokens=120), heads=heads, data=st.data())
def test_gna_kernel_gradients_any_box(layout, heads, data):
    # the CPU kernel with each Q box (border tiles shifted over a neighbour) and leading global tokens
    q_tile = tuple(data.draw(st.integers(1, L)) for L in layout.shape)
    leading = data.draw(st.sampled_from([0, 0, 2]))
    bias_on = data.draw(st.booleans())
    S = leading + math.prod(layout.shape)
    (H, Hkv), seed = heads, data.draw(st.integers(0, 2**16))
    q, k, v = _inputs(1, H, Hkv, S, S, 8, seed)
    _, bias = _masks("bias" if bias_on else "none", 1, H, S, S, seed)
    p = AttentionParams(scale=0.35)
    out = cpu.gna_attention(q, k, v, layout, p, bias, q_tile=q_tile, leading=leading)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    _check(out, q, k, v, bias, _reference_grads(q, k, v, full_mask(layout, leading), None, bias, p, grad_out),
           grad_out)


@settings(max_examples=30, deadline=None)
@given(lens=st.tuples(st.integers(1, 70), st.integers(1, 70)), heads=heads,
       left=st.one_of(st.none(), st.integers(0, 20)), right=st.one_of(st.none(), st.integers(0, 20)),
       causal=st.booleans(), alignment=st.sampled_from(["top_left", "bottom_right"]),
       mask_kind=mask_kinds, score=scores, backend=st.sampled_from(["cpu", "auto", "reference"]),
       seed=st.integers(0, 2**16))
def test_sequence_gradients(lens, heads, left, right, causal, alignment, mask_kind, score, backend, seed):
    # no grid: 1-D sliding windows (the CPU kernel), causal and dense attention (SDPA / reference)
    (Sq, Skv), (H, Hkv) = lens, heads
    # every row keeps a key (no row goes dead): its aligned diagonal (Sq <= Skv), or with a mask
    # (which keeps j = i) j = i itself
    Sq = min(Sq, Skv) if mask_kind == "none" else Skv
    window = None if left is None and right is None else (left, right)
    q, k, v = _inputs(1, H, Hkv, Sq, Skv, 8, seed)
    mask, bias = _masks(mask_kind, 1, H, Sq, Skv, seed)
    softcap, normalizer = score
    out = attnopt.attention(q, k, v, mask=mask, bias=bias, causal=causal, causal_alignment=alignment,
                            window=window, softcap=softcap, normalizer=normalizer, backend=backend)
    p = AttentionParams(scale=8 ** -0.5, causal=causal, causal_alignment=alignment, window=window,
                        softcap=softcap, normalizer=normalizer)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    _check(out, q, k, v, bias, _reference_grads(q, k, v, None, mask, bias, p, grad_out), grad_out)
