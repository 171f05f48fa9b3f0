"""The dense-family Triton backward (codegen/triton/backward.py) on a real GPU vs float64 autograd of
the reference math (skipped without CUDA), at every tuning candidate (`backward.candidates`: the
GPU's tiles, 64 x 64 and others) and through the tuned path; the interpreter tests
(tests/null/test_triton_backward.py, test_backward_tuning.py) use 16/32-token tiles. Written
without a GPU (checked for collection only): run it on the first GPU task.

Layouts: q [B, H, Sq, D], k / v [B, Hkv, Skv, D], grad_out [B, H, Sq, Dv].
"""
from __future__ import annotations

import pytest
import torch

from attnopt.codegen.params import AttentionParams
from attnopt.codegen.triton import backward

DEV = "cuda"
TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # relative to the largest gradient

CASES = {
    # name: (params, (B, H, Hkv, Sq, Skv, D), mask kind, mask needs grad)
    "causal_gqa": (AttentionParams(scale=0.09, causal=True), (2, 8, 2, 700, 700, 128), None, False),
    "bottom_right_window": (AttentionParams(scale=0.1, causal=True, causal_alignment="bottom_right", window=(127, 0)),
                            (1, 4, 4, 300, 1000, 64), None, False),
    "padding_mask": (AttentionParams(scale=0.125), (2, 4, 4, 333, 333, 64), "bool", False),
    "bias_grad_softcap": (AttentionParams(scale=0.1, softcap=30.0), (1, 4, 2, 257, 257, 80), "bias", True),
}


def _reference(q, k, v, do, mask, params, mask_grad):
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    m = None if mask is None else (mask.double().requires_grad_(mask_grad) if mask.is_floating_point() else mask)
    G = q.shape[1] // k.shape[1]
    kk, vv = (x.repeat_interleave(G, 1) for x in xs[1:])
    s = xs[0] @ kk.transpose(-1, -2) * params.scale
    if params.softcap:
        s = torch.tanh(s / params.softcap) * params.softcap
    Sq, Skv = s.shape[-2:]
    i = torch.arange(Sq, device=DEV)[:, None] + (Skv - Sq if params.causal_alignment == "bottom_right" else 0)
    j = torch.arange(Skv, device=DEV)[None, :]
    keep = torch.ones(Sq, Skv, dtype=torch.bool, device=DEV)
    if params.causal:
        keep &= j <= i
    if params.window is not None and params.window[0] is not None:
        keep &= j >= i - params.window[0]
    s = s.masked_fill(~keep, float("-inf"))
    if m is not None:
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m
    out = torch.nan_to_num(s.softmax(-1)) @ vv
    return torch.autograd.grad(out, xs + ([m] if mask_grad else []), do.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_candidate_matches_float64(name, dtype):
    params, (B, H, Hkv, Sq, Skv, D), mask_kind, mask_grad = CASES[name]
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    q, k, v, do = mk(B, H, Sq, D) * 2.0, mk(B, Hkv, Skv, D), mk(B, Hkv, Skv, D), mk(B, H, Sq, D)
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand(B, 1, 1, Skv, generator=g) < 0.8).to(DEV)
        mask[..., 0] = True
    elif mask_kind == "bias":
        mask = torch.randn(1, H, Sq, Skv, generator=g).to(DEV)
    needs = [True, True, True, mask_grad]
    want = _reference(q, k, v, do, mask, params, mask_grad)
    for cfg in backward.candidates(q):
        calls, bufs = backward.backward_calls(do, q, k, v, mask, params, needs, cfg)
        for _, c in calls:
            c.run()
        got = [bufs["dq"], bufs["dk"], bufs["dv"]] + ([backward.reduce_to(bufs["ds"], mask)] if mask_grad else [])
        for a, b in zip(got, want):
            err = ((a.double() - b).abs().max() / b.abs().max()).item()
            assert err <= TOL[dtype], (cfg, err)
    tuned = backward.attention_backward(do, q, k, v, mask, params, needs)
    for a, b in zip(tuned, want):
        assert ((a.double() - b).abs().max() / b.abs().max()).item() <= TOL[dtype]
