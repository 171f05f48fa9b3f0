"""GQA spelled as a KV-head repeat before SDPA (issue 20, item 5): the op gets the unrepeated K/V.

transformers' sdpa attention repeats the KV heads (repeat_kv: x[:, :, None].expand(B, Hkv, n, S, D)
.reshape(B, H, S, D)) whenever a mask is passed, under torch.compile at every decode step. The
rewrite reads that repeat back (patterns/heads.kv_group_source) and hands attnopt's op K/V with
Hkv heads, so nothing is copied n times per call and the grouped decode row applies. Positive forms
(getitem None, unsqueeze, repeat_interleave) and near misses (the heads tiled instead of grouped,
a repeat along another axis, K and V repeated differently) are checked through the compile backend:
outputs equal eager SDPA's, and the K the op receives has Hkv heads only for the positive forms.
The decode row (codegen/select.py `cpu_decode`) is checked against float64 at a decode step's shapes.
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

from attnopt.codegen import select
from attnopt.codegen.params import AttentionParams
from attnopt.codegen.reference import reference_attention
from attnopt.pipeline.backend import _unit_axis_index, make_backend, unit_axis_views

B, HKV, N, S, D = 2, 2, 3, 12, 8
H = HKV * N


def _grouped(x):  # transformers' repeat_kv
    return x[:, :, None, :, :].expand(B, HKV, N, x.shape[2], D).reshape(B, H, x.shape[2], D)


FORMS = {
    "getitem_none": (_grouped, _grouped),
    "unsqueeze": (lambda x: x.unsqueeze(2).expand(B, HKV, N, S, D).reshape(B, H, S, D),) * 2,
    "repeat_interleave": (lambda x: x.repeat_interleave(N, dim=1),) * 2,
}
NEAR_MISSES = {
    # heads tiled: head h reads KV head h % Hkv (not h // n)
    "tiled_expand_axis1": (lambda x: x[:, None].expand(B, N, HKV, S, D).reshape(B, H, S, D),) * 2,
    "tiled_repeat": (lambda x: x.repeat(1, N, 1, 1),) * 2,
    # the unit axis after the sequence axis: the reshape mixes keys into heads
    "wrong_axis": (lambda x: x.unsqueeze(3).expand(B, HKV, S, N, D).reshape(B, H, S, D),) * 2,
    # k grouped, v tiled: the op cannot take one group count for both
    "k_grouped_v_tiled": (_grouped, lambda x: x.repeat(1, N, 1, 1)),
}


class Attn(torch.nn.Module):
    def __init__(self, rep_k, rep_v, masked: bool):
        super().__init__()
        self.rep_k, self.rep_v, self.masked = rep_k, rep_v, masked

    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, self.rep_k(k), self.rep_v(v),
                                              attn_mask=mask if self.masked else None)


def _inputs(q_len: int):
    g = torch.Generator().manual_seed(q_len)
    q = torch.randn(B, H, q_len, D, generator=g)
    k, v = torch.randn(B, HKV, S, D, generator=g), torch.randn(B, HKV, S, D, generator=g)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[0, ..., :4] = False  # left padding of row 0
    mask[..., -2:] = False     # cache slots not written yet
    return q, k, v, mask


def _run_compiled(model, inputs, monkeypatch):
    """Eager output, compiled output, and the K head counts every op call received."""
    heads = []
    real = select.dispatch

    def spy(q, k, *a, **kw):
        heads.append(k.shape[1])
        return real(q, k, *a, **kw)

    monkeypatch.setattr(select, "dispatch", spy)
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(*inputs)
        got = torch.compile(model, backend=make_backend("eager"))(*inputs)
    return ref, got, heads


@pytest.mark.parametrize("q_len", [1, 5])
@pytest.mark.parametrize("name", list(FORMS))
def test_repeat_kv_reaches_the_op_grouped(name, q_len, monkeypatch):
    ref, got, heads = _run_compiled(Attn(*FORMS[name], masked=True), _inputs(q_len), monkeypatch)
    assert heads and set(heads) == {HKV}
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_miss_repeats_stay_repeated(name, monkeypatch):
    ref, got, heads = _run_compiled(Attn(*NEAR_MISSES[name], masked=True), _inputs(1), monkeypatch)
    assert heads and set(heads) == {H}  # rewritten, but with K/V as the model built them
    assert torch.allclose(got, ref, atol=1e-5)


def test_unit_axis_views_spell_getitem_none_as_unsqueeze():
    assert [_unit_axis_index(i) for i in (
        (slice(None), slice(None), None), None, (Ellipsis, None, slice(None)), (None, Ellipsis),
        (slice(None), None, Ellipsis, slice(None)))] == [2, 0, -2, 0, 1]
    for index in ((slice(None), 0), (None, None), (slice(1, None), None), (Ellipsis, Ellipsis, None), 3):
        assert _unit_axis_index(index) is None

    def f(x):
        return x[:, :, None] * 2 + x[..., None, :] + x[None].sum(0)[:, None, ..., 0:1]

    gm = torch.fx.symbolic_trace(f)
    x = torch.randn(2, 3, 4)
    for node in gm.graph.nodes:  # dynamo's graphs carry example values; symbolic_trace's do not
        if node.op == "placeholder":
            node.meta["example_value"] = x
        elif node.target is operator.getitem and node.args[0].op == "placeholder":
            node.meta["example_value"] = x[node.args[1]]
    ref = f(x)
    assert unit_axis_views(gm) == 3  # x[:, :, None], x[..., None, :], x[None]
    assert torch.equal(gm(x), ref)
    assert sum(n.target == "unsqueeze" for n in gm.graph.nodes) == 3


def test_llama_decode_step_gets_grouped_kv(monkeypatch):
    """A Llama with GQA generating under the compile backend with a static cache: every decode
    step's op call reads the cache's Hkv heads, and the tokens equal eager SDPA's."""
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    model = tf.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[1, :2] = 0
    kw = {"attention_mask": am, "max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False,
          "cache_implementation": "static"}
    with torch.no_grad():
        ref = model.generate(ids, **kw)
    calls = []
    real = select.dispatch

    def spy(q, k, *a, **kwargs):
        calls.append((q.shape[2], k.shape[1]))
        return real(q, k, *a, **kwargs)

    monkeypatch.setattr(select, "dispatch", spy)
    torch._dynamo.reset()
    fwd = model.forward
    model.forward = torch.compile(fwd, backend=make_backend("eager"))
    try:
        with torch.no_grad():
            got = model.generate(ids, **kw)
    finally:
        model.forward = fwd
    assert torch.equal(got, ref)
    decode_heads = {kh for q_len, kh in calls if q_len == 1}
    assert decode_heads == {2}


@pytest.mark.parametrize("kv_len,mask_kind", [(40, "key"), (40, "none"), (40, "dead_row"), (6000, "key")])
def test_decode_row_with_key_mask_matches_float64(kv_len, mask_kind):
    """A one-query step with grouped heads: SDPA below SMALL_DECODE_KV_BYTES (row cpu_small_decode),
    the grouped matmul above it (6000 keys; a key mask [B, 1, 1, Skv] broadcast as it is; cpu_decode),
    both against float64."""
    g = torch.Generator().manual_seed(kv_len)
    q = torch.randn(3, 8, 1, 16, generator=g)
    k, v = torch.randn(3, 2, kv_len, 16, generator=g), torch.randn(3, 2, kv_len, 16, generator=g)
    mask = None
    if mask_kind != "none":
        mask = torch.rand(3, 1, 1, kv_len, generator=g) > 0.4
        if mask_kind == "dead_row":
            mask[1] = False  # a batch row with every key masked: 0, as SDPA gives
    p = AttentionParams(scale=0.25)
    request = select.Request.for_op("attention")
    kv_bytes = 2 * k.numel() * k.element_size()
    expect = "cpu_small_decode" if kv_bytes < select.SMALL_DECODE_KV_BYTES else "cpu_decode"
    assert select.choose(q, k, v, mask, p, None, request).name == expect
    ref = reference_attention(q.double(), k.double(), v.double(), mask, **p.kwargs())
    for out in (select.dispatch(q, k, v, mask, p, None, request), select.grouped_decode(q, k, v, mask, p)):
        assert (out.double() - ref).abs().max().item() < 1e-5
        if mask_kind == "dead_row":
            assert torch.equal(out[1], torch.zeros_like(out[1]))
