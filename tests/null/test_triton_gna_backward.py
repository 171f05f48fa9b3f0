"""Triton backward of attnopt::gna_attention (codegen/triton/gna_backward.py) under the interpreter
(TRITON_INTERPRET=1, set by a fixture) against float64 autograd through the dense GNA reference
(gna_exact.reference_gna: the layout with its global tokens as a full mask).

Layouts: q [B, H, S, D], k/v [B, Hkv, S, D], S = leading + prod(grid) + trailing, masks
broadcastable to [B, H, S, S]. Grids are small and odd (29, 37, 4x5, 5x7, 6x5, 2x4x5) so the interpreter's
tiles (16 or 32 tokens: 4x4, 4x8, 2x2x4 boxes) are clipped at the grid ends and every KV tile is visited
by several Q tiles. Errors are relative to the largest reference gradient of each input; q is
sharpened so a wrong layout, window or global token shows (the near-miss test checks that it does).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnopt.codegen.gna_exact import reference_gna
from attnopt.codegen.gna_op import gna_attention_op
from attnopt.codegen.params import TokenLayout
from attnopt.codegen.triton.gna_tiles import gna_tile_plan, transpose_plan
from attnopt.ir import GNALayout

gna_backward = pytest.importorskip("attnopt.codegen.triton.gna_backward")

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
SCALE = 0.3


@pytest.fixture(autouse=True)
def _interpreter(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attnopt-cache"))


def _inputs(layout, leading, trailing, B, H, Hkv, D, dtype, seed=0):
    S = leading + math.prod(layout.shape) + trailing
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, S, D, generator=g) * 2.0).to(dtype)
    k, v = (torch.randn(B, Hkv, S, D, generator=g).to(dtype) for _ in range(2))
    return q, k, v, torch.randn(B, H, S, D, generator=g).to(dtype)


def _reference_grads(q, k, v, mask, layout, leading, trailing, grad_out, mask_grad=False, heads=()):
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    m = mask
    if mask is not None and mask.is_floating_point():
        m = mask.double().requires_grad_(mask_grad)
    out = reference_gna(*xs, m, SCALE, layout, leading, "softmax", heads, trailing)
    return torch.autograd.grad(out, xs + ([m] if mask_grad else []), grad_out.double())


def _errors(got, want):
    return [((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-3)).item() for a, b in zip(got, want)]


def _check(layout, leading=0, trailing=0, B=1, H=2, Hkv=2, D=16, dtype=torch.float32, mask=None, mask_grad=False,
           heads=()):
    q, k, v, grad_out = _inputs(layout, leading, trailing, B, H, Hkv, D, dtype)
    tl = TokenLayout(layout, leading, tuple(heads), trailing)
    needs = [True, True, True, mask_grad]
    ok, why = gna_backward.can_run(q, k, v, mask, SCALE, tl, "softmax", needs)
    assert ok, why
    got = gna_backward.attention_backward(grad_out, q, k, v, mask, SCALE, tl, needs)
    want = _reference_grads(q, k, v, mask, layout, leading, trailing, grad_out, mask_grad, heads)
    got = got if mask_grad else got[:3]
    for g, x in zip(got, (q, k, v, mask)):
        assert g.shape == x.shape and g.dtype == x.dtype and g.is_contiguous()
        assert torch.isfinite(g.float()).all()
    errs = _errors(got, want)
    assert max(errs) <= TOL[dtype], errs
    return got


CASES = {
    # name: (layout, leading, trailing, extra)
    "1d_window_batch2": (GNALayout((37,), (9,)), 0, 0, dict(B=2)),
    "1d_causal_stride": (GNALayout((37,), (9,), (3,), (1,), (True,)), 0, 0, dict(H=4, Hkv=1)),
    "2d_5x7_w3x3_s1": (GNALayout((5, 7), (3, 3)), 0, 0, {}),
    "2d_5x7_w3x3_s2_globals_gqa": (GNALayout((5, 7), (3, 3), (2, 2)), 2, 3, dict(H=2, Hkv=1)),
    "2d_causal_dim0_globals": (GNALayout((5, 7), (3, 3), (2, 1), (1, 1), (True, False)), 2, 3, {}),
    "2d_dilated_leading": (GNALayout((6, 5), (3, 2), (1, 1), (2, 2)), 1, 0, {}),
    # 4x4-token dK/dV tiles on 4x4 windows at stride 4: perfectly block-sparse (no element mask)
    "2d_block_sparse": (GNALayout((8, 8), (4, 4), (4, 4)), 0, 0, {}),
    "3d_causal_dim1_globals": (GNALayout((2, 4, 5), (2, 3, 3), (1, 2, 1), (1, 1, 1), (False, True, False)), 1, 2,
                               dict(H=1, Hkv=1)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fp32_gradients_match_float64_reference(name):
    layout, leading, trailing, extra = CASES[name]
    _check(layout, leading, trailing, **extra)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gradients(dtype):
    _check(GNALayout((37,), (9,)), 1, 2, dtype=dtype)


def test_mask_gradient():
    layout = GNALayout((4, 5), (3, 3))
    S = 1 + 20 + 2
    g = torch.Generator().manual_seed(4)
    bias = torch.randn(2, 2, S, S, generator=g)  # per batch and head
    bias[..., ::7] = float("-inf")  # hidden keys: no probability, no gradient
    bias[..., 0] = 0.0
    _check(layout, 1, 2, B=2, mask=bias, mask_grad=True)  # (a bool mask: the dead-row test)


def test_per_head_selection():
    # The other heads: 2-D non-causal, dense attention; 1-D causal, plain causal attention (both
    # backward.py); 2-D causal, the layout's full window (this backward again).
    _check(GNALayout((4, 5), (3, 3)), 1, 2, heads=(1,))
    _check(GNALayout((29,), (9,), (1,), (1,), (True,)), 2, 1, H=4, Hkv=2, heads=(0, 1))
    _check(GNALayout((4, 5), (3, 3), (1, 1), (1, 1), (False, True)), 1, 1, heads=(0,))


def test_dead_grid_row_gets_zero_gradient():
    layout = GNALayout((37,), (9,))
    mask = torch.ones(1, 1, 37, 37, dtype=torch.bool)
    mask[0, 0, 5] = False  # grid query 5 sees no key: output 0, gradient 0 (SDPA's safe softmax)
    got = _check(layout, mask=mask)
    assert torch.equal(got[0][:, :, 5], torch.zeros_like(got[0][:, :, 5]))


def test_transposed_plan_holds_every_pair_once():
    for layout, qt, kt in ((GNALayout((5, 7), (3, 3), (2, 2)), (4, 4), (4, 8)),
                           (GNALayout((37,), (9,), (3,), (1,), (True,)), (16,), (32,)),
                           (GNALayout((6, 6, 5), (3, 3, 3), (2, 1, 1), (2, 1, 1)), (2, 2, 4), (2, 4, 2))):
        p = gna_tile_plan(layout, qt, kt)
        t = transpose_plan(p)
        fwd = [(q, int(u), i < p.counts[q, 0]) for q in range(p.num_q_tiles)
               for i, u in enumerate(p.tiles[q, :p.counts[q, 1]])]
        bwd = [(int(q), u, i < t.counts[u, 0]) for u in range(p.num_kv_tiles)
               for i, q in enumerate(t.q_tiles[u, :t.counts[u, 1]])]
        assert sorted(fwd) == sorted(bwd) and len(set(bwd)) == len(bwd)
        assert np.all(t.counts[:, 0] <= t.counts[:, 1])


# ---- near misses and refusals -------------------------------------------------------------------

def test_near_miss_layouts_are_detected():
    layout, leading, trailing = GNALayout((5, 7), (3, 3), (2, 2)), 2, 3
    q, k, v, grad_out = _inputs(layout, leading, trailing, 1, 2, 2, 16, torch.float32)
    got = gna_backward.attention_backward(grad_out, q, k, v, None, SCALE, TokenLayout(layout, leading, (), trailing),
                                          [True, True, True, False])
    assert max(_errors(got, _reference_grads(q, k, v, None, layout, leading, trailing, grad_out))) <= 1e-4
    for wrong in (dict(layout=GNALayout((5, 7), (3, 3), (1, 1))),  # stride 1 instead of 2
                  dict(layout=GNALayout((7, 5), (3, 3), (2, 2))),  # the grid transposed
                  dict(leading=3, trailing=2)):                    # a global token moved from the end to the front
        w = dict(dict(layout=layout, leading=leading, trailing=trailing), **wrong)
        near = _reference_grads(q, k, v, None, w["layout"], w["leading"], w["trailing"], grad_out)
        assert max(_errors(got, near)) > 100 * TOL[torch.float32], wrong


def test_refusals():
    layout = GNALayout((5, 7), (3, 3), (1, 1), (1, 1), (True, False))
    q, k, v, _ = _inputs(layout, 1, 0, 1, 4, 2, 16, torch.float32)
    tl = TokenLayout(layout, 1)
    assert gna_backward.can_run(q, k, v, None, SCALE, tl)[0]
    assert not gna_backward.can_run(q, k, v, None, SCALE, tl, "sigmoid")[0]
    assert not gna_backward.can_run(q.double(), k.double(), v.double(), None, SCALE, tl)[0]
    big = torch.zeros(1, 2, 36, 160)
    assert not gna_backward.can_run(big, big, big, None, SCALE, tl)[0]  # head dim over MAX_HEAD_DIM
    # a selection: fine, but not one splitting a KV group, nor with a mask gradient
    assert gna_backward.can_run(q, k, v, None, SCALE, TokenLayout(layout, 1, (0, 1)))[0]
    assert not gna_backward.can_run(q, k, v, None, SCALE, TokenLayout(layout, 1, (0,)))[0]
    bias = torch.zeros(1, 1, 36, 36)
    assert not gna_backward.can_run(q, k, v, bias, SCALE, TokenLayout(layout, 1, (0, 1)), "softmax",
                                    [True, True, True, True])[0]
    assert not gna_backward.can_run(q, k, v, None, SCALE, TokenLayout(layout, 2))[0]  # wrong length


# ---- the op's autograd: the Triton backward under ATTNOPT_FORCE_TRITON=1 --------------------------

@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = gna_backward.attention_backward

    def wrapped(*args, **kwargs):
        calls.append(args[6])
        return real(*args, **kwargs)

    monkeypatch.setattr(gna_backward, "attention_backward", wrapped)
    return calls


def test_op_autograd_uses_triton_gna_backward_when_forced(monkeypatch, spy):
    layout, leading, trailing = GNALayout((5, 7), (3, 3), (2, 2)), 1, 2
    q, k, v, _ = _inputs(layout, leading, trailing, 1, 2, 1, 16, torch.float32)
    bias = torch.randn(1, 1, 1, q.shape[2], generator=torch.Generator().manual_seed(5))

    def op_grads():
        xs = [t.detach().requires_grad_() for t in (q, k, v, bias)]
        out = gna_attention_op(*xs, scale=SCALE, layout=layout, leading=leading, trailing=trailing)
        return out, torch.autograd.grad(out, xs, out.detach().cos())

    _, default = op_grads()
    assert spy == []  # CPU without the variable: the recomputation, as before
    monkeypatch.setenv("ATTNOPT_FORCE_TRITON", "1")
    out, forced = op_grads()
    assert len(spy) == 1 and spy[0] == TokenLayout(layout, leading, (), trailing)
    want = _reference_grads(q, k, v, bias, layout, leading, trailing, out.detach().cos(), mask_grad=True)
    assert max(_errors(forced, want)) <= TOL[torch.float32]
    assert max(_errors(default, want)) <= TOL[torch.float32]


def test_op_autograd_falls_back_where_refused(monkeypatch, spy):
    monkeypatch.setenv("ATTNOPT_FORCE_TRITON", "1")
    layout = GNALayout((5, 7), (3, 3), (1, 1), (1, 1), (True, False))
    q, k, v, grad_out = _inputs(layout, 0, 0, 1, 2, 2, 16, torch.float32)
    bias = torch.randn(1, 2, 35, 35, generator=torch.Generator().manual_seed(7))
    xs = [t.requires_grad_() for t in (q, k, v, bias)]
    out = gna_attention_op(*xs, scale=SCALE, layout=layout, heads=(0,))  # a mask gradient with a selection
    got = torch.autograd.grad(out, xs, grad_out)
    assert spy == []
    want = _reference_grads(q, k, v, bias, layout, 0, 0, grad_out, mask_grad=True, heads=(0,))
    assert max(_errors(got, want)) <= TOL[torch.float32]


def test_backward_op_contract_on_the_triton_path(monkeypatch, spy):
    """The backward op's schema, fake impl and AOT dispatch hold when the GNA Triton path answers
    (fresh outputs, empties where not needed)."""
    monkeypatch.setenv("ATTNOPT_FORCE_TRITON", "1")
    q, k, v, grad_out = _inputs(GNALayout((17,), (5,)), 1, 0, 1, 2, 1, 16, torch.float32)
    bias = torch.randn(1, 1, 18, 18, generator=torch.Generator().manual_seed(6))
    args = (grad_out, q, k, v, bias, SCALE, [17], [5], [1], [1], [False], 1, "softmax", [], 0,
            [True, False, True, True])
    torch.library.opcheck(torch.ops.attnopt.gna_attention_backward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    assert spy
