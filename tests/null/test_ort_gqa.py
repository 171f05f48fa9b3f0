"""ONNX Runtime: causal sites with a padding mask take GroupQueryAttention behind a run-time check
(emit/ort_gqa.py, issue 20 "lengths, not masks" on ONNX).

The dynamo exporter keeps sequence lengths symbolic, so the mask's structure cannot be proven
when the model is optimized; the rewrite checks it on the model's own mask at run time. At fixed
shapes (TorchScript) the key mask is folded into q and k and the check reads that key bias. Positive:
no, left, right and two-sided padding, a one-key row, a -inf fill (rows with no key stay NaN),
grouped kv heads. Near misses take the MultiHeadAttention branch with the dense mask: a hole in a
row's keys, a row with no key at all, a moderate fill (-1e4), a mask over extra keys that are
not causal (a window); non-causal masks never get the check.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from attnopt.emit.onnx import attention_ops, fused_nodes
from attnopt.pipeline.validate_onnx import session
from zoo.sharpen import sharpen_

S = 12


class Causal(nn.Module):
    """q/k/v from one Linear, causal & key-padding mask as an additive float tensor.
    fill: the masked value; window: also drop keys more than `window` back; kv: kv heads
    (repeated like HF's repeat_kv); causal=False: key padding only."""

    def __init__(self, fill=None, window=None, kv=4, causal=True, boolean=False):
        super().__init__()
        self.kv, self.fill, self.window, self.causal, self.boolean = kv, fill, window, causal, boolean
        self.q = nn.Linear(32, 32)
        self.kv_proj = nn.Linear(32, 2 * 8 * kv)

    def forward(self, x, attention_mask):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, 4, 8).transpose(1, 2)
        k, v = self.kv_proj(x).view(B, L, 2, self.kv, 8).permute(2, 0, 3, 1, 4)
        if self.kv != 4:
            k, v = (t[:, :, None].expand(B, self.kv, 4 // self.kv, L, 8).reshape(B, 4, L, 8) for t in (k, v))
        i = torch.arange(L, device=x.device)
        keep = attention_mask[:, None, None, :].bool()
        if self.causal:
            keep = keep & (i[None, :] <= i[:, None])[None, None]
        if self.window is not None:
            keep = keep & (i[None, :] > i[:, None] - self.window)[None, None]
        fill = torch.finfo(x.dtype).min if self.fill is None else self.fill
        mask = keep if self.boolean else torch.zeros(keep.shape, dtype=x.dtype).masked_fill(~keep, fill)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L, 32)


def _export(model, tmp_path, dynamo: bool = True) -> str:
    """dynamo: batch and length dynamic (the dense-mask check); else TorchScript at fixed shapes
    (the key mask folded into q and k, and the key check)."""
    x, am = torch.randn(3, S, 32), torch.ones(3, S, dtype=torch.long)
    dyn = torch.export.Dim.DYNAMIC
    path = tmp_path / "m.onnx"
    if dynamo:
        torch.onnx.export(model, (x, am), str(path), dynamo=True, input_names=["x", "attention_mask"],
                          dynamic_shapes=({0: dyn, 1: dyn}, {0: dyn, 1: dyn}))
    else:
        torch.onnx.export(model, (x, am), str(path), dynamo=False, opset_version=17,
                          input_names=["x", "attention_mask"])
    return str(path)


def _with_conds(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The model with every guard's condition as an extra output."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    conds = [o for n in m.graph.node for o in n.output if o.endswith("gqa_cond")]
    for c in conds:
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(c))
    return m, conds


def _masks(B=3, L=S) -> dict[str, np.ndarray]:
    out = {}
    am = np.ones((B, L), np.int64)
    out["none"] = am.copy()
    am[0, :4] = 0
    am[2, :L - 1] = 0  # one key
    out["left"] = am.copy()
    am = np.ones((B, L), np.int64)
    am[1, L - 5:] = 0
    am[2, 1:] = 0
    out["right"] = am.copy()
    am[0, :2] = 0
    am[0, L - 3:] = 0
    out["both"] = am
    holes = np.ones((B, L), np.int64)
    holes[1, 5] = 0
    out["hole"] = holes
    empty = np.ones((B, L), np.int64)
    empty[2] = 0
    out["no_key"] = empty
    return out


POSITIVE = ("none", "left", "right", "both")


def _run_cases(path: str, res, cases, want_branch: bool | None):
    """Each attention_mask case: the optimized model equals the exported one (NaN where it is NaN),
    and the guard takes the GroupQueryAttention branch iff `want_branch` (None: any)."""
    guarded, conds = _with_conds(res.model)
    s_new, s_old = session(guarded), session(path)
    x = np.random.default_rng(0).standard_normal((3, S, 32)).astype(np.float32)
    for name, am in _masks().items():
        if name not in cases:
            continue
        feeds = {"x": x, "attention_mask": am}
        want = s_old.run(None, feeds)[0]
        got, *flags = s_new.run(None, feeds)
        assert np.array_equal(np.isnan(got), np.isnan(want)), name
        fin = ~np.isnan(want)
        np.testing.assert_allclose(got[fin], want[fin], atol=2e-5, rtol=1e-4, err_msg=name)
        if want_branch is not None:
            assert [bool(f[0]) for f in flags] == [want_branch] * len(conds), name
    return conds


def test_padded_causal_takes_group_query_attention_when_the_mask_allows(tmp_path):
    model = sharpen_(Causal()).eval()
    path = _export(model, tmp_path)
    res = attnopt.optimize(onnx.load(path))
    assert res.sites_rewritten == 1
    assert res.sites[0].variant == "onnx:com.microsoft.MultiHeadAttention|com.microsoft.GroupQueryAttention"
    ops = sorted(attention_ops(res.model).values())
    assert ops == ["com.microsoft.GroupQueryAttention", "com.microsoft.MultiHeadAttention"]
    assert [n.op_type for n in fused_nodes(res.model)] == ["MultiHeadAttention"]  # one per site
    assert any(n.op_type == "If" for n in res.model.graph.node)
    conds = _run_cases(path, res, POSITIVE, True)
    assert len(conds) == 1
    _run_cases(path, res, ("hole", "no_key"), False)


def test_neg_inf_fill_keeps_nan_rows_and_grouped_heads(tmp_path):
    """-inf: rows with no key are NaN in the model, and in the GroupQueryAttention branch; kv heads
    repeated from 2 are read back as 2 (or kept at 4): either way the output matches."""
    model = sharpen_(Causal(fill=float("-inf"), kv=2)).eval()
    path = _export(model, tmp_path)
    res = attnopt.optimize(onnx.load(path))
    assert res.sites_rewritten == 1
    assert "com.microsoft.GroupQueryAttention" in attention_ops(res.model).values()
    _run_cases(path, res, POSITIVE, True)
    _run_cases(path, res, ("hole",), False)


class MultiQuery(nn.Module):
    """Written out: one kv head broadcast by matmul over 4 query heads, HF-style finfo.min mask."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 8), nn.Linear(32, 8)

    def forward(self, x, attention_mask):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, 4, 8).transpose(1, 2)
        k, v = self.k(x)[:, None], self.v(x)[:, None]  # [B, 1, L, 8]
        i = torch.arange(L, device=x.device)
        keep = attention_mask[:, None, None, :].bool() & (i[None, :] <= i[:, None])[None, None]
        mask = torch.zeros(keep.shape, dtype=x.dtype).masked_fill(~keep, torch.finfo(x.dtype).min)
        p = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5 + mask, dim=-1)
        return (p @ v).transpose(1, 2).reshape(B, L, 32)


def test_one_kv_head_broadcast_by_matmul(tmp_path):
    model = sharpen_(MultiQuery()).eval()
    path = _export(model, tmp_path)
    res = attnopt.optimize(onnx.load(path))
    assert res.sites_rewritten == 1, [(s.status, s.reason) for s in res.sites]
    gqa = [n for n in _all_nodes(res.model) if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 1
    _run_cases(path, res, POSITIVE, True)
    _run_cases(path, res, ("hole", "no_key"), False)


def _all_nodes(model):
    from attnopt.frontends.onnx_proto import all_nodes

    return list(all_nodes(model.graph.node))


def test_static_export_checks_the_folded_key_mask(tmp_path):
    """TorchScript at fixed shapes: the causal flag with the key mask folded into q and k, behind
    the key check; rows with no key give 0 (the exported model's guard), so left padding takes it."""
    model = sharpen_(Causal(boolean=True)).eval()
    path = _export(model, tmp_path, dynamo=False)
    res = attnopt.optimize(onnx.load(path))
    assert res.sites_rewritten == 1
    (mha,) = fused_nodes(res.model)
    assert any(a.name == "unidirectional" and a.i == 1 for a in mha.attribute)
    assert "com.microsoft.GroupQueryAttention" in attention_ops(res.model).values()
    _run_cases(path, res, POSITIVE, True)
    _run_cases(path, res, ("hole", "no_key"), False)


def test_static_additive_neg_inf_mask_falls_back_to_its_dense_mask(tmp_path):
    """TorchScript, an additive -inf mask: the flags + key mask form gives rows with no key 0 where
    the model gives NaN, so validation fails it and the site is redone with its own dense mask
    (no longer reverted): the dense check, whose rows with no key stay NaN."""
    model = sharpen_(Causal(fill=float("-inf"))).eval()
    path = _export(model, tmp_path, dynamo=False)
    res = attnopt.optimize(onnx.load(path))
    assert [s.status for s in res.sites] == ["rewritten"]
    (mha,) = fused_nodes(res.model)
    assert not any(a.name == "unidirectional" for a in mha.attribute)  # the dense mask
    assert "com.microsoft.GroupQueryAttention" in attention_ops(res.model).values()
    _run_cases(path, res, POSITIVE, True)
    _run_cases(path, res, ("hole", "no_key"), False)


def test_moderate_fill_is_a_near_miss(tmp_path):
    """-1e4 leaves exp() of masked scores above 0 for scores near 1e4: the check refuses it."""
    model = sharpen_(Causal(fill=-1e4)).eval()
    path = _export(model, tmp_path)
    res = attnopt.optimize(onnx.load(path))
    assert "com.microsoft.GroupQueryAttention" in attention_ops(res.model).values()  # (the spec is causal)
    _run_cases(path, res, tuple(_masks()), False)


@pytest.mark.parametrize("kw", [dict(window=4), dict(causal=False)])
def test_not_causal_and_padding_has_no_group_query_attention(tmp_path, kw):
    model = sharpen_(Causal(**kw)).eval()
    path = _export(model, tmp_path)
    res = attnopt.optimize(onnx.load(path))
    assert "com.microsoft.GroupQueryAttention" not in attention_ops(res.model).values()
    _run_cases(path, res, tuple(_masks()), None)


def test_splice_without_gqa_sites_keeps_multi_head_attention(tmp_path):
    from attnopt.emit.onnx import splice
    from attnopt.passes.detect import detect
    from attnopt.passes.rewrite import plan_all

    model = sharpen_(Causal()).eval()
    graph = attnopt.inspect(_export(model, tmp_path)).graph
    sites, _ = detect(graph)
    recipes, _ = plan_all(graph, sites)
    plain = splice(graph, recipes, gqa_sites=frozenset())
    assert set(attention_ops(plain).values()) == {"com.microsoft.MultiHeadAttention"}
    assert not any(n.op_type == "If" for n in plain.graph.node)


class _Logits(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).logits


def _hf(name: str) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if name == "gpt2":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128, attn_implementation="sdpa")
        return GPT2LMHeadModel(cfg)
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg)


@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
def test_transformers_decoders_exported_by_dynamo(name):
    """Real decoders (default return_dict, transformers' own masks) exported with dynamic batch and
    length: every layer takes the guarded form, and logits equal the export's at another length with
    no, left, right and two-sided padding and with a hole."""
    model = _Logits(sharpen_(_hf(name)).eval())
    ids = torch.randint(0, 128, (3, 16))
    dyn = torch.export.Dim.DYNAMIC
    prog = torch.onnx.export(model, (ids, torch.ones_like(ids)), dynamo=True, verbose=False,
                             dynamic_shapes=({0: dyn, 1: dyn}, {0: dyn, 1: dyn}),
                             input_names=["input_ids", "attention_mask"], output_names=["logits"])
    res = attnopt.optimize(prog.model_proto)
    assert [s.status for s in res.sites] == ["rewritten", "rewritten"]
    assert all("GroupQueryAttention" in s.variant for s in res.sites)
    a, b = session(prog.model_proto), session(res.model)
    ids2 = np.random.default_rng(1).integers(0, 128, (3, 20))
    for case in ("none", "left", "right", "both", "hole"):
        am = np.ones((3, 20), np.int64)
        if case in ("left", "both"):
            am[1, :7] = 0
        if case in ("right", "both"):
            am[2, 12:] = 0
        if case == "hole":
            am[0, 9] = 0
        want = a.run(None, {"input_ids": ids2, "attention_mask": am})[0]
        got = b.run(None, {"input_ids": ids2, "attention_mask": am})[0]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=case)
