"""Triton backward kernels of attnopt::attention (codegen/triton/backward.py) under the interpreter
(TRITON_INTERPRET=1, set by a fixture) against float64 autograd through the reference math.

Layouts: q [B, H, Sq, D], k/v [B, Hkv, Skv, D], masks broadcastable to [B, H, Sq, Skv]. Shapes are
small and odd (S 37 / 53, D 16 / 24, B 2, H 4, Hkv 1 / 2 / 4) so tiles (32 under the interpreter) are
cut at both ends. Errors are relative to the largest reference gradient of each input; the
reference runs in float64 on the same (rounded) inputs. q is sharpened so attention is far from
uniform and a wrong mask, band or alignment shows (the near-miss tests check that it does).
"""
from __future__ import annotations

import pytest
import torch

from attnopt.codegen import autograd
from attnopt.codegen.ops import attention_op
from attnopt.codegen.params import AttentionParams
from attnopt.codegen.reference import reference_attention

backward = pytest.importorskip("attnopt.codegen.triton.backward")

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _interpreter(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attnopt-cache"))


def _inputs(B, H, Hkv, Sq, Skv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Sq, D, generator=g) * 2.0).to(dtype)
    k, v = (torch.randn(B, Hkv, Skv, D, generator=g).to(dtype) for _ in range(2))
    grad_out = torch.randn(B, H, Sq, D, generator=g).to(dtype)
    return q, k, v, grad_out


def _reference_grads(q, k, v, mask, p: AttentionParams, grad_out, mask_grad: bool):
    xs = [t.double().requires_grad_() for t in (q, k, v)]
    m = mask
    if mask is not None and mask.is_floating_point():
        m = mask.double().requires_grad_(mask_grad)
    out = reference_attention(*xs, m, **p.kwargs())
    return torch.autograd.grad(out, xs + ([m] if mask_grad else []), grad_out.double())


def _errors(got, want):
    return [((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-3)).item() for a, b in zip(got, want)]


def _check(shape, dtype, mask=None, mask_grad=False, seed=0, **kw):
    q, k, v, grad_out = _inputs(*shape, dtype, seed)
    p = AttentionParams(scale=shape[-1] ** -0.5, **kw)
    ok, why = backward.can_run(q, k, v, mask, p)
    assert ok, why
    got = backward.attention_backward(grad_out, q, k, v, mask, p, [True, True, True, mask_grad])
    want = _reference_grads(q, k, v, mask, p, grad_out, mask_grad)
    got = got if mask_grad else got[:3]
    for g, x in zip(got, (q, k, v, mask)):
        assert g.shape == x.shape and g.dtype == x.dtype and g.is_contiguous()
        assert torch.isfinite(g.float()).all()
    errs = _errors(got, want)
    assert max(errs) <= TOL[dtype], errs
    return got, want


def _bool_mask(B, Sq, Skv, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, 1, Sq, Skv, generator=g) < 0.7) | torch.eye(Sq, Skv, dtype=torch.bool)


def _bias(shape, seed=2, neg_inf=False):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(*shape, generator=g)
    if neg_inf:
        b[..., ::5] = float("-inf")  # hidden keys: no probability, no gradient
        b[..., 0] = 0.0
    return b


B, H = 2, 4
CASES = {
    # name: ((B, H, Hkv, Sq, Skv, D), params, mask factory, mask needs grad)
    "dense_mha": ((B, H, 4, 37, 37, 16), {}, None, False),
    "dense_gqa_rect": ((B, H, 2, 37, 53, 24), {}, None, False),
    "dense_mqa": ((B, H, 1, 53, 37, 16), {}, None, False),
    "causal_top_left_mqa": ((B, H, 1, 53, 53, 16), dict(causal=True), None, False),
    "causal_top_left_rect": ((B, H, 2, 37, 53, 24), dict(causal=True), None, False),
    "causal_bottom_right": ((B, H, 2, 37, 53, 16), dict(causal=True, causal_alignment="bottom_right"), None,
                            False),
    # Sq > Skv bottom-right: the first 16 queries see no key (dead rows from the structure alone)
    "causal_bottom_right_dead": ((B, H, 4, 53, 37, 16), dict(causal=True, causal_alignment="bottom_right"),
                                 None, False),
    "window_both": ((B, H, 2, 53, 53, 16), dict(window=(7, 3)), None, False),
    "window_left_causal": ((B, H, 1, 53, 53, 24), dict(causal=True, window=(9, None)), None, False),
    "window_right_only": ((B, H, 4, 37, 53, 16), dict(window=(None, 4)), None, False),
    "window_bottom_right": ((B, H, 2, 37, 53, 16), dict(window=(5, 2), causal_alignment="bottom_right"), None,
                            False),
    "bool_mask": ((B, H, 2, 37, 53, 16), {}, lambda: _bool_mask(B, 37, 53), False),
    "bool_padding_causal": ((B, H, 1, 53, 53, 16), dict(causal=True),
                            lambda: torch.arange(53).expand(B, 1, 1, 53) < torch.tensor([53, 40]).view(B, 1, 1, 1),
                            False),
    "bias_per_head_grad": ((B, H, 2, 37, 37, 16), {}, lambda: _bias((1, H, 37, 37)), True),
    "bias_key_padding_grad": ((B, H, 4, 37, 53, 24), dict(causal=True, causal_alignment="bottom_right"),
                              lambda: _bias((B, 1, 1, 53), neg_inf=True), True),
    "bias_2d_grad_window": ((B, H, 1, 53, 53, 16), dict(window=(11, 6)), lambda: _bias((53, 53)), True),
    "bias_no_grad": ((B, H, 2, 37, 37, 16), {}, lambda: _bias((B, H, 37, 37)), False),
    "softcap": ((B, H, 2, 53, 53, 16), dict(softcap=4.0), None, False),
    "softcap_causal_bias_grad": ((B, H, 1, 37, 37, 24), dict(softcap=3.0, causal=True),
                                 lambda: _bias((1, 1, 37, 37)), True),
    "sigmoid": ((B, H, 2, 37, 53, 16), dict(normalizer="sigmoid"), None, False),
    "sigmoid_causal_bias_grad": ((B, H, 4, 37, 37, 16), dict(normalizer="sigmoid", causal=True),
                                 lambda: _bias((B, 1, 37, 37)), True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fp32_gradients_match_float64_reference(name):
    shape, kw, mask, mask_grad = CASES[name]
    _check(shape, torch.float32, None if mask is None else mask(), mask_grad, **kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["causal_bottom_right", "window_both", "bias_per_head_grad", "softcap"])
def test_half_precision_gradients(name, dtype):
    shape, kw, mask, mask_grad = CASES[name]
    _check(shape, dtype, None if mask is None else mask(), mask_grad, **kw)


def test_dead_row_gets_zero_gradient():
    shape = (B, H, 2, 37, 37, 16)
    mask = _bool_mask(B, 37, 37)
    mask[0, 0, 5] = False  # query 5 of batch 0 sees no key: output 0, gradient 0 (SDPA)
    q, k, v, grad_out = _inputs(*shape, torch.float32)
    p = AttentionParams(scale=0.25)
    dq, dk, dv, _ = backward.attention_backward(grad_out, q, k, v, mask, p, [True, True, True, False])
    assert torch.equal(dq[0, :, 5], torch.zeros_like(dq[0, :, 5]))
    assert max(_errors((dq, dk, dv), _reference_grads(q, k, v, mask, p, grad_out, False))) <= TOL[torch.float32]
    # Structural dead rows (bottom-right, Sq > Skv) as well.
    got, _ = _check((B, H, 4, 53, 37, 16), torch.float32, causal=True, causal_alignment="bottom_right")
    assert torch.equal(got[0][:, :, :16], torch.zeros_like(got[0][:, :, :16]))


def test_only_the_needed_gradients_are_computed():
    q, k, v, grad_out = _inputs(B, H, 2, 37, 37, 16, torch.float32)
    bias = _bias((1, H, 37, 37))
    p = AttentionParams(scale=0.25, causal=True)
    full = backward.attention_backward(grad_out, q, k, v, bias, p, [True, True, True, True])
    calls, _ = backward.backward_calls(grad_out, q, k, v, bias, p, [True, False, False, False])
    assert [n for n, _ in calls] == ["attn_fwd_lse_kernel", "attn_bwd_pre_kernel", "attn_bwd_dq_kernel"]
    calls, _ = backward.backward_calls(grad_out, q, k, v, None, AttentionParams(0.25, normalizer="sigmoid"),
                                       [False, True, True, False])
    assert [n for n, _ in calls] == ["attn_bwd_dkdv_kernel"]
    part = backward.attention_backward(grad_out, q, k, v, bias, p, [False, False, True, True])
    assert part[0].numel() == 0 and part[1].numel() == 0
    assert torch.equal(part[2], full[2]) and torch.equal(part[3], full[3])


# ---- near misses: the comparison tells these apart, and the check refuses what it cannot run ----

@pytest.mark.parametrize("kw, wrong", [
    (dict(causal=True, causal_alignment="bottom_right"), dict(causal=True)),
    (dict(window=(7, 3)), dict(window=(3, 7))),
    (dict(softcap=4.0), {}),
])
def test_near_miss_semantics_are_detected(kw, wrong):
    q, k, v, grad_out = _inputs(B, H, 2, 37, 53, 16, torch.float32)
    p = AttentionParams(scale=0.25, **kw)
    got = backward.attention_backward(grad_out, q, k, v, None, p, [True, True, True, False])
    near = _reference_grads(q, k, v, None, AttentionParams(scale=0.25, **wrong), grad_out, False)
    assert max(_errors(got, near)) > 100 * TOL[torch.float32]


def test_a_wrong_mask_broadcast_is_detected():
    q, k, v, grad_out = _inputs(B, H, 2, 37, 37, 16, torch.float32)
    bias = _bias((1, H, 37, 37))
    p = AttentionParams(scale=0.25)
    got = backward.attention_backward(grad_out, q, k, v, bias, p, [True, True, True, True])
    near = _reference_grads(q, k, v, bias.transpose(-1, -2), p, grad_out, True)
    assert max(_errors(got, near)) > 100 * TOL[torch.float32]


def test_refusals():
    q, k, v, _ = _inputs(1, 2, 2, 17, 17, 16, torch.float32)
    p = AttentionParams(scale=0.25)
    big = torch.zeros(1, 2, 17, 160)
    assert not backward.can_run(big, big, big, None, p)[0]  # head dim over MAX_HEAD_DIM
    assert not backward.can_run(q, k.half(), v, None, p)[0]  # mixed dtypes
    assert not backward.can_run(q.double(), k.double(), v.double(), None, p)[0]


# ---- the op's autograd: Triton backward under ATTNOPT_FORCE_TRITON=1, recomputation otherwise ----

@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = backward.attention_backward

    def wrapped(*args, **kwargs):
        calls.append(args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(backward, "attention_backward", wrapped)
    return calls


def _op_grads(q, k, v, bias, **kw):
    xs = [t.detach().requires_grad_() for t in (q, k, v, bias)]
    out = attention_op(*xs, scale=0.25, **kw)
    return out, torch.autograd.grad(out, xs, out.detach().cos())


def test_op_autograd_uses_triton_backward_when_forced(monkeypatch, spy):
    q, k, v, _ = _inputs(B, H, 2, 37, 53, 16, torch.float32)
    bias = _bias((B, 1, 1, 53))
    kw = dict(causal=True, causal_alignment="bottom_right", softcap=5.0)
    out, default = _op_grads(q, k, v, bias, **kw)
    assert spy == []  # CPU without the variable: the recomputation through the table, as before
    monkeypatch.setenv("ATTNOPT_FORCE_TRITON", "1")
    out_t, forced = _op_grads(q, k, v, bias, **kw)
    assert len(spy) == 1 and spy[0].causal and spy[0].softcap == 5.0
    p = AttentionParams(scale=0.25, **kw)
    want = _reference_grads(q, k, v, bias, p, out_t.detach().cos(), True)
    assert max(_errors(forced, want)) <= TOL[torch.float32]
    assert max(_errors(default, want)) <= TOL[torch.float32]


def test_op_autograd_falls_back_where_triton_backward_refuses(monkeypatch, spy):
    monkeypatch.setenv("ATTNOPT_FORCE_TRITON", "1")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 17, 136, generator=g) for _ in range(3))  # head dim > MAX_HEAD_DIM
    xs = [t.requires_grad_() for t in (q, k, v)]
    out = attention_op(*xs, scale=0.1, causal=True)
    got = torch.autograd.grad(out, xs, torch.ones_like(out))
    assert spy == []
    want = _reference_grads(q, k, v, None, AttentionParams(scale=0.1, causal=True), torch.ones_like(out), False)
    assert max(_errors(got, want)) <= TOL[torch.float32]
    assert autograd.ATTENTION_BACKWARD == "attnopt::attention_backward"


def test_backward_op_contract_on_the_triton_path(monkeypatch, spy):
    """The backward op's schema, fake impl and AOT dispatch hold when the Triton path answers
    (fresh outputs, empties where not needed)."""
    monkeypatch.setenv("ATTNOPT_FORCE_TRITON", "1")
    q, k, v, grad_out = _inputs(1, 2, 1, 17, 17, 16, torch.float32)
    args = (grad_out, q, k, v, _bias((1, 1, 17, 17)), 0.25, True, "top_left", -1, -1, 0.0, "softmax",
            [True, False, True, True])
    torch.library.opcheck(torch.ops.attnopt.attention_backward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    assert spy
