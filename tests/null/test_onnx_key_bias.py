"""Key-padding masks folded into q/k for com.microsoft.MultiHeadAttention (emit/ort.py), and
the axis analysis that proves a mask is one (onnx_axes.py): positive cases (exporters' padding
masks however broadcast), near misses that must keep the full attention_bias (a mask varying
along queries or heads), and numerics on rows with every key masked."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import attnopt
from attnopt.emit.onnx_axes import AxisFacts
from attnopt.emit.onnx import fused_nodes
from attnopt.pipeline.validate_onnx import session
from zoo import flavours
from zoo.hf import ZooModel
from zoo.sharpen import sharpen_
from zoo.testing import shared_dir

B, S, E, H = 2, 16, 32, 4
D = E // H


class Padded(nn.Module):
    """HF-style extended padding mask with a configurable fill; optionally a per-query band
    (a near miss: it varies along queries) or a per-head bias (varies along heads)."""

    def __init__(self, fill: float, extra: str = "none"):
        super().__init__()
        self.qkv, self.o = nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.fill, self.extra = fill, extra
        i = torch.arange(S)
        self.register_buffer("band", torch.where((i[:, None] - i[None]).abs() <= 4, 0.0, -1e4))
        self.register_buffer("head_bias", torch.randn(1, H, 1, S))

    def forward(self, x, attention_mask):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, H, D).permute(2, 0, 3, 1, 4)
        sc = q @ k.transpose(-1, -2) / math.sqrt(D)
        keep = attention_mask[:, None, None, :].bool()
        sc = sc + (1.0 - keep.to(x.dtype)) * self.fill
        if self.extra == "band":
            sc = sc + self.band[:s, :s]
        elif self.extra == "head":
            sc = sc + self.head_bias[..., :s]
        return self.o((torch.softmax(sc, -1) @ v).transpose(1, 2).reshape(b, s, E))


def _export(tmp_dir, name, module, exporter):
    torch.manual_seed(0)
    am = torch.ones(B, S, dtype=torch.long)
    am[1, -5:] = 0
    zm = ZooModel(name, sharpen_(module.float().eval(), seed=0),
                  {"x": torch.randn(B, S, E), "attention_mask": am}, [], family="hand")
    return (flavours.via_onnx_dynamo if exporter == "dynamo" else
            lambda z, d: flavours.via_onnx_torchscript(z, d, 17))(zm, tmp_dir)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return shared_dir(tmp_path_factory)


def _mha(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in fused_nodes(model) if n.op_type == "MultiHeadAttention"]


def _run(model, feeds):
    return session(model, None, threads=1).run(None, feeds)[0]


def _feeds(seed, dead_row: bool):
    g = np.random.default_rng(seed)
    am = np.ones((B, S), np.int64)
    am[1, -5:] = 0
    if dead_row:
        am[0] = 0  # every key of batch row 0 masked
    return {"x": g.standard_normal((B, S, E)).astype(np.float32), "attention_mask": am}


@pytest.mark.parametrize("exporter", ["dynamo", "ts17"])
@pytest.mark.parametrize("fill", [float(torch.finfo(torch.float32).min), -1e4])
def test_padding_mask_is_folded_into_q_and_k(export_dir, exporter, fill):
    """(1 - mask) * fill from a bool mask: folded when the fill masks exactly (finfo.min); a
    -1e4 fill is left as attention_bias: on a row with every key masked the model's result is
    its own rounding of score - 1e4, which the folded form rounds differently (1.4e-3 apart)."""
    tag = "min" if fill < -1e30 else "1e4"
    path = _export(export_dir, f"keybias_{tag}_{exporter}", Padded(fill), exporter)
    res = attnopt.optimize(str(path), onnx_op="ort")
    (mha,) = _mha(res.model)
    folded = fill < -1e30
    assert (len(mha.input) == 3) == folded, list(mha.input)  # 3 inputs: ORT's flash path
    assert any(n.output[0].endswith("k_aug") for n in res.model.graph.node) == folded
    onnx.checker.check_model(res.model, full_check=True)
    orig = onnx.load(str(path))
    for dead in (False, True):
        f = _feeds(1, dead)
        a, b = _run(orig, f), _run(res.model, f)
        assert np.isnan(a).sum() == np.isnan(b).sum() == 0
        # rows with every key masked: the model averages V there (finite fill); so must we
        np.testing.assert_allclose(b, a, atol=1e-4 * max(1.0, float(np.abs(a).max())), rtol=0)


@pytest.mark.parametrize("exporter", ["dynamo", "ts17"])
def test_trailing_padding_is_sliced_off_exactly(export_dir, exporter):
    """k/v end at the last key any query attends (trailing padding costs nothing): the live
    length is what the mask says, every key when a batch row masks them all, and the output
    matches the model in each case."""
    fill = float(torch.finfo(torch.float32).min)
    path = _export(export_dir, f"keybias_min_{exporter}", Padded(fill), exporter)
    res = attnopt.optimize(str(path), onnx_op="ort")
    lens = [o for n in res.model.graph.node for o in n.output if o.endswith("kb_live_len")]
    assert len(lens) == 1
    probe = onnx.ModelProto()
    probe.CopyFrom(res.model)
    probe.graph.output.append(h.make_tensor_value_info(lens[0], T.INT64, [1]))
    orig = onnx.load(str(path))
    g = np.random.default_rng(3)
    x = g.standard_normal((B, S, E)).astype(np.float32)
    for lengths, want in (((S - 3, S - 5), S - 3), ((S, S - 5), S), ((0, S - 5), S), ((1, 1), 1)):
        am = (np.arange(S)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
        f = {"x": x, "attention_mask": am}
        out, n = session(probe, None, threads=1).run(None, f)
        assert int(n[0]) == want, (lengths, n)
        a = _run(orig, f)
        np.testing.assert_allclose(out, a, atol=1e-4 * max(1.0, float(np.abs(a).max())), rtol=0)


@pytest.mark.parametrize("extra", ["band", "head"])
def test_masks_varying_along_queries_or_heads_keep_the_bias(export_dir, extra):
    path = _export(export_dir, f"keybias_near_{extra}", Padded(-1e4, extra), "dynamo")
    res = attnopt.optimize(str(path), onnx_op="ort")
    (mha,) = _mha(res.model)
    assert len(mha.input) == 6 and mha.input[5], list(mha.input)
    f = _feeds(2, False)
    np.testing.assert_allclose(_run(res.model, f), _run(onnx.load(str(path)), f), atol=1e-4, rtol=0)


# ---- the axis analysis on small graphs -----------------------------------------------------

def _facts(nodes, inputs, inits=()):
    """AxisFacts over the IR of a small model (its shapes, dtypes and constants, as the splice
    sees them)."""
    from attnopt.frontends.onnx import load_onnx

    g = h.make_graph(nodes, "g", inputs, [h.make_tensor_value_info(nodes[-1].output[0], T.FLOAT, None)],
                     list(inits))
    return AxisFacts.of_graph(load_onnx(h.make_model(g, opset_imports=[h.make_opsetid("", 18)])))


def test_axes_padding_broadcast_by_and_with_a_trivially_true_query_test():
    i = np.arange(S, dtype=np.int64).reshape(1, 1, S, 1)
    nodes = [h.make_node("Unsqueeze", ["am", "ax"], ["am4"]),  # [B, 1, 1, S]
             h.make_node("Cast", ["am4"], ["amb"], to=T.BOOL),
             h.make_node("GreaterOrEqual", ["qi", "zero"], ["qok"]),  # q_idx >= 0: all true
             h.make_node("And", ["qok", "amb"], ["both"]),  # [B, 1, S, S]
             h.make_node("Where", ["both", "fz", "fmin"], ["mask"])]
    f = _facts(nodes, [h.make_tensor_value_info("am", T.INT64, ["batch", "seq"])],
               [nh.from_array(np.array([1, 2], np.int64), "ax"), nh.from_array(i, "qi"),
                nh.from_array(np.array(0, np.int64), "zero"), nh.from_array(np.array(0.0, np.float32), "fz"),
                nh.from_array(np.array(-1e9, np.float32), "fmin")])
    assert f.varying("am4") == {-4, -1}
    assert f.varying("qok") == frozenset()  # folded: a constant all-true tensor
    assert f.varying("mask") == {-4, -1}


def test_axes_causal_mask_varies_along_queries():
    i = np.arange(S, dtype=np.int64)
    nodes = [h.make_node("LessOrEqual", ["kj", "qi"], ["causal"]),
             h.make_node("And", ["causal", "pad"], ["both"]),
             h.make_node("Where", ["both", "fz", "fmin"], ["mask"])]
    f = _facts(nodes, [h.make_tensor_value_info("pad", T.BOOL, ["batch", 1, 1, "seq"])],
               [nh.from_array(i.reshape(1, S), "kj"), nh.from_array(i.reshape(S, 1), "qi"),
                nh.from_array(np.array(0.0, np.float32), "fz"), nh.from_array(np.array(-1e9, np.float32), "fmin")])
    assert f.varying("causal") == {-2, -1}
    assert f.varying("mask") == {-4, -2, -1}


def test_axes_reshape_transpose_and_unknown_ops():
    nodes = [h.make_node("Shape", ["x"], ["shp"]),  # static [1, 1, 1, 8]
             h.make_node("Reshape", ["flat", "shp"], ["r"]),
             h.make_node("Transpose", ["r"], ["t"], perm=[0, 3, 1, 2]),
             h.make_node("Softmax", ["y"], ["sm"]),
             h.make_node("Identity", ["sm"], ["out"])]
    f = _facts(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 1, 1, 8]),
                       h.make_tensor_value_info("flat", T.FLOAT, [8]),
                       h.make_tensor_value_info("y", T.FLOAT, [1, 8, 1, 1])])
    assert f.varying("r") == {-1}
    assert f.varying("t") == {-3}
    assert f.varying("sm") == {-3}  # an unknown op: every axis whose size is not 1


def test_value_sets():
    nodes = [h.make_node("Cast", ["b"], ["bf"], to=T.FLOAT),
             h.make_node("Sub", ["one", "bf"], ["inv"]),
             h.make_node("Mul", ["inv", "fmin"], ["ext"]),  # (1 - b) * finfo.min: exact
             h.make_node("Mul", ["inv", "f4"], ["ext4"]),  # (1 - b) * -1e4: a moderate fill
             h.make_node("Cast", ["i"], ["if"], to=T.FLOAT),
             h.make_node("Sub", ["one", "if"], ["invi"]),
             h.make_node("Mul", ["invi", "fmin"], ["exti"]),  # an int input: not provably 0/1
             h.make_node("Where", ["b", "zero", "ninf"], ["w"])]
    f = _facts(nodes, [h.make_tensor_value_info("b", T.BOOL, ["batch", "seq"]),
                       h.make_tensor_value_info("i", T.INT64, ["batch", "seq"])],
               [nh.from_array(np.array(1.0, np.float32), "one"),
                nh.from_array(np.array(np.finfo(np.float32).min, np.float32), "fmin"),
                nh.from_array(np.array(-1e4, np.float32), "f4"), nh.from_array(np.array(0.0, np.float32), "zero"),
                nh.from_array(np.array(-np.inf, np.float32), "ninf")])
    assert f.zero_or_masked("ext") and f.zero_or_masked("w")
    assert not f.zero_or_masked("ext4") and not f.zero_or_masked("exti")


def test_axes_query_index_test_at_dynamic_length():
    """Exporters at dynamic lengths build "query index >= 0" from Range(0, n, 1): all true."""
    nodes = [h.make_node("Shape", ["s"], ["shp"]),
             h.make_node("Gather", ["shp", "i2"], ["n1"], axis=0),
             h.make_node("Squeeze", ["n1", "ax0"], ["n"]),
             h.make_node("Range", ["zero", "n", "one"], ["qi"]),
             h.make_node("Reshape", ["qi", "shape4"], ["qi4"]),
             h.make_node("GreaterOrEqual", ["qi4", "zero"], ["qok"]),
             h.make_node("Greater", ["qi4", "zero"], ["qpos"]),  # not always true (index 0)
             h.make_node("Identity", ["qok"], ["out"])]
    f = _facts(nodes, [h.make_tensor_value_info("s", T.FLOAT, ["batch", 4, "seq", "seq"])],
               [nh.from_array(np.array([2], np.int64), "i2"), nh.from_array(np.array([0], np.int64), "ax0"),
                nh.from_array(np.array(0, np.int64), "zero"), nh.from_array(np.array(1, np.int64), "one"),
                nh.from_array(np.array([1, 1, -1, 1], np.int64), "shape4")])
    assert f.varying("qok") == frozenset()
    assert f.varying("qpos") != frozenset()
