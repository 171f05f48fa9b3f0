"""attnopt::attention vs reference_attention vs a naive float64 implementation written here.

Layouts: q [B, H, Sq, D], k/v [B, Hkv, Skv, D/Dv], masks broadcastable to [B, H, Sq, Skv].
"""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import attnopt.codegen  # noqa: F401  registers the op
from attnopt.codegen.exact import sdpa_can_run
from attnopt.codegen.ops import attention_op
from attnopt.codegen.params import AttentionParams
from attnopt.codegen.reference import reference_attention

OP = torch.ops.attnopt.attention.default


# ---------------------------------------------------------------- naive, independent implementation


def naive_allowed(q_len, kv_len, causal, alignment, window):
    """Explicit per-element predicate, written from the spec, in plain Python."""
    offset = kv_len - q_len if alignment == "bottom_right" else 0
    left, right = window if window is not None else (None, None)
    rows = []
    for i in range(q_len):
        row = []
        for j in range(kv_len):
            d = j - i - offset
            ok = True
            if causal and d > 0:
                ok = False
            if right is not None and d > right:
                ok = False
            if left is not None and d < -left:
                ok = False
            row.append(ok)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(q_len, kv_len)


def naive_attention(q, k, v, mask=None, *, scale, causal=False, causal_alignment="top_left",
                    window=None, softcap=None, normalizer="softmax"):
    b, h, sq, _ = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    kv_of = torch.tensor([hh * hkv // h for hh in range(h)])  # == hh // (h // hkv)
    qd, kd, vd = q.double(), k.double()[:, kv_of], v.double()[:, kv_of]
    s = torch.einsum("bhid,bhjd->bhij", qd, kd) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    keep = naive_allowed(sq, skv, causal, causal_alignment, window).expand(b, h, sq, skv).clone()
    if mask is not None:
        if mask.dtype == torch.bool:
            keep &= mask.expand(b, h, sq, skv)
        else:
            s = s + mask.double()
    s = s.masked_fill(~keep, -math.inf)
    if normalizer == "sigmoid":
        p = torch.where(torch.isneginf(s), torch.zeros_like(s), 1.0 / (1.0 + torch.exp(-s)))
    else:
        p = torch.softmax(s, dim=-1)
        p = torch.where(torch.isneginf(s).all(-1, keepdim=True), torch.zeros_like(p), p)
    return torch.einsum("bhij,bhjd->bhid", p, vd)


# ---------------------------------------------------------------- cases

def make(b, h, hkv, sq, skv, d, dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=g)
    k = torch.randn(b, hkv, skv, d, generator=g)
    v = torch.randn(b, hkv, skv, dv or d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def random_bool_mask(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) > 0.3
    m[..., 0] = True  # keep rows alive; fully masked rows have their own test
    return m


def random_float_mask(shape, seed=2):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=g) * 2.0
    return m.masked_fill(torch.rand(shape, generator=g) < 0.2, -math.inf).index_fill(-1, torch.tensor([0]), 0.0)


def key_padding(b, skv, lengths, as_float):
    keep = torch.arange(skv)[None, :] < torch.tensor(lengths)[:, None]
    keep = keep[:, None, None, :]  # [B, 1, 1, S]
    if as_float:
        return torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    return keep


# (name, shape args for make, mask factory or None, kwargs)
CASES = [
    ("dense", (2, 4, 4, 63, 63, 8), None, {}),
    ("dense_d80_dv8", (1, 3, 3, 63, 197, 80, 8), None, {}),
    ("causal_tl_sq<skv", (1, 4, 4, 63, 197, 8), None, dict(causal=True)),
    ("causal_tl_sq>skv", (1, 4, 4, 197, 63, 8), None, dict(causal=True)),
    ("causal_br_sq<skv", (1, 4, 4, 63, 197, 8), None, dict(causal=True, causal_alignment="bottom_right")),
    ("causal_br_sq>skv", (1, 4, 4, 197, 63, 8), None, dict(causal=True, causal_alignment="bottom_right")),
    ("gqa_4to1", (2, 8, 2, 63, 63, 8), None, {}),
    ("gqa_4to1_causal", (1, 8, 2, 63, 197, 80), None, dict(causal=True, causal_alignment="bottom_right")),
    ("mqa", (2, 4, 1, 63, 197, 8), None, {}),
    ("mqa_causal", (1, 4, 1, 63, 63, 80), None, dict(causal=True)),
    ("bool_mask_full", (2, 4, 4, 63, 197, 8), lambda: random_bool_mask((2, 4, 63, 197)), {}),
    ("float_mask_full", (2, 4, 4, 63, 197, 8), lambda: random_float_mask((2, 4, 63, 197)), {}),
    ("bool_mask_2d_causal", (1, 4, 4, 63, 63, 8), lambda: random_bool_mask((63, 63)), dict(causal=True)),
    ("float_mask_gqa_causal", (1, 8, 2, 63, 63, 8), lambda: random_float_mask((1, 1, 63, 63)), dict(causal=True)),
    ("key_padding_bool", (2, 4, 4, 63, 197, 8), lambda: key_padding(2, 197, [197, 100], False), {}),
    ("key_padding_float", (2, 4, 4, 63, 197, 8), lambda: key_padding(2, 197, [197, 100], True), {}),
    ("key_padding_bool_br", (2, 4, 2, 63, 197, 8), lambda: key_padding(2, 197, [150, 197], False),
     dict(causal=True, causal_alignment="bottom_right")),
    ("window_left_causal", (1, 4, 4, 197, 197, 8), None, dict(causal=True, window=(16, None))),
    ("window_left_only", (1, 4, 4, 197, 197, 8), None, dict(window=(16, None))),
    ("window_left_right", (1, 4, 4, 197, 197, 8), None, dict(window=(7, 5))),
    ("window_right_only", (1, 4, 4, 63, 63, 8), None, dict(window=(None, 3))),
    ("window_br_sq<skv", (1, 4, 2, 63, 197, 8), None, dict(window=(10, 2), causal_alignment="bottom_right")),
    ("window_mask", (2, 4, 4, 63, 63, 8), lambda: key_padding(2, 63, [63, 40], False), dict(window=(7, 7))),
    ("softcap", (1, 4, 4, 63, 63, 8), None, dict(softcap=5.0)),
    ("softcap_causal_mask", (1, 4, 2, 63, 197, 80), lambda: random_float_mask((1, 1, 63, 197)),
     dict(softcap=20.0, causal=True, causal_alignment="bottom_right")),
    ("sigmoid", (1, 4, 4, 63, 63, 8), None, dict(normalizer="sigmoid")),
    ("sigmoid_causal_mask", (2, 4, 2, 63, 63, 8), lambda: random_bool_mask((2, 1, 63, 63)),
     dict(normalizer="sigmoid", causal=True)),
    ("sigmoid_float_bias", (1, 4, 4, 63, 63, 8), lambda: torch.full((1, 1, 1, 63), -math.log(63)),
     dict(normalizer="sigmoid", window=(8, 8))),
]


@pytest.mark.parametrize("name,shape,mask_fn,kwargs", CASES, ids=[c[0] for c in CASES])
def test_fp32_op_reference_naive(name, shape, mask_fn, kwargs):
    q, k, v = make(*shape)
    mask = mask_fn() if mask_fn else None
    scale = 3.0 / math.sqrt(q.shape[-1])  # sharp attention so mistakes show
    want = naive_attention(q, k, v, mask, scale=scale, **kwargs)
    ref = reference_attention(q, k, v, mask, scale=scale, **kwargs)
    got = attention_op(q, k, v, mask, scale=scale, **kwargs)
    assert got.shape == want.shape and got.dtype == q.dtype
    assert got.is_contiguous()  # the fake impl promises contiguous [B, H, Sq, Dv]; inductor checks strides
    torch.testing.assert_close(ref.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


LOWP_CASES = [c for c in CASES if c[0] in
              ("dense", "causal_br_sq>skv", "gqa_4to1_causal", "float_mask_full", "key_padding_float",
               "window_left_right", "softcap_causal_mask", "sigmoid_causal_mask")]


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.bfloat16, 3e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name,shape,mask_fn,kwargs", LOWP_CASES, ids=[c[0] for c in LOWP_CASES])
def test_low_precision(name, shape, mask_fn, kwargs, dtype, tol):
    q, k, v = make(*shape, dtype=dtype)
    mask = mask_fn() if mask_fn else None
    scale = 1.0 / math.sqrt(q.shape[-1])
    want = naive_attention(q, k, v, mask, scale=scale, **kwargs)  # float64 of the rounded inputs
    ref = reference_attention(q, k, v, mask, scale=scale, **kwargs)
    got = attention_op(q, k, v, mask, scale=scale, **kwargs)
    assert got.dtype == dtype and ref.dtype == dtype
    torch.testing.assert_close(ref.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_low_precision_float32_mask_saturates_not_overflows():
    # A finite fp32 mask value (finfo(fp32).min) must not become -inf for fp16 SDPA: a row whose
    # keys are all "padded" this way is still a live row (finite, non-zero), never a dead one.
    q, k, v = make(1, 2, 2, 8, 8, 8, dtype=torch.float16)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 3, :] = torch.finfo(torch.float32).min
    got = attention_op(q, k, v, mask, scale=0.3)
    assert got.isfinite().all() and (got[:, :, 3].abs().sum(-1) > 0).all()
    saturated = mask.clamp_min(torch.finfo(torch.float16).min).half()
    torch.testing.assert_close(got, reference_attention(q, k, v, saturated, scale=0.3), atol=3e-3, rtol=3e-3)


# ---------------------------------------------------------------- fully masked rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_are_zero_like_sdpa(kind, dtype):
    """Documented behaviour: a row with no attended key outputs zeros (SDPA's safe softmax), not NaN."""
    q, k, v = make(2, 4, 4, 63, 63, 8, dtype=dtype)
    keep = random_bool_mask((2, 1, 63, 63))
    keep[:, :, [0, 5, 62]] = False
    mask = keep if kind == "bool" else torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, -math.inf)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    ref = reference_attention(q, k, v, mask, scale=0.3)
    got = attention_op(q, k, v, mask, scale=0.3)
    for out in (sdpa, ref, got):
        assert not out.isnan().any()
        assert (out[:, :, [0, 5, 62]] == 0).all()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), sdpa.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(ref.float(), sdpa.float(), atol=tol, rtol=tol)


def test_fully_masked_rows_structural_and_fallback_paths():
    # bottom-right causal with Sq > Skv: the first Sq - Skv rows see no key
    q, k, v = make(1, 2, 2, 20, 8, 8)
    for kw in (dict(), dict(softcap=4.0), dict(normalizer="sigmoid")):
        got = attention_op(q, k, v, scale=0.3, causal=True, causal_alignment="bottom_right", **kw)
        ref = reference_attention(q, k, v, scale=0.3, causal=True, causal_alignment="bottom_right", **kw)
        assert (got[:, :, :12] == 0).all() and not got.isnan().any()
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- trailing key padding (CPU)


def _padded(lengths, sq, skv, kind, full_rows=False):
    keep = key_padding(len(lengths), skv, lengths, as_float=False)
    if full_rows:  # HF's materialized [B, 1, Sq, Skv] form
        keep = keep.expand(len(lengths), 1, sq, skv).clone()
    if kind == "bool":
        return keep
    fill = {"float": torch.finfo(torch.float32).min, "neginf": -math.inf, "legacy": -10000.0}[kind]
    return torch.zeros(keep.shape).masked_fill(~keep, fill)


@pytest.mark.parametrize("full_rows", [False, True])
@pytest.mark.parametrize("kind", ["bool", "float", "neginf"])
def test_trailing_key_padding_is_skipped_exactly(kind, full_rows):
    from attnopt.codegen.exact import trim_padded_keys

    q, k, v = make(2, 4, 2, 63, 197, 8)
    mask = _padded([150, 100], 63, 197, kind, full_rows)
    trimmed = trim_padded_keys(k, v, mask, AttentionParams(scale=0.3))
    assert trimmed is not None and trimmed[0].shape[2] == 150 and trimmed[2].shape[-1] == 150
    got = attention_op(q, k, v, mask, scale=0.3)
    want = naive_attention(q, k, v, mask, scale=0.3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    untrimmed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(got, untrimmed, atol=1e-6, rtol=1e-6)


def test_trailing_key_padding_gradients_match():
    """Through the functional API, which shares the exact path with the op."""
    from attnopt.functional import attention

    q, k, v = (x.requires_grad_() for x in make(2, 4, 4, 40, 160, 8))
    mask = _padded([120, 90], 40, 160, "float")
    attention(q, k, v, mask=mask, scale=0.3).square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).square().sum().backward()
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (grads[1][:, :, 120:] == 0).all()


def test_trailing_key_padding_near_misses_are_not_trimmed():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from attnopt.codegen.exact import trim_padded_keys

    q, k, v = make(2, 4, 4, 63, 197, 8)
    p = AttentionParams(scale=0.3)
    pad = lambda kind="float", lengths=(150, 100): _padded(list(lengths), 63, 197, kind, True)  # noqa: E731
    assert trim_padded_keys(k, v, pad("legacy"), p) is None          # -10000 is not provably 0
    assert trim_padded_keys(k, v, pad(lengths=(197, 100)), p) is None  # one row has no padding
    assert trim_padded_keys(k, v, pad()[..., :1, :], p) is not None
    assert trim_padded_keys(k, v, pad()[..., :1], p) is None         # broadcast over keys
    assert trim_padded_keys(k, v, pad(), AttentionParams(scale=0.3, causal=True)) is None
    assert trim_padded_keys(k, v, pad(), AttentionParams(scale=0.3, window=(8, 8))) is None
    assert trim_padded_keys(k, v, pad()[:, :, :0], p) is None         # no query rows
    dead = pad()
    dead[1, 0, 7] = torch.finfo(torch.float32).min  # a query row that sees no key: uniform over all
    assert trim_padded_keys(k, v, dead, p) is None
    got = attention_op(q, k, v, dead, scale=0.3)
    torch.testing.assert_close(got[1, :, 7], v[1].mean(1), atol=1e-5, rtol=1e-5)
    with FakeTensorMode() as mode:
        fk, fv, fm = (mode.from_tensor(x) for x in (k, v, pad()))
        assert trim_padded_keys(fk, fv, fm, p) is None


# ---------------------------------------------------------------- routing and argument conventions


def test_routing_to_sdpa():
    q, k, v = make(1, 4, 2, 8, 8, 8)
    can = lambda **kw: sdpa_can_run(q, k, v, None, AttentionParams(scale=1.0, **kw))[0]  # noqa: E731
    assert can() and can(causal=True, causal_alignment="bottom_right") and can(window=(3, None))
    assert not can(softcap=3.0) and not can(normalizer="sigmoid")
    assert not sdpa_can_run(q, k.double(), v, None, AttentionParams(scale=1.0))[0]


def test_schema_conventions_and_validation():
    assert str(OP._schema) == (
        "attnopt::attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, bool causal, "
        "str causal_alignment, int window_left, int window_right, float softcap, str normalizer) -> Tensor"
    )
    q, k, v = make(1, 2, 2, 16, 16, 8)
    direct = OP(q, k, v, None, 0.3, False, "top_left", 4, -1, 0.0, "softmax")
    torch.testing.assert_close(direct, attention_op(q, k, v, scale=0.3, window=(4, None)))
    with pytest.raises(ValueError):
        attention_op(q, k, v, scale=0.3, window=(-2, None))
    with pytest.raises(ValueError):
        attention_op(q, k, v, scale=0.3, softcap=-1.0)
    with pytest.raises(ValueError):
        attention_op(q, k, v, scale=0.3, causal_alignment="diagonal")
    with pytest.raises(ValueError):
        attention_op(q, k, v, scale=0.3, normalizer="relu")


def test_opcheck():
    q, k, v = make(1, 4, 2, 12, 17, 8, 6)
    mask = random_bool_mask((1, 1, 12, 17))
    torch.library.opcheck(OP, (q, k, v, mask, 0.3, True, "bottom_right", 5, -1, 0.0, "softmax"))
    torch.library.opcheck(OP, (q, k, v, None, 0.3, False, "top_left", -1, -1, 10.0, "sigmoid"))


# ---------------------------------------------------------------- tracing


class Attn(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return attention_op(q, k, v, mask, scale=0.25, causal=True, causal_alignment="bottom_right",
                            window=(16, None), softcap=None)


def _inputs(sq, skv, seed=0):
    q, k, v = make(1, 4, 2, sq, skv, 16, 8, seed=seed)
    mask = key_padding(1, skv, [skv - 3], False)
    return q, k, v, mask


def _op_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == OP]


def test_fake_impl_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 8, 33, 80, dtype=torch.bfloat16)
        k = torch.empty(2, 2, 45, 80, dtype=torch.bfloat16)
        v = torch.empty(2, 2, 45, 24, dtype=torch.bfloat16)
        out = attention_op(q, k, v, torch.ones(2, 1, 1, 45, dtype=torch.bool), scale=0.1, causal=True)
        assert out.shape == (2, 8, 33, 24) and out.dtype == torch.bfloat16


def test_export_static_and_dynamic():
    args = _inputs(40, 56)
    ep = torch.export.export(Attn(), args)
    assert len(_op_nodes(ep.graph_module)) == 1
    torch.testing.assert_close(ep.module()(*args), Attn()(*args))

    s_q, s_kv = torch.export.Dim("s_q", min=2, max=1024), torch.export.Dim("s_kv", min=2, max=1024)
    shapes = ({2: s_q}, {2: s_kv}, {2: s_kv}, {3: s_kv})
    ep = torch.export.export(Attn(), args, dynamic_shapes=shapes)
    assert len(_op_nodes(ep.graph_module)) == 1
    for sq, skv in ((40, 56), (63, 197), (9, 5)):
        other = _inputs(sq, skv, seed=sq)
        out = ep.module()(*other)
        assert out.shape == (1, 4, sq, 8)
        torch.testing.assert_close(out, Attn()(*other))


def test_export_save_load_roundtrip_in_fresh_process(tmp_path):
    args = _inputs(40, 56)
    s_q, s_kv = torch.export.Dim("s_q", min=2, max=1024), torch.export.Dim("s_kv", min=2, max=1024)
    ep = torch.export.export(Attn(), args, dynamic_shapes=({2: s_q}, {2: s_kv}, {2: s_kv}, {3: s_kv}))
    torch.export.save(ep, tmp_path / "attn.pt2")
    other = _inputs(63, 197, seed=7)
    torch.save({"args": other, "want": Attn()(*other)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        import attnopt  # must register torch.ops.attnopt.attention
        ep = torch.export.load({str(tmp_path / "attn.pt2")!r})
        io = torch.load({str(tmp_path / "io.pt")!r})
        got = ep.module()(*io["args"])
        torch.testing.assert_close(got, io["want"])
        print("OK", tuple(got.shape))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "OK (1, 4, 63, 8)" in res.stdout, (
        "loading a .pt2 with attnopt::attention after only `import attnopt` failed; attnopt/__init__.py "
        "must import attnopt.codegen.\n" + res.stderr[-3000:]
    )


@pytest.mark.parametrize("backend,dynamic", [("aot_eager", True), ("inductor", False)])
def test_torch_compile_fullgraph(backend, dynamic):
    torch._dynamo.reset()
    mod = Attn()
    compiled = torch.compile(mod, fullgraph=True, backend=backend, dynamic=dynamic)
    for sq, skv in ((40, 56), (63, 197)) if dynamic else ((40, 56),):
        args = _inputs(sq, skv, seed=sq)
        torch.testing.assert_close(compiled(*args), mod(*args))
