"""The split-KV decode kernel (attnopt/codegen/triton/decode.py) under the Triton interpreter, against
the float64 reference; its row in the kernel table; stable tuning keys for a growing KV cache.

Layouts: q [B, H, Sq, D], k/v [B, Hkv, Skv, D]; kv_lens int32 [B] (valid keys at the end of the
cache with padding_side "left", at its start with "right"). The expected result of a ragged batch is
the reference run on each batch's valid keys alone, with sinks (first keys always visible past the
window's left limit) written into an explicit bool mask. Shapes are small: each interpreted program
step costs milliseconds.
"""
from __future__ import annotations

import pytest
import torch

from attnopt.codegen import autotune, select
from attnopt.codegen.ops import attention_op
from attnopt.codegen.params import AttentionParams
from attnopt.codegen.reference import alignment_offset, reference_attention

tk = pytest.importorskip("attnopt.codegen.triton")
from attnopt.codegen.triton import decode, launcher  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _interpreter(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))


def _sharp(B, H, Hkv, Sq, Skv, D, dtype, seed=0):
    """q, k, v with sharpened scores (x3): attention far from uniform, so a wrong key shows."""
    g = torch.Generator().manual_seed(seed)
    q = (3.0 * torch.randn(B, H, Sq, D, generator=g)).to(dtype)
    k = torch.randn(B, Hkv, Skv, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Skv, D, generator=g).to(dtype)
    return q, k, v


def expected(q, k, v, mask, p: AttentionParams, kv_lens=None, side="right", sinks=0):
    """Float64 reference per batch over its valid keys, causal / window / sinks as an explicit mask."""
    B, H, Sq, _ = q.shape
    Skv = k.shape[2]
    outs = []
    for b in range(B):
        n = Skv if kv_lens is None else int(kv_lens[b])
        if n == 0:  # no key at all: a dead row is 0, as the reference's (and SDPA's) safe softmax
            outs.append(torch.zeros(1, H, Sq, v.shape[3], dtype=torch.float64))
            continue
        keys = slice(Skv - n, Skv) if side == "left" else slice(0, n)
        qb, kb, vb = (t[b:b + 1].double() for t in (q, k, v))
        kb, vb = kb[:, :, keys], vb[:, :, keys]
        i = torch.arange(Sq)[:, None]
        j = torch.arange(n)[None, :]
        rel = j - i - alignment_offset(Sq, n, p.causal_alignment)
        left, right = p.window if p.window is not None else (None, None)
        keep = torch.ones(Sq, n, dtype=torch.bool)
        if p.causal:
            keep &= rel <= 0
        if right is not None:
            keep &= rel <= right
        if left is not None:
            keep &= (rel >= -left) | (j < sinks)
        mb = keep
        if mask is not None:
            m = mask.expand(B, H, Sq, Skv)[b:b + 1, :, :, keys]
            mb = (m & keep) if m.dtype == torch.bool else torch.where(keep, m.double(), float("-inf"))
        outs.append(reference_attention(qb, kb, vb, mb, scale=p.scale, softcap=p.softcap,
                                        normalizer=p.normalizer))
    return torch.cat(outs)


def _check(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), err


BR = dict(causal=True, causal_alignment="bottom_right")
# name: (B, H, Hkv, Sq, Skv, D), params, kv_lens, padding side, sinks, mask kind, dtype, config
CASES = {
    "mha_q1_fp32": ((1, 2, 2, 1, 200, 16), dict(BR), None, "right", 0, None, torch.float32, None),
    "gqa4_q3_ragged_right_fp16": ((2, 4, 1, 3, 150, 16), dict(BR), [150, 37], "right", 0, None,
                                  torch.float16, None),
    "gqa4_q3_ragged_left_bf16": ((2, 4, 1, 3, 150, 16), dict(BR), [61, 150], "left", 0, None,
                                 torch.bfloat16, None),
    "gqa8_q16_window_sinks_left": ((1, 8, 1, 16, 160, 16), dict(BR, window=(40, None)), [131], "left", 4,
                                   None, torch.float32, decode.DecodeConfig(32, 3)),
    "gqa8_q16_direct": ((1, 8, 1, 16, 96, 16), dict(BR), None, "right", 0, None, torch.float16,
                        decode.DecodeConfig(32, 1)),
    "mqa_q1_softcap_float_mask": ((2, 4, 1, 1, 130, 16), dict(BR, softcap=2.0), [130, 100], "right", 0,
                                  "float", torch.float32, None),
    "bool_mask_q3_fp16": ((2, 2, 1, 3, 120, 16), dict(BR), None, "right", 0, "bool", torch.float16, None),
    "window_both_sides_top_left": ((1, 2, 1, 3, 140, 80), dict(window=(30, 5)), [140], "right", 0, None,
                                   torch.float32, decode.DecodeConfig(32, 4)),
    "sinks_window_right_padding": ((2, 2, 2, 1, 200, 16), dict(BR, window=(50, None)), [200, 90], "right", 3,
                                   None, torch.float16, None),
    "causal_top_left_rect": ((1, 2, 2, 3, 100, 16), dict(causal=True), None, "right", 0, None,
                             torch.float32, None),
    "empty_cache_dead_rows": ((2, 2, 2, 1, 64, 16), dict(BR), [0, 64], "left", 0, None, torch.float32,
                              decode.DecodeConfig(32, 2)),
    "sigmoid_q1": ((1, 2, 2, 1, 100, 16), dict(normalizer="sigmoid"), [70], "right", 0, None,
                   torch.float32, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decode_matches_reference(name):
    (B, H, Hkv, Sq, Skv, D), kw, lens, side, sinks, mask_kind, dtype, cfg = CASES[name]
    q, k, v = _sharp(B, H, Hkv, Sq, Skv, D, dtype, seed=len(name))
    p = AttentionParams(scale=D ** -0.5, **kw)
    kv_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, 1, Skv, generator=g) > 0.3
        mask[..., -1] = True
    elif mask_kind == "float":
        mask = torch.randn(B, H, Sq, Skv, generator=g).to(dtype)
    ok, why = launcher.can_run_decode(q, k, v, mask, p, None, kv_lens, side, sinks)
    assert ok, why
    out = decode.launch(q, k, v, mask, p, kv_lens=kv_lens, padding_side=side, sinks=sinks, config=cfg)
    ref = expected(q, k, v, mask, p, kv_lens, side, sinks)
    _check(out, ref, dtype)
    if name == "empty_cache_dead_rows":
        assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_splits_agree_with_one_split():
    """The LSE combine of many splits gives the single-split (direct) result."""
    q, k, v = _sharp(1, 4, 2, 2, 256, 16, torch.float32, seed=7)
    p = AttentionParams(scale=0.25, **BR)
    one = decode.launch(q, k, v, None, p, config=decode.DecodeConfig(32, 1))
    many = decode.launch(q, k, v, None, p, config=decode.DecodeConfig(32, 8))
    assert (one - many).abs().max().item() <= 1e-5
    _check(many, expected(q, k, v, None, p), torch.float32)


def test_refusals():
    q, k, v = _sharp(1, 2, 2, 17, 64, 16, torch.float32)
    p = AttentionParams(scale=0.25)
    ok, why = launcher.can_run_decode(q, k, v, None, p)
    assert not ok and "q_len 17" in why
    q1 = q[:, :, :1]
    assert launcher.can_run_decode(q1, k, v, None, p)[0]
    ok, why = launcher.can_run_decode(q1, k, v, None, p, kv_lens=torch.tensor([3]))  # int64
    assert not ok and "int32" in why
    ok, why = launcher.can_run_decode(q1, k, v, None, p, kv_lens=torch.tensor([3, 4], dtype=torch.int32))
    assert not ok and "[B=1]" in why
    ok, why = launcher.can_run_decode(q1, k, v, None, p, padding_side="middle")
    assert not ok and "padding_side" in why


def test_table_picks_decode_for_decode_steps(monkeypatch):
    monkeypatch.setenv("ATTNOPT_FORCE_TRITON", "1")
    request = select.Request.for_op("attention")
    p = AttentionParams(scale=0.25, **BR)
    for sq, family in ((1, "triton_decode"), (16, "triton_decode"), (17, "triton_causal")):
        q, k, v = _sharp(1, 4, 2, sq, 64, 16, torch.float32)
        assert select.choose(q, k, v, None, p, None, request).name == family
    q, k, v = _sharp(1, 4, 2, 17, 64, 16, torch.float32)
    assert select.choose(q, k, v, None, AttentionParams(scale=0.25), None, request).name == "triton_dense"
    assert select.choose(q[:, :, :1], k, v, None, AttentionParams(scale=0.25), None,
                         select.Request(backend="triton")).name == "triton_decode"
    # the op runs it, end to end
    ran = []
    real = decode.decode_call
    monkeypatch.setattr(decode, "decode_call", lambda *a, **kw: ran.append(1) or real(*a, **kw))
    q, k, v = _sharp(1, 4, 2, 2, 80, 16, torch.float32, seed=3)
    out = attention_op(q, k, v, scale=0.25, **BR)
    assert ran == [1]
    _check(out, expected(q, k, v, None, p), torch.float32)


def test_growing_cache_tunes_once_per_bucket(monkeypatch):
    """Skv 100..300, one token per step: tuned once per power-of-two bucket (128, 256, 512), and
    the per-case memos gain one entry per bucket, not per step."""
    monkeypatch.setattr(decode, "_CHOSEN", {})
    monkeypatch.setattr(decode, "_TUNED", {})
    monkeypatch.setattr(decode, "tuning_active", lambda: True)
    monkeypatch.setattr(decode, "config_table", lambda device: "hopper")  # a real tuning space
    benched = []
    monkeypatch.setattr(decode, "_bench", lambda fn: benched.append(1) or 1e-3)
    monkeypatch.setattr(decode, "decode_call", lambda cfg, *a, **kw: None)  # nothing runs
    p = AttentionParams(scale=0.25, **BR)
    q, _, _ = _sharp(1, 8, 2, 1, 1, 16, torch.float32)
    configs = set()
    for skv in range(100, 301):
        k = torch.zeros(1, 2, skv, 16)
        configs.add(decode.chosen_config(q, k, k, None, p))
    n_candidates = len(decode.candidate_configs("hopper", 1, 2, 1, 512, decode.INTERPRETER_SMS))
    assert len(decode._CHOSEN) == 3 and len(decode._TUNED) == 3
    assert 3 * 2 <= len(benched) <= 3 * n_candidates


def test_dense_families_bucket_their_keys():
    """The other families' tuning key and per-case memo key: one per bucket over a growing cache."""
    from attnopt.ir import Variant

    p = AttentionParams(scale=0.25, causal=True, causal_alignment="bottom_right")
    q = torch.zeros(1, 4, 1, 16)
    case_keys, tune_keys = set(), set()
    for skv in range(100, 301):
        k = torch.zeros(1, 4, skv, 16)
        case_keys.add(launcher._case_key("causal", q, k, k, None, p, None))
        spec = launcher.spec_of(q, k, k, None, p, None)
        tune_keys.add(autotune.key_hash(launcher._tune_key(spec, Variant("causal", (64,), (64,)), q.device)))
    assert len(case_keys) == 3 and len(tune_keys) == 3
    assert [autotune.bucket(n) for n in (0, 1, 16, 17, 100, 128, 129)] == [0, 16, 16, 32, 128, 128, 256]


# ---- the CPU decode path (select.grouped_decode, row cpu_decode) --------------------------------

CPU_CASES = {
    "q1_gqa4_causal_br": ((2, 8, 2, 1, 300), dict(BR), None, torch.float32),
    "q4_gqa8_window_bool_mask": ((1, 8, 1, 4, 200), dict(BR, window=(30, None)), "bool", torch.float32),
    "q1_mqa_softcap_float_mask": ((2, 4, 1, 1, 150), dict(softcap=2.0), "float", torch.float32),
    "q3_gqa4_top_left_dead_rows": ((1, 4, 1, 3, 2), dict(causal=True, window=(0, 0)), "dead", torch.float32),
    "q1_gqa2_sigmoid_fp16": ((1, 4, 2, 1, 100), dict(normalizer="sigmoid"), None, torch.float16),
}


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_cpu_grouped_decode(name):
    (B, H, Hkv, Sq, Skv), kw, mask_kind, dtype = CPU_CASES[name]
    q, k, v = _sharp(B, H, Hkv, Sq, Skv, 16, dtype, seed=len(name))
    p = AttentionParams(scale=0.25, **kw)
    g = torch.Generator().manual_seed(2)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, Sq, Skv, generator=g) > 0.3
    elif mask_kind == "float":
        mask = torch.randn(B, H, Sq, Skv, generator=g)
    elif mask_kind == "dead":  # query 1 sees no key at all: the row is 0
        mask = torch.ones(Sq, Skv, dtype=torch.bool)
        mask[1] = False
    ref = reference_attention(q.double(), k.double(), v.double(), None if mask is None else
                              (mask if mask.dtype == torch.bool else mask.double()), **p.kwargs())
    out = select.grouped_decode(q, k, v, mask, p)
    _check(out, ref, dtype)
    if mask_kind == "dead":
        assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))


def test_cpu_decode_row_choice_and_gradients():
    request = select.Request.for_op("attention")
    p = AttentionParams(scale=0.25, **BR)
    picks = {}
    for H, Hkv, Sq in ((8, 2, 1), (8, 4, 1), (8, 2, 4), (8, 4, 4), (8, 8, 1), (8, 2, 16)):
        q, k, v = _sharp(1, H, Hkv, Sq, 64, 16, torch.float32)
        picks[(H // Hkv, Sq)] = select.choose(q, k, v, None, p, None, request).name
    # one query over a few keys: one SDPA call (cpu_small_decode); grouped rows from 4 queries
    assert picks == {(4, 1): "cpu_small_decode", (2, 1): "cpu_small_decode", (4, 4): "cpu_decode",
                     (2, 4): "sdpa", (1, 1): "cpu_small_decode", (4, 16): "sdpa"}
    q, k, v = (t.double().requires_grad_() for t in _sharp(1, 8, 2, 1, 40, 16, torch.float32))
    out = select.dispatch(q, k, v, None, p, None, select.Request(needs_grad=True))
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    reference_attention(q, k, v, None, **p.kwargs()).square().sum().backward()
    for g_ours, t in zip(grads, (q, k, v)):
        assert torch.allclose(g_ours, t.grad, atol=1e-10)


def test_near_misses_are_told_apart():
    """The checks above would catch a kernel that ignored sinks, read the wrong padding side or
    aligned the causal diagonal top-left: each near-miss expectation differs from the output."""
    q, k, v = _sharp(2, 4, 1, 2, 120, 16, torch.float32, seed=11)
    p = AttentionParams(scale=0.25, window=(20, None), **BR)
    lens = torch.tensor([120, 70], dtype=torch.int32)
    out = decode.launch(q, k, v, None, p, kv_lens=lens, padding_side="left", sinks=2)
    _check(out, expected(q, k, v, None, p, lens, "left", 2), torch.float32)
    for near in (expected(q, k, v, None, p, lens, "left", 0), expected(q, k, v, None, p, lens, "right", 2),
                 expected(q, k, v, None, AttentionParams(scale=0.25, window=(20, None), causal=True),
                          lens, "left", 2)):
        assert (out.double() - near).abs().max().item() > 1e-2
