"""The compiled CPU tile kernel (attnopt.codegen.cpu.native / cpu_tiles.c) against the dense reference,
its SDPA fallback, and how it degrades (no compiler, a failed build, inputs it does not take).

Layouts: q [B, H, N, D], k/v [B, Hkv, N, D|Dv]; GNA tokens are the row-major flattened grid.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil

import pytest
from gna_strategies import layouts
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F

from attnopt.codegen.cpu import tiles as cpu
from attnopt.codegen.cpu import native as cpu_native
from attnopt.codegen.params import AttentionParams
from attnopt.codegen.reference import reference_attention
from attnopt.sparsity.gna import dense_mask
from attnopt.ir import GNALayout

HAS_CC = shutil.which(os.environ.get("CC") or "cc") is not None
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler: the native kernel cannot be built here")


def _qkv(B, H, Hkv, Sq, Skv, D, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Sq, D, generator=g), torch.randn(B, Hkv, Skv, D, generator=g),
            torch.randn(B, Hkv, Skv, Dv or D, generator=g))


def _gna_ref(q, k, v, layout, p):
    return reference_attention(q.double(), k.double(), v.double(), torch.from_numpy(dense_mask(layout)),
                               **p.kwargs()).float()


def _assert_fp32_exact(out, q, k, v, layout, p):
    """out is as close to the float64 reference as fp32 SDPA with the dense mask is (x2, floor 1e-6):
    what floating-point noise means for these inputs."""
    ref = _gna_ref(q, k, v, layout, p)
    mask = torch.from_numpy(dense_mask(layout))
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=p.scale, enable_gqa=q.shape[1] != k.shape[1])
    noise = (sdpa - ref).abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= max(2 * noise, 1e-6), (err, noise)


@needs_cc
def test_native_kernel_builds_here():
    # where a compiler exists the kernel must build: a silent fallback would hide a broken build
    assert cpu_native.available()


CASES = {
    # layout, q_tile, (B, H, Hkv, D, Dv)
    "2d_stride1_8x8": (GNALayout((24, 24), (7, 7)), (8, 8), (1, 4, 4, 32, 32)),
    "2d_odd_tiles_overlap": (GNALayout((21, 19), (6, 5), (1, 1)), (5, 3), (2, 2, 2, 16, 16)),
    "2d_blocked_full_tiles": (GNALayout((32, 32), (8, 8), (8, 8)), (8, 8), (1, 2, 2, 64, 64)),
    "2d_unaligned_stride_dilation": (GNALayout((24, 20), (7, 5), (2, 5), (1, 2)), (4, 4), (1, 3, 3, 24, 24)),
    "2d_causal": (GNALayout((16, 16), (6, 6), (2, 1), (1, 1), (True, True)), (4, 8), (1, 2, 2, 16, 16)),
    "3d_mixed": (GNALayout((6, 8, 10), (3, 4, 5), (1, 2, 5), (2, 1, 1), (True, False, False)), (2, 4, 4),
                 (1, 2, 2, 16, 16)),
    "1d_dilated": (GNALayout((197,), (33,), (4,), (2,)), (64,), (1, 2, 2, 16, 16)),
    "gqa_4to1": (GNALayout((16, 16), (5, 5)), (8, 8), (2, 8, 2, 16, 16)),
    "mqa": (GNALayout((16, 16), (5, 5)), (4, 4), (1, 4, 1, 16, 16)),
    "head_dims_20_and_40": (GNALayout((16, 16), (5, 5)), (8, 8), (1, 2, 2, 20, 40)),
    "value_dim_8": (GNALayout((16, 16), (5, 5)), (8, 8), (1, 2, 2, 16, 8)),
    "q_block_over_64": (GNALayout((40, 40), (9, 9)), (16, 8), (1, 1, 1, 16, 16)),
}


@needs_cc
@pytest.mark.parametrize("name", list(CASES))
def test_native_matches_reference(name):
    layout, q_tile, (B, H, Hkv, D, Dv) = CASES[name]
    n = int(torch.tensor(layout.shape).prod())
    q, k, v = _qkv(B, H, Hkv, n, n, D, Dv, seed=len(name))
    p = AttentionParams(scale=D ** -0.5 * 1.7)
    assert cpu.native_runs(q, k, v, None, p)
    _assert_fp32_exact(cpu.gna_attention(q, k, v, layout, p, q_tile=q_tile), q, k, v, layout, p)


@needs_cc
def test_native_equals_sdpa_fallback_and_any_thread_count(monkeypatch):
    layout = GNALayout((21, 19), (6, 5))
    q, k, v = _qkv(2, 4, 2, 399, 399, 32, seed=5)
    p = AttentionParams(scale=0.3)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(cpu.gna_attention(q, k, v, layout, p, q_tile=(5, 3)))
    finally:
        torch.set_num_threads(threads)
    # every row is written by one tile whatever the split, so the result is bit-identical
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    monkeypatch.setattr(cpu, "native_runs", lambda *a: False)
    fallback = cpu.gna_attention(q, k, v, layout, p, q_tile=(5, 3))
    assert (outs[0] - fallback).abs().max().item() < 2e-6


@needs_cc
@pytest.mark.parametrize("kw", [dict(window=(16, 16)), dict(window=(40, None), causal=True),
                                dict(window=(9, 3), causal=True, causal_alignment="bottom_right")])
@pytest.mark.parametrize("lens", [(197, 197), (63, 197), (197, 63)])
def test_native_sliding_window(kw, lens):
    # (197, 63) with a two-sided window leaves late queries no key: their rows are zeros
    q, k, v = _qkv(1, 4, 2, lens[0], lens[1], 16, seed=7)
    p = AttentionParams(scale=0.3, **kw)
    assert cpu.native_runs(q, k, v, None, p)
    ref = reference_attention(q, k, v, None, **p.kwargs())
    assert (cpu.sliding_window_attention(q, k, v, p, q_tile=32) - ref).abs().max().item() < 2e-6


@needs_cc
def test_native_reads_strided_inputs_in_place():
    layout = GNALayout((12, 12), (5, 5))
    g = torch.Generator().manual_seed(3)
    qs, ks, vs = (torch.randn(2, 144, 4, 16, generator=g) for _ in range(3))  # [B, S, H, D] as models hold them
    q, k, v = (x.transpose(1, 2) for x in (qs, ks, vs))
    p = AttentionParams(scale=0.25)
    assert not q.is_contiguous() and cpu.native_runs(q, k, v, None, p)
    _assert_fp32_exact(cpu.gna_attention(q, k, v, layout, p, q_tile=(4, 4)), q, k, v, layout, p)


@needs_cc
def test_native_nan_reaches_exactly_the_rows_that_see_it():
    layout = GNALayout((16, 16), (5, 5))
    q, k, v = _qkv(1, 2, 2, 256, 256, 16, seed=4)
    k[0, 0, 100, 3] = float("nan")
    p = AttentionParams(scale=0.25)
    out = cpu.gna_attention(q, k, v, layout, p, q_tile=(8, 8))
    sees = torch.from_numpy(dense_mask(layout))[:, 100]
    assert torch.equal(out[0, 0].isnan().any(-1), sees)
    assert not out[0, 1].isnan().any()
    ref = _gna_ref(q, k, v, layout, p)
    assert (out - ref)[~ref.isnan()].abs().max().item() < 2e-6


@needs_cc
def test_native_large_scores_and_extreme_scale():
    # scores near fp32's exp range: the running max must keep exp finite and the sum exact
    layout = GNALayout((16, 16), (5, 5))
    q, k, v = _qkv(1, 1, 1, 256, 256, 16, seed=6)
    for scale in (40.0, 1e-4):
        p = AttentionParams(scale=scale)
        _assert_fp32_exact(cpu.gna_attention(q, k, v, layout, p, q_tile=(4, 4)), q, k, v, layout, p)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_native_half_inputs_computed_in_fp32(dtype):
    layout = GNALayout((16, 16), (5, 5), (2, 2))
    q, k, v = (x.to(dtype) for x in _qkv(1, 2, 2, 256, 256, 32, seed=8))
    p = AttentionParams(scale=32 ** -0.5)
    assert cpu.native_runs(q, k, v, None, p)
    out = cpu.gna_attention(q, k, v, layout, p, q_tile=(8, 8))
    assert out.dtype == dtype
    ref = _gna_ref(q.float(), k.float(), v.float(), layout, p)
    # only the final rounding to fp16/bf16 differs from the fp32 result of the same inputs
    assert torch.equal(out, ref.to(dtype)) or (out.float() - ref).abs().max().item() <= 2 * torch.finfo(dtype).eps


def _masks(B, H, S, seed):
    """The caller masks a user passes: key padding (bool, [B, 1, 1, S], one row fully padded), an additive
    per-head bias ([1, H, S, S]) with some -inf, a float padding mask as HF builds it ([B, 1, S, S])."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([S - 37, 0] + [S] * (B - 2))[:B]
    pad = (torch.arange(S)[None, :] < lens[:, None])[:, None, None, :]
    bias = torch.randn(1, H, S, S, generator=g) * 3
    bias[..., ::7] = float("-inf")
    hf = torch.zeros(B, 1, S, S).masked_fill(~pad, torch.finfo(torch.float32).min)
    return {"bool_padding": pad, "float_bias": bias, "hf_float_padding": hf}


@needs_cc
@pytest.mark.parametrize("kind", ["bool_padding", "float_bias", "hf_float_padding"])
def test_native_takes_the_callers_mask(kind):
    layout = GNALayout((16, 12), (5, 5), (1, 2))
    q, k, v = _qkv(2, 4, 2, 192, 192, 16, seed=9)
    mask = _masks(2, 4, 192, seed=10)[kind]
    p = AttentionParams(scale=0.3)
    assert cpu.native_runs(q, k, v, mask, p)
    allowed = torch.from_numpy(dense_mask(layout))
    dense = allowed & mask if mask.dtype == torch.bool else torch.where(allowed, mask, float("-inf"))
    ref = reference_attention(q.double(), k.double(), v.double(),
                              dense if dense.dtype == torch.bool else dense.double(), **p.kwargs()).float()
    out = cpu.gna_attention(q, k, v, layout, p, mask, q_tile=(4, 4))
    assert (out - ref).abs().max().item() < 2e-6
    fallback = cpu.run_plan(q, k, v, mask, p, cpu.gna_plan(layout, (4, 4)), native=False)
    assert (out - fallback).abs().max().item() < 2e-6
    if kind == "bool_padding":  # the fully padded sequence: every row sees no key, and gives zeros
        assert torch.equal(out[1], torch.zeros_like(out[1]))


@needs_cc
def test_native_window_with_padding_mask_in_half_precision():
    q, k, v = (x.bfloat16() for x in _qkv(2, 4, 2, 197, 197, 16, seed=11))
    mask = _masks(2, 4, 197, seed=12)["hf_float_padding"].bfloat16()
    p = AttentionParams(scale=0.25, causal=True, window=(31, 0))
    assert cpu.native_runs(q, k, v, mask, p)
    ref = reference_attention(q.float(), k.float(), v.float(), mask.float(), **p.kwargs())
    out = cpu.sliding_window_attention(q, k, v, p, mask, q_tile=32)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() <= 2 * torch.finfo(torch.bfloat16).eps * ref.abs().max().item()


def test_inputs_the_native_kernel_declines():
    q, k, v = _qkv(1, 2, 2, 64, 64, 16)
    p = AttentionParams(scale=0.25)
    assert not cpu.native_runs(q, k, v, torch.ones(64, 64, dtype=torch.int64), p)   # not bool or float
    assert not cpu.native_runs(q, k, v, None, AttentionParams(scale=0.25, softcap=5.0))
    assert not cpu.native_runs(q, k, v, None, AttentionParams(scale=0.25, normalizer="sigmoid"))
    assert not cpu.native_runs(q.double(), k.double(), v.double(), None, p)          # fp32 computes
    bias = torch.zeros(64, 64, requires_grad=True)                                   # a learned bias: its
    assert not cpu.native_runs(q.requires_grad_(), k, v, bias, p)                   # gradient is SDPA's
    assert not cpu.native_runs(q, k, v[..., :12].contiguous(), None, p)             # Dv % 8, with grad
    assert not cpu.native_runs(q.detach(), k, v[..., :12], None, p)                 # Dv % 8
    ok, why = cpu_native.can_run(q.detach(), k, v[..., :12], False)
    assert not ok and "multiple of 8" in why


def test_gradients_flow_through_the_fallback():
    layout = GNALayout((8, 8), (3, 3))
    q, k, v = (x.requires_grad_() for x in _qkv(1, 1, 1, 64, 64, 8))
    p = AttentionParams(scale=0.3)
    cpu.gna_attention(q, k, v, layout, p).sum().backward()
    assert q.grad is not None and k.grad.abs().sum() > 0


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A private build cache and a forgotten library, restored afterwards."""
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    cpu_native._library.cache_clear()
    yield
    cpu_native._library.cache_clear()


def _still_exact_without_native():
    layout = GNALayout((12, 12), (5, 5))
    q, k, v = _qkv(1, 2, 2, 144, 144, 16)
    p = AttentionParams(scale=0.25)
    assert not cpu.native_runs(q, k, v, None, p)
    _assert_fp32_exact(cpu.gna_attention(q, k, v, layout, p, q_tile=(4, 4)), q, k, v, layout, p)


def test_switched_off_by_environment(fresh_library, monkeypatch):
    monkeypatch.setenv("ATTNOPT_CPU_NATIVE", "0")
    assert not cpu_native.available()
    _still_exact_without_native()


def test_no_compiler_falls_back_with_one_warning(fresh_library, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with caplog.at_level(logging.WARNING, logger="attnopt.codegen.cpu.native"):
        assert not cpu_native.available()
        assert not cpu_native.available()
    assert len([r for r in caplog.records if "no C compiler" in r.message]) == 1
    _still_exact_without_native()


@needs_cc
def test_failed_build_falls_back_and_leaves_no_library(fresh_library, monkeypatch, tmp_path, caplog):
    broken = tmp_path / "cpu_tiles.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(cpu_native, "SOURCE", broken)
    with caplog.at_level(logging.WARNING, logger="attnopt.codegen.cpu.native"):
        assert not cpu_native.available()
    assert any("could not build" in r.message for r in caplog.records)
    assert not list((tmp_path / "native").glob("*.so")) and not list((tmp_path / "native").glob(".*"))
    _still_exact_without_native()


@needs_cc
def test_build_is_cached_on_disk(fresh_library, tmp_path):
    assert cpu_native.available()
    libs = list((tmp_path / "native").glob("cpu_tiles-*.so"))
    assert len(libs) == 1
    stamp = libs[0].stat().st_mtime_ns
    cpu_native._library.cache_clear()
    assert cpu_native.available() and libs[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


@needs_cc
@settings(max_examples=40, deadline=None)
@given(layout=layouts(), data=st.data())
def test_native_any_layout_any_tile(layout, data):
    # random layouts (1-D to 3-D, strides, dilations, causal), Q boxes, heads, head dims and leading tokens
    q_tile = tuple(data.draw(st.integers(1, 9)) for _ in layout.shape)
    leading = data.draw(st.integers(0, 2))
    H, group = data.draw(st.sampled_from([(2, 1), (4, 2), (3, 3)]))
    D, Dv = data.draw(st.sampled_from([(8, 8), (12, 16), (16, 24)]))
    n = leading + int(torch.tensor(layout.shape).prod())
    q, k, v = _qkv(1, H, H // group, n, n, D, Dv, seed=data.draw(st.integers(0, 99)))
    p = AttentionParams(scale=D ** -0.5)
    assert cpu.native_runs(q, k, v, None, p)
    out = cpu.gna_attention(q, k, v, layout, p, q_tile=q_tile, leading=leading)
    fallback = cpu.gna_attention(q, k, v, layout, p, q_tile=q_tile, leading=leading, native=False)
    assert (out - fallback).abs().max().item() < 2e-6


@needs_cc
def test_native_concurrent_callers_get_their_own_results():
    layout = GNALayout((16, 16), (5, 5))
    inputs = [_qkv(1, 2, 2, 256, 256, 16, seed=s) for s in range(6)]
    p = AttentionParams(scale=0.25)
    expected = [cpu.gna_attention(*x, layout, p, q_tile=(4, 4)) for x in inputs]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda x: cpu.gna_attention(*x, layout, p, q_tile=(4, 4)), inputs * 2))
    assert all(torch.equal(g, e) for g, e in zip(got, expected * 2))


def test_decode_steps_keep_to_sdpa_per_tile(monkeypatch):
    # one query per tile: the compiled kernel would waste 15/16 of its score work (see NATIVE_MIN_QUERIES)
    def refuse(*a, **kw):
        raise AssertionError("the compiled kernel ran a one-query tile")

    monkeypatch.setattr(cpu_native, "attend", refuse)
    q, k, v = _qkv(1, 4, 2, 1, 300, 16, seed=13)
    p = AttentionParams(scale=0.25, causal=True, causal_alignment="bottom_right", window=(63, 0))
    ref = reference_attention(q, k, v, None, **p.kwargs())
    assert (cpu.sliding_window_attention(q, k, v, p) - ref).abs().max().item() < 2e-6


@needs_cc
def test_portable_build_without_openmp_or_avx2(fresh_library, monkeypatch):
    # what a compiler without -fopenmp / -march=native builds (e.g. Apple clang): generic vector code,
    # the work split over Python threads
    monkeypatch.setattr(cpu_native, "FLAG_SETS", (["-O2"],))
    assert cpu_native.available() and not cpu_native._library().parallel
    layout = GNALayout((21, 19), (6, 5), (2, 1))
    q, k, v = _qkv(2, 4, 2, 399, 399, 16, Dv=24, seed=14)
    mask = _masks(2, 4, 399, seed=15)["bool_padding"]
    p = AttentionParams(scale=0.3)
    out = cpu.gna_attention(q, k, v, layout, p, mask, q_tile=(5, 3))
    fallback = cpu.gna_attention(q, k, v, layout, p, mask, q_tile=(5, 3), native=False)
    assert (out - fallback).abs().max().item() < 2e-6


def test_a_learned_bias_gets_its_gradient():
    # relative-position bias passed as the mask, q/k/v frozen: the forward-only kernel must not take it
    layout = GNALayout((8, 8), (3, 3))
    q, k, v = _qkv(1, 2, 2, 64, 64, 8)
    bias = torch.randn(1, 2, 64, 64, requires_grad=True)
    p = AttentionParams(scale=0.3)
    assert not cpu.native_runs(q, k, v, bias, p)
    cpu.gna_attention(q, k, v, layout, p, bias).square().sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0
