"""Generated Triton kernels on a real GPU vs the dense reference (skipped without CUDA).

Layouts: q [B, H, S, D], k/v [B, Hkv, S_kv, D]; GNA tokens are the row-major flattened grid.
Same specializations as tests/null/test_triton_kernels.py, at sizes that exercise several tiles.
"""
from __future__ import annotations

import os

import pytest
import torch

from attnopt.codegen import select
from attnopt.codegen.ops import attention_op
from attnopt.codegen.params import AttentionParams
from attnopt.codegen.reference import reference_attention
from attnopt.sparsity.gna import dense_mask
from attnopt.ir import GNALayout

DEV = "cuda"
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attnopt-cache"))
    # Numbers only: one config per specialization (autotuning every case would compile ~16 each).
    monkeypatch.setenv("ATTNOPT_AUTOTUNE", os.environ.get("ATTNOPT_AUTOTUNE", "0"))


def _qkv(B, H, Hkv, Sq, Skv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    return mk(B, H, Sq, D), mk(B, Hkv, Skv, D), mk(B, Hkv, Skv, D)


def _check(out, ref, dtype):
    assert out is not None and torch.isfinite(out.float()).all()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.float().abs().max().item()), err


CASES = {
    "dense": ((2, 4, 4, 197, 197, 64), {}),
    "dense_d80": ((1, 4, 4, 333, 333, 80), {}),
    "dense_d96": ((1, 4, 4, 255, 513, 96), {}),
    "causal_top_left": ((1, 4, 4, 1000, 1000, 64), dict(causal=True)),
    "causal_bottom_right": ((1, 4, 4, 300, 1000, 128), dict(causal=True, causal_alignment="bottom_right")),
    "gqa_4to1": ((1, 8, 2, 513, 513, 64), dict(causal=True)),
    "mqa": ((2, 8, 1, 257, 257, 64), {}),
    "softcap": ((1, 4, 4, 513, 513, 64), dict(softcap=30.0)),
    "sigmoid": ((1, 4, 4, 513, 513, 64), dict(normalizer="sigmoid")),
    "window": ((1, 4, 4, 2000, 2000, 64), dict(window=(256, 0))),
    "window_both": ((1, 4, 4, 1000, 1000, 64), dict(window=(100, 37))),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_dense_family_gpu(case, dtype):
    (B, H, Hkv, Sq, Skv, D), kw = CASES[case]
    q, k, v = _qkv(B, H, Hkv, Sq, Skv, D, dtype)
    p = AttentionParams(scale=D ** -0.5, **kw)
    _check(select.launch_triton(q, k, v, None, p), reference_attention(q, k, v, None, **p.kwargs()), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masks_gpu(dtype):
    B, H, S, D = 2, 4, 333, 64
    q, k, v = _qkv(B, H, H, S, S, D, dtype, seed=1)
    pad = (torch.arange(S, device=DEV)[None, :] < torch.tensor([200, 333], device=DEV)[:, None])[:, None, None, :]
    bias = torch.randn(1, H, S, S, device=DEV)
    for mask in (pad, bias):
        p = AttentionParams(scale=D ** -0.5)
        _check(select.launch_triton(q, k, v, mask, p), reference_attention(q, k, v, mask, **p.kwargs()), dtype)


GNA = {
    "2d_stride1": GNALayout((48, 40), (13, 9)),
    "2d_blocked": GNALayout((64, 64), (16, 16), (16, 16)),
    "2d_unaligned_dilated": GNALayout((50, 44), (7, 9), (3, 4), (2, 1)),
    "3d": GNALayout((8, 24, 24), (4, 8, 8), (1, 2, 4), (1, 1, 1), (True, False, False)),
    "1d": GNALayout((3000,), (255,), (64,), (2,)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(GNA))
def test_gna_gpu(name, dtype):
    layout = GNA[name]
    n = 1
    for x in layout.shape:
        n *= x
    q, k, v = _qkv(1, 4, 2, n, n, 64, dtype, seed=3)
    p = AttentionParams(scale=0.125)
    allowed = torch.from_numpy(dense_mask(layout)).to(DEV)
    _check(select.launch_triton(q, k, v, None, p, layout), reference_attention(q, k, v, allowed, **p.kwargs()), dtype)


def test_op_uses_generated_kernel_and_falls_back():
    q, k, v = _qkv(1, 4, 4, 257, 257, 64, torch.float16)
    out = attention_op(q, k, v, scale=0.125, causal=True)
    _check(out, reference_attention(q, k, v, scale=0.125, causal=True), torch.float16)
    assert select.choose(q, k, v, None, AttentionParams(scale=0.125, causal=True), None,
                         select.Request.for_op("attention")).name == "triton_causal"
    big = torch.randn(1, 1, 64, 512, device=DEV, dtype=torch.float16)
    assert select.launch_triton(big, big, big, None, AttentionParams(scale=0.05)) is None
    out = attention_op(big, big, big, scale=0.05)  # exact path
    _check(out, reference_attention(big, big, big, scale=0.05), torch.float16)


@pytest.mark.parametrize("leading,heads,trailing", [(0, (), 0), (0, (1, 2), 0), (1, (), 0), (4, (0, 3), 0),
                                                    (0, (), 77), (1, (0, 3), 154)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gna_op_on_cuda(monkeypatch, leading, heads, trailing, dtype):
    """attnopt::gna_attention on CUDA (what approximate plans splice): the generated GNA kernel,
    with leading global tokens ([CLS], sinks) and trailing ones (SD3's text after the image) as
    one extra KV block each per Q tile, per-head splits."""
    from attnopt.codegen.gna_exact import reference_gna
    from attnopt.codegen.gna_op import gna_attention_op
    from attnopt.codegen.triton import launcher

    calls = []
    real = launcher.gna_call
    monkeypatch.setattr(launcher, "gna_call", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    layout = GNALayout((32, 48), (9, 13), (2, 3), (1, 1), (False, False))
    S = leading + 32 * 48 + trailing
    q, k, v = _qkv(2, 4, 4, S, S, 64, dtype, seed=4)
    out = gna_attention_op(q, k, v, None, scale=0.125, layout=layout, leading=leading, heads=heads,
                           trailing=trailing)
    ref = reference_gna(q.float(), k.float(), v.float(), None, 0.125, layout, leading, "softmax", heads,
                        trailing=trailing)
    err = (out.float() - ref).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), err
    assert calls
