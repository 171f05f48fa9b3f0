"""Generated Triton kernels under the interpreter (TRITON_INTERPRET=1, set by a fixture) vs the
dense reference.

Layouts: q [B, H, S, D], k/v [B, Hkv, S_kv, D]; GNA tokens are the row-major flattened grid.
Shapes are small and odd (33, 63, 97; D 16 and 80) so the interpreter runs few inner steps.
Outputs are written into NaN-filled scratch first where the launcher allows it (GNA padding rows).
"""
from __future__ import annotations


import pytest  # noqa: E402
import torch  # noqa: E402

from attnopt.codegen import select  # noqa: E402
from attnopt.codegen.ops import attention_op  # noqa: E402
from attnopt.codegen.params import AttentionParams  # noqa: E402
from attnopt.codegen.reference import reference_attention  # noqa: E402
from attnopt.sparsity.gna import dense_mask  # noqa: E402
from attnopt.sparsity.simulator import simulate  # noqa: E402
from attnopt.ir import GNALayout  # noqa: E402

tk = pytest.importorskip("attnopt.codegen.triton")
from attnopt.codegen.triton.gna_tiles import gna_tile_plan  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _interpreter(tmp_path_factory, monkeypatch):
    # Set per test, not at import: a process that imported triton in interpreter mode could not
    # compile GPU kernels afterwards (tests/gpu in the same session). The launcher makes triton's
    # @jit standard library interpretable when triton was imported before this flag was set.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attnopt-cache"))


def _qkv(B, H, Hkv, Sq, Skv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Skv, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Skv, D, generator=g).to(dtype)
    return q, k, v


def _check(out, ref, dtype):
    assert out is not None
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out.float()).all()
    err = (out.float() - ref.float()).abs().max().item()
    scale = max(1.0, ref.float().abs().max().item())
    assert err <= TOL[dtype] * scale, err


DTYPES = [torch.float32, torch.float16]

CASES = {
    "dense": dict(shape=(1, 2, 2, 63, 63, 16), kw={}),
    "dense_d80": dict(shape=(1, 2, 2, 33, 97, 80), kw={}),
    "causal_top_left": dict(shape=(1, 2, 2, 97, 97, 16), kw=dict(causal=True)),
    "causal_top_left_rect": dict(shape=(1, 1, 1, 63, 97, 16), kw=dict(causal=True)),
    "causal_bottom_right": dict(shape=(1, 2, 2, 63, 97, 16), kw=dict(causal=True, causal_alignment="bottom_right")),
    "gqa_4to1": dict(shape=(1, 4, 1, 63, 63, 16), kw=dict(causal=True)),
    "mqa": dict(shape=(2, 3, 1, 33, 63, 16), kw={}),
    "softcap": dict(shape=(1, 2, 2, 63, 63, 16), kw=dict(softcap=2.0)),
    "sigmoid": dict(shape=(1, 2, 2, 63, 63, 16), kw=dict(normalizer="sigmoid")),
    "window": dict(shape=(1, 2, 2, 97, 97, 16), kw=dict(window=(9, 5))),
    "window_causal_bottom_right": dict(shape=(1, 2, 2, 33, 97, 80),
                                       kw=dict(window=(20, None), causal=True, causal_alignment="bottom_right")),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_dense_family(case, dtype):
    B, H, Hkv, Sq, Skv, D = CASES[case]["shape"]
    kw = CASES[case]["kw"]
    q, k, v = _qkv(B, H, Hkv, Sq, Skv, D, dtype)
    p = AttentionParams(scale=D ** -0.5, **kw)
    ok, family = select.can_run_triton(q, k, v, None, p)
    assert ok, family
    _check(select.launch_triton(q, k, v, None, p), reference_attention(q, k, v, None, **p.kwargs()), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["bias", "padding_bool", "bias_per_head"])
def test_masks(mask_kind, dtype):
    B, H, S, D = 2, 2, 63, 16
    q, k, v = _qkv(B, H, H, S, S, D, dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    if mask_kind == "bias":
        mask = torch.randn(1, 1, S, S, generator=g)
    elif mask_kind == "padding_bool":
        lengths = torch.tensor([40, 63])
        mask = (torch.arange(S)[None, :] < lengths[:, None])[:, None, None, :]   # [B, 1, 1, S]
    else:
        mask = torch.randn(B, H, S, S, generator=g).to(dtype)
    p = AttentionParams(scale=D ** -0.5, causal=mask_kind == "padding_bool")
    _check(select.launch_triton(q, k, v, mask, p), reference_attention(q, k, v, mask, **p.kwargs()), dtype)


def test_fully_masked_rows_are_zero():
    q, k, v = _qkv(1, 1, 1, 33, 33, 16, torch.float32)
    mask = torch.ones(33, 33, dtype=torch.bool)
    mask[5] = False
    p = AttentionParams(scale=0.25)
    out = select.launch_triton(q, k, v, mask, p)
    assert torch.equal(out[0, 0, 5], torch.zeros(16))
    _check(out, reference_attention(q, k, v, mask, **p.kwargs()), torch.float32)


GNA = {
    "2d_stride1": GNALayout((16, 12), (5, 6)),
    "2d_blocked_tile_aligned": GNALayout((16, 16), (8, 8), (8, 8)),        # perfectly block-sparse
    "2d_stride_unaligned_dilated": GNALayout((20, 18), (5, 6), (2, 3), (1, 2)),
    "2d_causal": GNALayout((12, 12), (5, 4), (1, 2), (1, 1), (True, True)),
    "3d": GNALayout((4, 8, 8), (2, 4, 4), (1, 2, 4), (1, 1, 1), (True, False, False)),
    "3d_dilated": GNALayout((4, 8, 6), (2, 3, 3), (2, 1, 1), (1, 2, 1)),
    "1d_dilated": GNALayout((97,), (9,), (2,), (3,)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(GNA))
def test_gna(name, dtype):
    layout = GNA[name]
    n = 1
    for x in layout.shape:
        n *= x
    D = 80 if name == "3d" else 16
    q, k, v = _qkv(1, 2, 1 if name.startswith("3d") else 2, n, n, D, dtype, seed=3)
    p = AttentionParams(scale=D ** -0.5, softcap=5.0 if name == "2d_causal" else None)
    ok, family = select.can_run_triton(q, k, v, None, p, layout)
    assert ok and family == "block_sparse_gna", family
    allowed = torch.from_numpy(dense_mask(layout))
    _check(select.launch_triton(q, k, v, None, p, layout), reference_attention(q, k, v, allowed, **p.kwargs()), dtype)


def test_gna_with_padding_mask_and_sigmoid():
    layout = GNA["2d_stride1"]
    q, k, v = _qkv(2, 2, 2, 192, 192, 16, torch.float32, seed=4)
    pad = (torch.arange(192)[None, :] < torch.tensor([150, 192])[:, None])[:, None, None, :]
    allowed = torch.from_numpy(dense_mask(layout)) & pad
    for normalizer in ("softmax", "sigmoid"):
        p = AttentionParams(scale=0.25, normalizer=normalizer)
        _check(select.launch_triton(q, k, v, pad, p, layout), reference_attention(q, k, v, allowed, **p.kwargs()),
               torch.float32)


@pytest.mark.parametrize("name", list(GNA))
def test_gna_tiles_match_simulator(name):
    """The kernel visits exactly the KV tiles the simulator counts, per Q tile."""
    layout = GNA[name]
    n = len(layout.shape)
    qt = {1: (64,), 2: (8, 8), 3: (4, 4, 4)}[n]
    plan = gna_tile_plan(layout, qt, qt)
    sim = simulate(layout, qt, qt)
    assert plan.visited == sim.total_kv_tiles
    assert (plan.counts[:, 1] == sim.kv_tiles_per_q.reshape(-1)).all()
    if not sim.fully_block_sparse:
        assert plan.element_mask  # clipped tiles may add masking (padding keys), never remove it
    if name == "2d_blocked_tile_aligned":
        assert not plan.element_mask  # no mask code compiled at all


def test_selection_order_and_reasons():
    q, k, v = _qkv(1, 2, 2, 33, 33, 16, torch.float32)
    assert select.triton_family(q, k, v, None, AttentionParams(scale=1.0, window=(3, 3), causal=True))[0] == "sliding_window"
    assert select.triton_family(q, k, v, None, AttentionParams(scale=1.0, causal=True))[0] == "causal"
    assert select.triton_family(q, k, v, None, AttentionParams(scale=1.0, normalizer="sigmoid"))[0] == "sigmoid"
    assert select.triton_family(q, k, v, None, AttentionParams(scale=1.0))[0] == "dense"
    big = torch.randn(1, 1, 8, 512)
    ok, why = select.can_run_triton(big, big, big, None, AttentionParams(scale=1.0))
    assert not ok and "head dim 512" in why and "dense:" in why
    assert select.launch_triton(big, big, big, None, AttentionParams(scale=1.0)) is None
    q64 = torch.randn(1, 1, 64, 16, dtype=torch.float64)
    assert not select.can_run_triton(q64, q64, q64, None, AttentionParams(scale=1.0))[0]


def test_generated_source_cached_on_disk(tmp_path, monkeypatch):
    from attnopt.codegen.triton import generator

    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(generator, "_MODULES", {})
    q, k, v = _qkv(1, 1, 1, 33, 33, 16, torch.float32)
    select.launch_triton(q, k, v, None, AttentionParams(scale=0.25, causal=True))
    files = list((tmp_path / "triton").glob("causal_dense_*.py"))
    assert len(files) == 1 and "def causal_fwd_kernel(" in files[0].read_text()
    cfg = generator.tuned_config({"k": 1}, generator.candidate_configs("interpreter", 2), lambda c: 1.0)
    assert cfg.q_tile == (8, 8)  # interpreter: first table entry, no tuning, no tune file
    assert not list((tmp_path / "triton").glob("tune-*.json"))


def test_tuned_config_persisted(tmp_path, monkeypatch):
    """On a GPU the first process autotunes and writes the choice; a second one reads it."""
    from attnopt.codegen.triton import generator

    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(generator, "_TUNED", {})
    configs = generator.candidate_configs("hopper", 1)
    timed = []
    best = generator.tuned_config({"spec": "x"}, configs, lambda c: timed.append(c) or (0.5 if c == configs[3] else 1.0))
    assert best == configs[3] and len(timed) == len(configs)
    monkeypatch.setattr(generator, "_TUNED", {})
    again = generator.tuned_config({"spec": "x"}, configs, lambda c: pytest.fail("retuned"))
    assert again == best and len(list((tmp_path / "triton").glob("tune-*.json"))) == 1


def test_force_triton_runs_the_op_through_the_kernel(monkeypatch):
    from attnopt.codegen.triton import launcher

    monkeypatch.setenv("ATTNOPT_FORCE_TRITON", "1")
    calls = []
    real = launcher.dense_call
    monkeypatch.setattr(launcher, "dense_call", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv(1, 4, 2, 33, 33, 16, torch.float32)
    out = attention_op(q, k, v, scale=0.25, causal=True, softcap=3.0)
    assert calls == [1]
    _check(out, reference_attention(q, k, v, scale=0.25, causal=True, softcap=3.0), torch.float32)
    big = torch.randn(1, 1, 8, 512)
    out = attention_op(big, big, big, scale=0.1)  # no kernel fits: exact path
    assert calls == [1] and torch.allclose(out, reference_attention(big, big, big, scale=0.1), atol=1e-5)


def test_triton_rows_serve_cuda_first():
    """The CUDA implementation of attnopt::attention tries the generated kernels before anything
    else (they used to be registered as its CUDA kernels; now they head the kernel table)."""
    triton_rows = [c for c in select.TABLE if c.group == "triton"]
    assert list(select.TABLE[:len(triton_rows)]) == triton_rows
    request = select.Request.for_op("attention")
    assert all(c.applies(request, "cuda")[0] for c in triton_rows)


def test_functional_triton_backend_on_interpreter():
    from attnopt.functional import attention

    q, k, v = _qkv(1, 2, 1, 144, 144, 16, torch.float32, seed=5)
    for kw in (dict(grid=(12, 12), window=5, stride=2), dict(window=(7, 3))):
        out = attention(q, k, v, backend="triton", **kw)
        _check(out, attention(q, k, v, backend="reference", **kw), torch.float32)
    with pytest.raises(RuntimeError, match="head dim"):
        big = torch.randn(1, 1, 8, 512)
        attention(big, big, big, backend="triton")


def test_finfo_min_additive_mask_matches_sdpa_on_fully_masked_rows():
    """HF masks with finfo.min: a row masked everywhere gets uniform weights in SDPA and eager
    softmax; the kernels must not turn it into -inf (weight 0) when moving to log2 units."""
    from attnopt.codegen.exact import exact_attention

    q, k, v = _qkv(2, 2, 2, 33, 33, 16, torch.float32)
    bias = torch.zeros(2, 1, 33, 33)
    low = torch.finfo(torch.float32).min
    bias[1, :, :, 20:] = low
    bias[0, :, 5, :] = low  # one query row masked everywhere
    bias[0, :, 7, :] = float("-inf")  # a real -inf row stays undefined (NaN in SDPA): skip it
    p = AttentionParams(scale=0.25)
    out = select.launch_triton(q, k, v, bias, p)
    ref = exact_attention(q, k, v, bias, p)
    rows = torch.ones(33, dtype=torch.bool)
    rows[7] = False
    assert (out[:, :, rows] - ref[:, :, rows]).abs().max().item() < 1e-5
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("leading,heads,causal,mask", [
    (0, (), False, None), (0, (1,), False, None), (2, (), False, None), (2, (0,), True, "bool"),
    (17, (), True, "bias"), (1, (), False, "bias")])
def test_gna_op_forced_triton(monkeypatch, leading, heads, causal, mask):
    """attnopt::gna_attention's accelerator path (run here by ATTNOPT_FORCE_TRITON=1 under the
    interpreter): the generated GNA kernel, with leading global tokens as one extra KV block per
    Q tile (17 leading keys: a 32-wide block, half padding) and the leading rows filled by SDPA;
    per-head splits around it; causal layouts; padding and bias masks."""
    from attnopt.codegen.gna_exact import reference_gna
    from attnopt.codegen.gna_op import gna_attention_op
    from attnopt.codegen.triton import launcher

    monkeypatch.setenv("ATTNOPT_FORCE_TRITON", "1")
    calls = []
    real = launcher.gna_call
    monkeypatch.setattr(launcher, "gna_call", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    layout = GNALayout((9, 7), (5, 3), (2, 1), (1, 1), (causal, False))
    S = leading + 63
    q, k, v = _qkv(2, 2, 2, S, S, 16, torch.float32, seed=3)
    m = None
    if mask == "bool":
        m = torch.ones(2, 1, 1, S, dtype=torch.bool)
        m[1, ..., -5:] = False
        m[1, ..., 0] = False  # a masked leading key
    elif mask == "bias":
        m = torch.randn(2, 1, S, S)
    out = gna_attention_op(q, k, v, m, scale=0.3, layout=layout, leading=leading, heads=heads)
    _check(out, reference_gna(q, k, v, m, 0.3, layout, leading, "softmax", heads), torch.float32)
    assert calls


@pytest.mark.parametrize("dtype", DTYPES)
def test_gna_kernel_leading_tokens_gqa_3d(dtype):
    """The kernel with leading keys on a 3-D layout under GQA 4:1, head dim 24 (padded to 32):
    grid rows against the dense reference (the leading rows are the caller's)."""
    from attnopt.codegen.gna_exact import reference_gna

    layout = GNALayout((3, 5, 6), (3, 3, 3), (1, 2, 1), (1, 1, 2), (True, False, False))
    leading = 3
    S = leading + 90
    q, k, v = _qkv(1, 4, 1, S, S, 24, dtype, seed=7)
    p = AttentionParams(scale=24 ** -0.5)
    out = select.launch_triton(q, k, v, None, p, layout, leading)
    ref = reference_gna(q.float(), k.float(), v.float(), None, p.scale, layout, leading).to(dtype)
    _check(out[:, :, leading:], ref[:, :, leading:], dtype)
    ok, why = select.can_run_triton(q, k, v, None, p, None, leading)
    assert not ok and "leading" in why
