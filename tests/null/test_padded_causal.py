"""Padded causal batches keep their causal structure (issue 20, "lengths, not masks").

A mask proven to be causal (or a causal window) AND a key-padding input on every row, fully masked
rows included, is passed to the op as its causal flag plus the input viewed [B, 1, 1, Skv]; the CPU
kernel then runs SDPA per batch row on the row's run of real keys; ONNX gets MultiHeadAttention's
unidirectional flag with the key mask folded into q and k. Near misses keep the dense mask:
a model that unmasks fully masked rows, an eager model's finite fill, keys with holes.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from attnopt.codegen import select
from attnopt.codegen.cpu import padded
from attnopt.codegen.params import AttentionParams
from attnopt.codegen.reference import reference_attention
from zoo.sharpen import sharpen_


def _key_mask(B: int, S: int, lens, left) -> torch.Tensor:
    m = torch.zeros(B, 1, 1, S, dtype=torch.bool)
    for b, (n, lft) in enumerate(zip(lens, left)):
        if lft:
            m[b, 0, 0, S - n:] = True
        else:
            m[b, 0, 0, :n] = True
    return m


def _dense(m: torch.Tensor, sq: int, skv: int) -> torch.Tensor:
    i = torch.arange(sq)[:, None]
    j = torch.arange(skv)[None, :]
    return m & (j <= i + (skv - sq))


@pytest.mark.parametrize("B,H,Hkv,S,lens,left", [
    (4, 4, 2, 160, (160, 120, 7, 0), (True, True, False, False)),
    (3, 6, 1, 200, (200, 199, 1), (False, True, True)),
    (2, 8, 8, 130, (64, 129), (True, False)),
])
def test_kernel_matches_reference(B, H, Hkv, S, lens, left):
    torch.manual_seed(0)
    q, k, v = torch.randn(B, H, S, 16), torch.randn(B, Hkv, S, 16), torch.randn(B, Hkv, S, 24)
    m = _key_mask(B, S, lens, left)
    p = AttentionParams(scale=0.3, causal=True, causal_alignment="bottom_right")
    choice = select.choose(q, k, v, m, p, None, select.Request.for_op("attention"))
    assert choice.name == "cpu_padded", choice.refusals
    out = select.dispatch(q, k, v, m, p, None, select.Request.for_op("attention"))
    kk, vv = (x.double().repeat_interleave(H // Hkv, 1) for x in (k, v))
    ref = reference_attention(q.double(), kk, vv, _dense(m, S, S), scale=0.3)
    ref = torch.nan_to_num(ref, nan=0.0)  # rows with no key: 0, as SDPA gives them
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_decode_step_and_broadcast_mask():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 300, 8), torch.randn(2, 2, 300, 8)
    m = _key_mask(2, 300, (300, 150), (True, True))
    p = AttentionParams(scale=0.5, causal=True, causal_alignment="bottom_right")
    out = padded.attention(q, k, v, m, p)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.5, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    q3 = torch.randn(2, 4, 300, 8)
    m1 = _key_mask(1, 300, (250,), (False,))  # one mask for every batch row
    ok, why = padded.can_run(q3, k, v, m1, p)
    assert ok, why
    ref = F.scaled_dot_product_attention(q3, k, v, attn_mask=_dense(m1, 300, 300), scale=0.5, enable_gqa=True)
    torch.testing.assert_close(padded.attention(q3, k, v, m1, p), ref, atol=1e-6, rtol=1e-5)


def test_near_misses_take_the_dense_path():
    q, k, v = torch.randn(2, 2, 160, 8), torch.randn(2, 2, 160, 8), torch.randn(2, 2, 160, 8)
    p = AttentionParams(scale=0.5, causal=True, causal_alignment="bottom_right")
    holes = torch.ones(2, 1, 1, 160, dtype=torch.bool)
    holes[1, 0, 0, 50:60] = False  # not left or right padding
    assert not padded.can_run(q, k, v, holes, p)[0]
    assert select.choose(q, k, v, holes, p, None, select.Request.for_op("attention")).name == "sdpa"
    out = select.dispatch(q, k, v, holes, p, None, select.Request.for_op("attention"))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=_dense(holes, 160, 160), scale=0.5)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert not padded.can_run(q, k, v, holes.float(), p)[0]  # a float mask
    assert not padded.can_run(q, k, v, torch.ones(2, 1, 160, 160, dtype=torch.bool), p)[0]  # per query
    assert not padded.can_run(q, k, v, holes, AttentionParams(scale=0.5))[0]  # not causal
    assert not padded.can_run(q, k, v, holes, AttentionParams(scale=0.5, causal=True, window=(8, 0)))[0]


# ---- the rewrite ---------------------------------------------------------------------------------

class PaddedCausal(nn.Module):
    """Causal attention over a padded batch written by hand: bool mask = tril & key padding.
    `unmask_dead`: rows with no key attend everything (what some libraries do to avoid NaN)."""

    def __init__(self, unmask_dead: bool = False, finite: bool = False):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.unmask_dead, self.finite = unmask_dead, finite

    def forward(self, x, attention_mask):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, 4, 8).permute(2, 0, 3, 1, 4)
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        mask = causal[None, None] & attention_mask[:, None, None, :].bool()
        if self.unmask_dead:
            mask = mask | ~mask.any(-1, keepdim=True)
        if self.finite:
            mask = torch.zeros(mask.shape, dtype=x.dtype).masked_fill(~mask, torch.finfo(x.dtype).min)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, S, 32)


def _pad_inputs(B=3, S=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, 32, generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    am[0, :5] = 0       # left padding
    am[1, S - 9:] = 0   # right padding
    return x, am


def _op_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and "attnopt.attention" in str(n.target)]


def _optimized(model, x, am):
    ep = torch.export.export(model, (x, am))
    res = attnopt.optimize(ep)
    return res, res.model.module() if hasattr(res.model, "module") else res.model


def test_padded_causal_site_gets_the_causal_flag():
    model = sharpen_(PaddedCausal()).eval()
    x, am = _pad_inputs()
    res, gm = _optimized(model, x, am)
    assert res.sites_rewritten == 1
    (call,) = _op_calls(gm.graph_module if hasattr(gm, "graph_module") else gm)
    assert call.args[5] is True  # causal
    assert tuple(call.args[3].meta["val"].shape) == (3, 1, 1, 24)  # the key mask, not [B, 1, S, S]
    for seed in (1, 2):  # other paddings than the example's
        x2, am2 = _pad_inputs(seed=seed)
        am2[2, :11] = 0
        torch.testing.assert_close(gm(x2, am2), model(x2, am2), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(unmask_dead=True), dict(finite=True)])
def test_near_miss_keeps_the_dense_mask(kw):
    model = sharpen_(PaddedCausal(**kw)).eval()
    x, am = _pad_inputs()
    res, gm = _optimized(model, x, am)
    assert res.sites_rewritten == 1
    (call,) = _op_calls(gm.graph_module if hasattr(gm, "graph_module") else gm)
    assert call.args[5] is False
    assert tuple(call.args[3].meta["val"].shape)[-2:] == (24, 24)
    torch.testing.assert_close(gm(x, am), model(x, am), atol=1e-5, rtol=1e-4)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, attn_implementation="sdpa")
    torch.manual_seed(0)
    return sharpen_(LlamaForCausalLM(cfg)).eval()


def test_llama_padded_batch_pt2_and_onnx(tmp_path):
    model = _llama()
    ids = torch.randint(0, 100, (2, 20))
    am = torch.ones(2, 20, dtype=torch.long)
    am[0, :6] = 0
    ep = torch.export.export(model, (ids,), dict(attention_mask=am, use_cache=False))
    res = attnopt.optimize(ep)
    assert res.sites_rewritten == 2
    gm = res.model.module()
    calls = _op_calls(gm)
    assert all(c.args[5] is True for c in calls)
    assert all(tuple(c.args[3].meta["val"].shape)[1:3] == (1, 1) for c in calls)
    am2 = torch.ones(2, 20, dtype=torch.long)
    am2[1, :13] = 0
    got = gm(ids, attention_mask=am2, use_cache=False).logits
    want = model(ids, attention_mask=am2, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)



@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_padded_causal_becomes_unidirectional(tmp_path, dynamo):
    """TorchScript: ORT's MultiHeadAttention with unidirectional=1 and the key mask folded into q
    and k; rows with no key (left padding) are zeroed after it, as the exported model gives them.
    The dynamo exporter writes the bool mask as a float one filled with finfo.min, whose rows with no
    key are a mean over every key: a near miss for the fold, it keeps the dense mask on
    MultiHeadAttention, behind a run-time check that takes GroupQueryAttention when the mask is causal
    AND one run of keys per row (emit/ort_gqa.py): the left-padded feed below takes that branch.
    TorchScript's folded key mask gets the same If, its check reading the folded key bias."""
    import onnx

    from attnopt.emit.onnx import attention_ops, fused_nodes
    from attnopt.pipeline.validate_onnx import session

    model = sharpen_(PaddedCausal()).eval()
    x, am = _pad_inputs()
    path = tmp_path / "padded.onnx"
    torch.onnx.export(model, (x, am), str(path), dynamo=dynamo, opset_version=18 if dynamo else 17,
                      input_names=["x", "attention_mask"])
    r = attnopt.optimize(onnx.load(str(path)))
    assert r.sites_rewritten == 1
    (mha,) = [n for n in fused_nodes(r.model) if n.op_type == "MultiHeadAttention"]
    assert any(a.name == "unidirectional" and a.i == 1 for a in mha.attribute) is not dynamo
    assert "com.microsoft.GroupQueryAttention" in attention_ops(r.model).values()
    am2 = am.clone()
    am2[2, :11] = 0
    feeds = {"x": x.numpy(), "attention_mask": am2.numpy()}
    got = session(r.model).run(None, feeds)[0]
    want = session(str(path)).run(None, feeds)[0]  # the exported model (dynamo's rows with no key differ from torch's)
    torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=1e-5, rtol=1e-4)


def test_small_decode_step_is_one_masked_sdpa_call():
    """A one-query step over few keys goes to one SDPA call with the key mask (row cpu_small_decode:
    reading the rows' runs costs more than the keys it skips, bench/op_overhead.py); a large one keeps
    the padded row, and so does a small one that needs gradients. All equal masked SDPA."""
    torch.manual_seed(2)
    p = AttentionParams(scale=0.4, causal=True, causal_alignment="bottom_right")
    request = select.Request.for_op("attention")
    for B, S, expect_padded in ((1, 640, False), (4, 9000, True)):
        q, k, v = torch.randn(B, 8, 1, 64), torch.randn(B, 2, S, 64), torch.randn(B, 2, S, 64)
        m = _key_mask(B, S, tuple(S - 37 * (b + 1) for b in range(B)), (True,) * B)
        choice = select.choose(q, k, v, m, p, None, request)
        assert choice.name == ("cpu_padded" if expect_padded else "cpu_small_decode"), (B, S, choice.refusals)
        if not expect_padded:
            grad = select.choose(q, k, v, m, p, None, dataclasses.replace(request, needs_grad=True))
            assert grad.name == "cpu_padded", grad.refusals
        out = select.dispatch(q, k, v, m, p, None, request)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.4, enable_gqa=True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
