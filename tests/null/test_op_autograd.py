"""Autograd of the rewrite's custom ops (codegen/autograd.py): dQ/dK/dV (and a learned bias's) of
`attnopt::attention` and `attnopt::gna_attention` against float64 autograd through the dense
reference math on the same masks; torch.library.opcheck of both ops; optimize() results trained.

Layouts: q [B, H, Sq, D], k/v [B, Hkv, Skv, D]; GNA tokens [leading][grid row-major][trailing];
masks [1 | B, 1 | H, Sq, Skv]. Gradient errors are relative to the largest reference gradient of
each input (the inputs are fp32, the reference float64; the backward recomputes in fp32).
Inputs are sharpened (q scaled up) so attention is far from uniform and a wrong mask shows.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from zoo import hf

import attnopt
from attnopt.codegen import select
from attnopt.codegen.gna_exact import reference_gna
from attnopt.codegen.gna_op import gna_attention_op, make_layout
from attnopt.codegen.ops import attention_op
from attnopt.codegen.params import AttentionParams, TokenLayout
from attnopt.codegen.reference import reference_attention
from attnopt.ir import GNALayout

TOL = 2e-5


def _qkv(B, H, Hkv, Sq, Skv, D, seed, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Sq, D, generator=g) * sharp
    k, v = (torch.randn(B, Hkv, Skv, D, generator=g) for _ in range(2))
    return q, k, v


def _grads(fn, tensors, needs, grad_out, dtype):
    """Gradients of fn(*tensors) w.r.t. the tensors marked in `needs` (cast to dtype)."""
    xs = [None if t is None else t.detach().to(dtype if t.is_floating_point() else t.dtype)
          .requires_grad_(n) for t, n in zip(tensors, needs)]
    out = fn(*xs)
    return out, torch.autograd.grad(out, [x for x, n in zip(xs, needs) if n], grad_out.to(out.dtype))


def _assert_close(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        scale = b.abs().max().item()
        err = (a.double() - b).abs().max().item()
        assert err <= TOL * max(scale, 1e-3), f"{what}: input {i}: max error {err:.3g} vs largest {scale:.3g}"


# ---- attnopt::attention ------------------------------------------------------------------------

def _bool_mask(B, Sq, Skv, seed, dead_row=False):
    g = torch.Generator().manual_seed(seed + 1)
    m = (torch.rand(B, 1, Sq, Skv, generator=g) < 0.7) | torch.eye(Sq, Skv, dtype=torch.bool)
    if dead_row:
        m[0, 0, 1] = False  # a query that sees no key: output 0, gradient 0 (SDPA's safe softmax)
    return m


ATTENTION_CASES = {
    # name: (B, H, Hkv, Sq, Skv, D, mask kind, op kwargs)
    "dense": (2, 4, 4, 12, 12, 8, None, {}),
    "causal_top_left": (1, 2, 2, 9, 14, 8, None, dict(causal=True)),
    "causal_bottom_right": (1, 2, 2, 9, 14, 8, None, dict(causal=True, causal_alignment="bottom_right")),
    "gqa": (2, 4, 2, 12, 12, 8, None, dict(causal=True)),
    "mqa": (1, 4, 1, 12, 12, 8, None, {}),
    "bool_mask": (2, 2, 2, 12, 12, 8, "bool", {}),
    "bool_mask_dead_row": (2, 2, 1, 12, 12, 8, "dead", {}),
    "float_mask": (2, 2, 2, 12, 12, 8, "float", {}),
    "float_mask_grad": (2, 4, 2, 12, 12, 8, "bias", dict(causal=True)),
    "softcap": (1, 4, 2, 12, 12, 8, "bias", dict(softcap=3.0)),
    "sigmoid": (1, 2, 2, 12, 12, 8, "bool", dict(normalizer="sigmoid")),
    # decode steps (CPU: the grouped decode row, query heads of a KV head as rows of one matmul)
    "decode_gqa_bias": (2, 4, 2, 1, 20, 8, "bias", dict(causal=True, causal_alignment="bottom_right")),
    "decode_mqa_bool": (2, 8, 1, 3, 20, 8, "bool", {}),
    # long enough that the CPU window kernel takes it (tiles: what autograd keeps is O(tiles))
    "sliding_window": (1, 2, 1, 160, 160, 8, None, dict(window=(8, 3))),
    "sliding_window_causal_bias": (1, 2, 2, 150, 150, 8, "bias", dict(causal=True, window=(16, None))),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_op_gradients(case):
    B, H, Hkv, Sq, Skv, D, mask_kind, kw = ATTENTION_CASES[case]
    q, k, v = _qkv(B, H, Hkv, Sq, Skv, D, seed=len(case))
    mask, mask_grad = None, False
    if mask_kind in ("bool", "dead"):
        mask = _bool_mask(B, Sq, Skv, 3, dead_row=mask_kind == "dead")
    elif mask_kind in ("float", "bias"):
        mask = torch.randn(1, H, Sq, Skv, generator=torch.Generator().manual_seed(5))
        mask_grad = mask_kind == "bias"
    scale = D ** -0.5
    needs = [True, True, True, mask_grad]
    grad_out = torch.randn(B, H, Sq, D, generator=torch.Generator().manual_seed(9))
    out, got = _grads(lambda *x: attention_op(*x, scale=scale, **kw), (q, k, v, mask), needs, grad_out,
                      torch.float32)
    ref, want = _grads(lambda *x: reference_attention(*x, scale=scale, **kw), (q, k, v, mask), needs,
                       grad_out, torch.float64)
    assert len(got) == 3 + mask_grad
    assert got[1].shape == k.shape and got[2].shape == v.shape  # GQA: summed over each group
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    _assert_close(got, want, case)
    if mask_kind == "dead":
        assert got[0][0, :, 1].abs().max() == 0  # a dead row sends back nothing
    if case.startswith("sliding_window"):  # the recomputation runs the tile kernels, not dense
        p = AttentionParams(scale=scale, **{k_: v_ for k_, v_ in kw.items()})
        req = select.Request(caller="attention", needs_grad=True)
        q_ = q.clone().requires_grad_()  # as the backward recomputes: inputs needing gradients
        assert select.choose(q_, k, v, mask, p, None, req).name in ("cpu_native", "cpu_tiles")


def test_only_needed_gradients_and_none_for_masks():
    q, k, v = _qkv(1, 2, 2, 10, 10, 8, seed=1)
    q.requires_grad_()
    bias = torch.randn(1, 2, 10, 10)  # a float mask that does not require grad
    out = attention_op(q, k, v, bias, scale=0.3)
    out.sum().backward()
    assert q.grad is not None and k.grad is None and v.grad is None and bias.grad is None
    # a bool mask never has a gradient; q, k, v still do
    k.requires_grad_()
    (dq, dk) = torch.autograd.grad(attention_op(q, k, v, _bool_mask(1, 10, 10, 0), scale=0.3).sum(), (q, k))
    assert dq.shape == q.shape and dk.shape == k.shape


def test_double_backward_raises():
    # the backward op has no formula of its own: a second derivative says so, it is never silently 0
    q, k, v = (x.requires_grad_() for x in _qkv(1, 2, 2, 8, 8, 8, seed=2))
    (dq,) = torch.autograd.grad(attention_op(q, k, v, scale=0.3).pow(2).sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="autograd"):
        dq.sum().backward()


# ---- attnopt::gna_attention --------------------------------------------------------------------

GNA_CASES = {
    # name: (layout, leading, trailing, heads, H, Hkv, mask kind, normalizer)
    "1d": (GNALayout((24,), (7,)), 0, 0, (), 2, 2, None, "softmax"),
    "1d_causal_sinks": (GNALayout((20,), (5,), causal=(True,)), 2, 0, (), 2, 1, None, "softmax"),
    "2d_leading_trailing": (GNALayout((5, 6), (3, 3), stride=(1, 2)), 1, 2, (), 4, 2, None, "softmax"),
    "2d_per_head": (GNALayout((5, 6), (3, 5)), 1, 1, (1, 3), 4, 4, None, "softmax"),
    "2d_per_head_gqa_bias": (GNALayout((6, 5), (3, 3), dilation=(2, 1)), 1, 1, (0, 1), 4, 2, "bias", "softmax"),
    "2d_causal_bool": (GNALayout((5, 5), (3, 3), causal=(True, False)), 1, 2, (), 2, 2, "bool", "softmax"),
    "3d": (GNALayout((3, 4, 4), (3, 3, 3)), 1, 1, (), 2, 1, None, "softmax"),
    "2d_sigmoid": (GNALayout((4, 5), (3, 3)), 1, 1, (0,), 2, 2, None, "sigmoid"),
}


def _gna_inputs(case):
    layout, leading, trailing, heads, H, Hkv, mask_kind, normalizer = GNA_CASES[case]
    S = leading + math.prod(layout.shape) + trailing
    q, k, v = _qkv(2, H, Hkv, S, S, 8, seed=len(case) + 20)
    mask = None
    if mask_kind == "bool":
        mask = _bool_mask(2, S, S, 4)
    elif mask_kind == "bias":
        mask = torch.randn(1, H, S, S, generator=torch.Generator().manual_seed(6))
    return layout, leading, trailing, heads, normalizer, (q, k, v, mask), [True, True, True, mask_kind == "bias"]


@pytest.mark.parametrize("case", list(GNA_CASES))
def test_gna_op_gradients(case):
    layout, leading, trailing, heads, normalizer, tensors, needs = _gna_inputs(case)
    kw = dict(layout=layout, leading=leading, trailing=trailing, heads=heads, normalizer=normalizer)
    grad_out = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(8))
    out, got = _grads(lambda q, k, v, m: gna_attention_op(q, k, v, m, scale=0.35, **kw), tensors, needs,
                      grad_out, torch.float32)
    ref, want = _grads(lambda q, k, v, m: reference_gna(q, k, v, m, 0.35, layout, leading, normalizer, heads,
                                                        trailing), tensors, needs, grad_out, torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    _assert_close(got, want, case)


def test_gna_gradients_near_miss_layout_disagrees():
    # the comparison discriminates: the same op against a reference one window step wider is off
    layout, leading, trailing, heads, normalizer, tensors, needs = _gna_inputs("2d_leading_trailing")
    wider = GNALayout(layout.shape, (3, 5), layout.stride, layout.dilation, layout.causal)
    grad_out = torch.randn(tensors[0].shape, generator=torch.Generator().manual_seed(8))
    _, got = _grads(lambda q, k, v, m: gna_attention_op(q, k, v, m, scale=0.35, layout=layout, leading=leading,
                                                        trailing=trailing), tensors, needs, grad_out, torch.float32)
    _, want = _grads(lambda q, k, v, m: reference_gna(q, k, v, m, 0.35, wider, leading, trailing=trailing),
                     tensors, needs, grad_out, torch.float64)
    with pytest.raises(AssertionError):
        _assert_close(got, want, "wider layout")


def test_gna_recomputation_is_tiled_on_cpu():
    layout, leading, trailing, _, _, tensors, _ = _gna_inputs("2d_leading_trailing")
    q, k, v, _ = tensors
    q = q.clone().requires_grad_()  # as the backward recomputes: inputs needing gradients
    req = select.Request(caller="gna_attention", needs_grad=True)
    choice = select.choose(q, k, v, None, AttentionParams(scale=0.35), TokenLayout(layout, leading, trailing=trailing),
                           req)
    assert choice.name in ("cpu_native", "cpu_tiles")  # compiled forward + backward where C builds


# ---- opcheck -----------------------------------------------------------------------------------

def test_opcheck_attention():
    q, k, v = (x.requires_grad_() for x in _qkv(1, 4, 2, 10, 12, 8, seed=11))
    bias = torch.randn(1, 4, 10, 12).requires_grad_()
    torch.library.opcheck(torch.ops.attnopt.attention.default,
                          (q, k, v, bias, 0.3, True, "bottom_right", 4, -1, 0.0, "softmax"))
    torch.library.opcheck(torch.ops.attnopt.attention.default,
                          (q, k, v, _bool_mask(1, 10, 12, 2), 0.3, False, "top_left", -1, -1, 5.0, "softmax"))


def test_opcheck_gna_attention():
    q, k, v = (x.requires_grad_() for x in _qkv(1, 4, 2, 1 + 12 + 1, 1 + 12 + 1, 8, seed=12))
    torch.library.opcheck(torch.ops.attnopt.gna_attention.default,
                          (q, k, v, None, 0.3, [3, 4], [3, 3], [1, 1], [1, 1], [False, False], 1, "softmax",
                           [2, 3], 1))


# ---- optimize() results train ------------------------------------------------------------------

def _param_grads(model, kwargs, grad_out, names):
    params = dict(model.named_parameters())
    out = hf.first_tensor(model(**kwargs))
    return out, torch.autograd.grad(out, [params[n] for n in names], grad_out.to(out.dtype), allow_unused=True)


def _assert_param_grads(got, want, names, rel=1e-4):
    """Per parameter, relative to its own gradient with a floor at 1e-6 of the largest one (a key
    bias's gradient is exactly 0 in exact math: softmax ignores a per-row constant)."""
    top = max(w.norm().item() for w in want if w is not None)
    for n, a, b in zip(names, got, want):
        assert (a is None) == (b is None), n
        if b is not None:
            err = (a.double() - b.double()).norm().item()
            assert err <= rel * b.norm().item() + 1e-6 * top, f"{n}: {err:.3g} vs {b.norm().item():.3g}"


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_optimized_model_trains_like_the_original(name):
    zm = getattr(hf, name)()
    original = zm.model
    res = attnopt.optimize(copy.deepcopy(original), zm.kwargs)
    gm = res.model
    assert res.sites_rewritten == 2
    assert sum("attnopt" in str(n.target) for n in gm.graph.nodes) == 2
    names = [n for n, _ in original.named_parameters()]
    grad_out = torch.randn(hf.first_tensor(zm.run()).shape, generator=torch.Generator().manual_seed(0))
    _, want = _param_grads(original, zm.kwargs, grad_out, names)
    _, got = _param_grads(gm, zm.kwargs, grad_out, names)
    _assert_param_grads(got, want, names)
    # one SGD step on each: the outputs after it still agree
    for model, grads in ((original, want), (gm, got)):
        with torch.no_grad():
            for p, g in zip((dict(model.named_parameters())[n] for n in names), grads):
                if g is not None:
                    p -= 1e-2 * g
    torch.testing.assert_close(hf.first_tensor(gm(**zm.kwargs)), hf.first_tensor(original(**zm.kwargs)),
                               rtol=1e-4, atol=1e-4)


def _reference_gna_node(q, k, v, mask, scale, shape, window, stride, dilation, causal, leading, normalizer,
                        heads=(), trailing=0):
    return reference_gna(q, k, v, mask, scale, make_layout(shape, window, stride, dilation, causal), leading,
                         normalizer, heads, trailing)


def test_vit_with_approximate_gna_plan_trains():
    """ViT (4x4 patches + [CLS]) with a hand-made approximate plan (3x3 GNA, one site on two heads
    only): the op's parameter gradients match float64 autograd through the same graph with each
    gna_attention call replaced by the dense reference masked to its layout."""
    from attnopt.planner.search import make_plan

    zm = hf.vit()
    plan = make_plan(zm.model, zm.kwargs, policy="exact", target="cpu").to_json()
    plan["policy"], plan["max_error"] = "approx", 1.0
    for i, s in enumerate(plan["sites"]):
        s["choice"].update(name="approx:gna(grid 4x4 window 3x3 +1 global)", family="block_sparse_gna",
                           exact=False, q_tile=[4, 4], kv_tile=[4, 4], leading=1,
                           layout={"shape": [4, 4], "window": [3, 3], "stride": [1, 1], "dilation": [1, 1],
                                   "causal": [False, False]})
        if i:
            s["choice"]["heads"] = [0, 2]
    res = attnopt.optimize(copy.deepcopy(zm.model), zm.kwargs, plan=plan)
    gm = res.model
    assert [s.variant.startswith("approx:gna") for s in res.sites] == [True, True]
    ref = copy.deepcopy(gm)
    swapped = 0
    for n in ref.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.attnopt.gna_attention.default:
            n.target, swapped = _reference_gna_node, swapped + 1
    assert swapped == 2
    heads = [list(n.args[12]) if len(n.args) > 12 else [] for n in gm.graph.nodes
             if n.target is torch.ops.attnopt.gna_attention.default]
    assert heads == [[], [0, 2]]
    ref.recompile()
    ref.double()
    names = [n for n, _ in gm.named_parameters()]
    grad_out = torch.randn(hf.first_tensor(zm.run()).shape, generator=torch.Generator().manual_seed(0))
    out, got = _param_grads(gm, zm.kwargs, grad_out, names)
    ref_out, want = _param_grads(ref, {k: v.double() for k, v in zm.kwargs.items()}, grad_out, names)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    _assert_param_grads(got, want, names)


# ---- torch.compile(backend="attnopt") on training steps ---------------------------------------

def _tiny_bert(probs_dropout: float):
    from transformers import BertConfig, BertModel

    from zoo.sharpen import sharpen_

    cfg = BertConfig(vocab_size=hf.VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, return_dict=False,
                     attn_implementation="eager", use_cache=False, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=probs_dropout)
    torch.manual_seed(0)
    return sharpen_(BertModel(cfg, add_pooling_layer=False)).train()


def test_compiled_training_steps_match_eager(monkeypatch):
    """5 SGD steps of a tiny BERT (train mode, no dropout): eager vs torch.compile with the attnopt
    backend (AOTAutograd, so the joint graph holds the op and its backward op): the losses agree
    within 1e-4 relative at every step, and the backward op really ran."""
    from zoo.testing import spy_optimize

    from attnopt.codegen import autograd
    from attnopt.pipeline.backend import make_backend

    seen = spy_optimize(monkeypatch)
    recomputed = []
    real = autograd._FORWARDS["attention"]
    monkeypatch.setitem(autograd._FORWARDS, "attention", lambda *a, **kw: recomputed.append(1) or real(*a, **kw))
    eager = _tiny_bert(0.0)
    compiled_model = copy.deepcopy(eager)
    kwargs = hf._text_inputs(12)
    target = torch.randn(hf.B, 12, 32, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend=make_backend("aot_eager"))
    runs = [(eager, eager, torch.optim.SGD(eager.parameters(), lr=0.1)),
            (compiled_model, compiled, torch.optim.SGD(compiled_model.parameters(), lr=0.1))]
    for step in range(5):
        losses = []
        for _, fwd, opt in runs:
            opt.zero_grad()
            loss = ((fwd(**kwargs)[0] - target) ** 2).mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[1] - losses[0]) <= 1e-4 * abs(losses[0]), (step, losses)
    assert sum(r.sites_rewritten for r in seen) == 2
    assert len(recomputed) == 2 * 5  # two sites' backward ops, every step


def test_compiled_training_keeps_sites_with_probability_dropout(monkeypatch):
    # near miss: an active dropout on the attention probabilities has no counterpart in the ops
    from zoo.testing import spy_optimize

    from attnopt.pipeline.backend import make_backend

    seen = spy_optimize(monkeypatch)
    torch._dynamo.reset()
    model = _tiny_bert(0.3)
    out = torch.compile(model, backend=make_backend("eager"))(**hf._text_inputs(12))[0]
    out.sum().backward()
    assert sum(r.sites_rewritten for r in seen) == 0
    assert any("dropout" in r.reason for res in seen for r in res.rejected)


def test_export_and_joint_graph_hold_the_ops():
    """torch.export keeps both ops in a training-mode program; AOTAutograd's joint graph holds
    them and their backward ops (the fake implementations trace)."""
    from torch._functorch.aot_autograd import aot_export_module

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 24)
            self.bias = torch.nn.Parameter(torch.zeros(2, 14, 14))  # a learned bias: its gradient too

        def forward(self, x):
            q, k, v = self.proj(x).view(1, 14, 3, 2, 4).permute(2, 0, 3, 1, 4)
            a = gna_attention_op(q, k, v, self.bias, scale=0.5, layout=GNALayout((3, 4), (3, 3)), leading=1,
                                 trailing=1)
            b = attention_op(q, k, v, self.bias, scale=0.5, causal=True, window=(3, None))
            return ((a + b).sum(),)

    x = torch.randn(1, 14, 8)
    ep = torch.export.export(M(), (x,))
    assert {str(n.target) for n in ep.graph.nodes if "attnopt" in str(n.target)} == {
        "attnopt.gna_attention.default", "attnopt.attention.default"}
    joint, _ = aot_export_module(M(), (x,), trace_joint=True, output_loss_index=0)
    assert {str(n.target) for n in joint.graph.nodes if "attnopt" in str(n.target)} == {
        "attnopt.gna_attention.default", "attnopt.attention.default",
        "attnopt.gna_attention_backward.default", "attnopt.attention_backward.default"}


def _functions_called(fn) -> set[str]:
    """Names of the Python functions that run during fn() (sys.setprofile)."""
    import sys

    names: set[str] = set()

    def prof(frame, event, arg):
        if event == "call":
            names.add(frame.f_code.co_name)

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return names


def test_cpu_inference_fast_path_and_the_roads_it_leaves_alone():
    """A plain CPU call that needs no gradient runs the op's body straight from its AutogradCPU
    kernel (codegen/autograd.register_cpu_inference), skipping the custom op's own layers; calls that
    need gradients, and fake tensors, take the op's registered kernels. Results equal either way."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = _qkv(2, 4, 2, 3, 9, 8, seed=5)
    args = (None, 0.3, True, "bottom_right", -1, -1, 0.0, "softmax")
    with torch.no_grad():
        called = _functions_called(lambda: torch.ops.attnopt.attention(q, k, v, *args))
        fast = torch.ops.attnopt.attention(q, k, v, *args)
    assert "autograd_cpu" in called and "attention_math" in called
    assert "backend_impl" not in called and "forward_no_grad" not in called, called
    ref = reference_attention(q, k, v, None, scale=0.3, causal=True, causal_alignment="bottom_right")
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)

    qg = q.clone().requires_grad_()
    called = _functions_called(lambda: torch.ops.attnopt.attention(qg, k, v, *args).sum().backward())
    assert "backend_impl" in called and "attention_backward" in called, called
    torch.testing.assert_close(qg.grad, torch.autograd.functional.vjp(
        lambda x: reference_attention(x, k, v, None, scale=0.3, causal=True, causal_alignment="bottom_right"),
        q, torch.ones_like(fast))[1], atol=1e-5, rtol=1e-4)

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        with torch.no_grad():
            out = torch.ops.attnopt.attention(fq, fk, fv, *args)
    assert out.shape == fast.shape and type(out).__name__ == "FakeTensor"


def test_gna_op_cpu_inference_fast_path():
    """The GNA op's no-grad CPU calls take the same road (its schema's defaults left out by the
    dispatcher arrive as gna_math's defaults); equal to the exact GNA reference."""
    q, k, v = _qkv(1, 2, 2, 4 * 5 + 1, 4 * 5 + 1, 8, seed=6)
    layout = GNALayout((4, 5), (3, 3), (1, 1), (1, 1), (False, False))
    with torch.no_grad():
        called = _functions_called(lambda: gna_attention_op(q, k, v, None, scale=0.3, layout=layout, leading=1))
        out = gna_attention_op(q, k, v, None, scale=0.3, layout=layout, leading=1)
    assert "autograd_cpu" in called and "gna_math" in called and "backend_impl" not in called, called
    ref = reference_gna(q, k, v, None, 0.3, layout, leading=1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
