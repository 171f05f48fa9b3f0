"""The GNA Triton backward (codegen/triton/gna_backward.py) on a real GPU vs float64 autograd through
the dense GNA reference (skipped without CUDA). The interpreter tests (tests/null/
test_triton_gna_backward.py) use 16-token tiles; these run the GPU's fixed tiles (64-token boxes,
32-token dK/dV Q steps) at sizes that cut each dimension into several of them.

Layouts: q [B, H, S, D], k/v [B, Hkv, S, D], S = leading + prod(grid) + trailing.
"""
from __future__ import annotations

import math

import pytest
import torch

from attnopt.codegen.gna_exact import reference_gna
from attnopt.codegen.gna_op import gna_attention_op
from attnopt.codegen.params import TokenLayout
from attnopt.codegen.triton import gna_backward
from attnopt.ir import GNALayout

DEV = "cuda"
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # relative to the largest gradient
SCALE = 0.125


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attnopt-cache"))


CASES = {
    # name: (layout, leading, trailing, (B, H, Hkv, D), mask kind)
    "1d_dilated_causal": (GNALayout((700,), (63,), (8,), (2,), (True,)), 0, 0, (2, 4, 2, 64), None),
    "2d_stride_globals_gqa": (GNALayout((24, 20), (7, 5), (2, 1)), 1, 13, (1, 8, 2, 128), "bool"),
    "2d_dilated_bias_grad": (GNALayout((20, 18), (5, 3), (1, 1), (2, 3)), 0, 0, (2, 4, 4, 64), "bias"),
    "3d_causal_globals": (GNALayout((6, 10, 9), (3, 5, 3), (1, 2, 1), (1, 1, 1), (True, False, False)), 2, 3,
                          (1, 4, 1, 64), None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_match_float64_reference(name, dtype):
    layout, leading, trailing, (B, H, Hkv, D), mask_kind = CASES[name]
    S = leading + math.prod(layout.shape) + trailing
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    q, k, v, grad_out = mk(B, H, S, D) * 2.0, mk(B, Hkv, S, D), mk(B, Hkv, S, D), mk(B, H, S, D)
    mask = None
    if mask_kind == "bool":
        mask = (torch.rand(B, 1, 1, S, generator=g) < 0.8).to(DEV)
        mask[..., :leading] = True
    elif mask_kind == "bias":
        mask = torch.randn(1, H, S, S, generator=g).to(DEV)
    mask_grad = mask_kind == "bias"
    tl = TokenLayout(layout, leading, (), trailing)
    needs = [True, True, True, mask_grad]
    ok, why = gna_backward.can_run(q, k, v, mask, SCALE, tl, "softmax", needs)
    assert ok, why
    got = gna_backward.attention_backward(grad_out, q, k, v, mask, SCALE, tl, needs)
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    m = mask.double().requires_grad_() if mask_grad else mask
    out = reference_gna(*xs, m, SCALE, layout, leading, trailing=trailing)
    want = torch.autograd.grad(out, xs + ([m] if mask_grad else []), grad_out.double())
    for a, b in zip(got, want):
        assert torch.isfinite(a.float()).all()
        err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-3)).item()
        assert err <= TOL[dtype], (name, err)


def test_op_autograd_runs_the_triton_gna_backward(monkeypatch):
    calls = []
    real = gna_backward.attention_backward
    monkeypatch.setattr(gna_backward, "attention_backward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    layout = GNALayout((24, 20), (7, 5), (2, 1))
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 4, 481, 64, generator=g).to(DEV, torch.bfloat16).requires_grad_() for _ in range(3)]
    out = gna_attention_op(*xs, None, scale=SCALE, layout=layout, leading=1)
    out.float().square().sum().backward()
    assert calls and all(torch.isfinite(x.grad.float()).all() for x in xs)
