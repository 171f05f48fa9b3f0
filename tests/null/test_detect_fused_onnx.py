"""Detection of already-fused ONNX attention nodes: com.microsoft MultiHeadAttention,
Attention and GroupQueryAttention, and the standard opset-23 Attention, with exact specs."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import attnopt


def _vi(name, shape, dt=T.FLOAT):
    return h.make_tensor_value_info(name, dt, shape)


def _inspect(nodes, inputs, outputs, inits=(), opset=17, ms=True):
    opsets = [h.make_opsetid("", opset)] + ([h.make_opsetid("com.microsoft", 1)] if ms else [])
    m = h.make_model(h.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=opsets)
    m.ir_version = 10
    return attnopt.inspect(m)


def test_ms_multihead_attention_with_key_padding():
    nodes = [h.make_node("MultiHeadAttention", ["q", "k", "v", "", "kpm"], ["y"],
                         domain="com.microsoft", num_heads=4, scale=0.5)]
    r = _inspect(nodes, [_vi("q", [2, 10, 32]), _vi("k", [2, 12, 32]), _vi("v", [2, 12, 32]),
                         _vi("kpm", [2, 12], T.INT32)], [_vi("y", [2, 10, 32])])
    (s,) = r.sites
    sp = s.spec
    assert s.pattern == "fused:ms_mha"
    assert (sp.batch, sp.num_heads, sp.num_kv_heads, sp.q_len, sp.kv_len, sp.head_dim) == (2, 4, 4, 10, 12, 8)
    assert sp.scale == 0.5
    assert sp.mask.kind == "padding" and sp.mask.padding


def test_ms_mha_unidirectional_default_scale():
    nodes = [h.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft",
                         num_heads=2, unidirectional=1)]
    r = _inspect(nodes, [_vi("q", [1, 6, 16]), _vi("k", [1, 6, 16]), _vi("v", [1, 6, 16])],
                 [_vi("y", [1, 6, 16])])
    (s,) = r.sites
    assert s.spec.head_dim == 8 and abs(s.spec.scale - 8 ** -0.5) < 1e-12
    assert s.spec.mask.kind == "causal"


def test_ms_attention_packed_qkv():
    w = nh.from_array(np.zeros((32, 96), np.float32), "w")
    bias = nh.from_array(np.zeros((96,), np.float32), "bias")
    nodes = [h.make_node("Attention", ["x", "w", "bias", "mi"], ["y"], domain="com.microsoft",
                         num_heads=4, unidirectional=1)]
    r = _inspect(nodes, [_vi("x", [2, 9, 32]), _vi("mi", [2, 9], T.INT32)], [_vi("y", [2, 9, 32])],
                 [w, bias])
    (s,) = r.sites
    sp = s.spec
    assert (sp.num_heads, sp.q_len, sp.kv_len, sp.head_dim) == (4, 9, 9, 8)
    assert sp.mask.kind == "causal" and sp.mask.padding


def test_ms_group_query_attention_local_window():
    nodes = [h.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "sl", "tl"], ["z"],
                         domain="com.microsoft", num_heads=4, kv_num_heads=2, local_window_size=5,
                         softcap=30.0)]
    r = _inspect(nodes, [_vi("q", [1, 8, 32]), _vi("k", [1, 8, 16]), _vi("v", [1, 8, 16]),
                         _vi("sl", [1], T.INT32), _vi("tl", [1], T.INT32)], [_vi("z", [1, 8, 32])])
    (s,) = r.sites
    sp = s.spec
    assert (sp.num_heads, sp.num_kv_heads, sp.head_dim, sp.q_len, sp.kv_len) == (4, 2, 8, 8, 8)
    assert sp.mask.kind == "sliding_window" and (sp.mask.left, sp.mask.right) == (5, 0)
    assert "softcap:30.0" in sp.score_mods


def test_standard_attention_opset23_bhsd_with_bool_mask():
    mask = nh.from_array(np.tril(np.ones((6, 6), bool))[None, None], "m")
    nodes = [h.make_node("Attention", ["q", "k", "v", "m"], ["y"], scale=0.3)]
    r = _inspect(nodes, [_vi("q", [2, 4, 6, 8]), _vi("k", [2, 2, 6, 8]), _vi("v", [2, 2, 6, 8])],
                 [_vi("y", [2, 4, 6, 8])], [mask], opset=23, ms=False)
    (s,) = r.sites
    sp = s.spec
    assert (sp.num_heads, sp.num_kv_heads, sp.q_len, sp.head_dim) == (4, 2, 6, 8)
    assert abs(sp.scale - 0.3) < 1e-7 and sp.mask.kind == "causal" and not sp.mask.padding
