"""Build BERT-shaped ONNX encoders of any depth directly with onnx.helper (no export).

The form follows what torch's dynamo exporter writes for eager BERT attention: q/k/v by
MatMul+Add, heads split by Reshape+Transpose (k by perm (0,2,3,1)), Mul by the scale, Add of an
extended padding mask built once from the [batch, seq] attention_mask input (Unsqueeze, Cast,
Sub, Mul), Softmax, MatMul with v, heads merged, output projection, residual, LayerNorm and a
GELU MLP. Batch and sequence are symbolic. Used by bench/detect_scaling.py and tests.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def bert_like(layers: int, hidden: int = 64, heads: int = 4, ffn: int = 128, seed: int = 0,
              opset: int = 18) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    d = hidden // heads
    nodes, inits = [], []

    def w(name, *shape):
        inits.append(nh.from_array((rng.standard_normal(shape) * (2 / np.sqrt(shape[0]))
                                    ).astype(np.float32), name))
        return name

    def c(name, value, dtype=np.float32):
        inits.append(nh.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def n(op, ins, outs, **attrs):
        nodes.append(h.make_node(op, ins, outs, name=f"node_{outs[0]}", **attrs))
        return outs[0]

    c("axes12", [1, 2], np.int64)
    c("one", 1.0)
    c("neg", float(np.finfo(np.float32).min))
    c("scale", 1.0 / np.sqrt(d))
    c("split_heads", [0, 0, heads, d], np.int64)
    c("merge_heads", [0, 0, hidden], np.int64)
    n("Unsqueeze", ["attention_mask", "axes12"], ["mask4"])
    n("Cast", ["mask4"], ["maskf"], to=T.FLOAT)
    n("Sub", ["one", "maskf"], ["inv"])
    n("Mul", ["inv", "neg"], ["ext_mask"])
    x = "hidden_states"
    for i in range(layers):
        p = f"l{i}_"
        q = n("Add", [n("MatMul", [x, w(p + "wq", hidden, hidden)], [p + "qm"]),
                      c(p + "bq", np.zeros(hidden))], [p + "q"])
        k = n("Add", [n("MatMul", [x, w(p + "wk", hidden, hidden)], [p + "km"]),
                      c(p + "bk", np.zeros(hidden))], [p + "k"])
        v = n("Add", [n("MatMul", [x, w(p + "wv", hidden, hidden)], [p + "vm"]),
                      c(p + "bv", np.zeros(hidden))], [p + "v"])
        qh = n("Transpose", [n("Reshape", [q, "split_heads"], [p + "qr"])], [p + "qh"],
               perm=[0, 2, 1, 3])
        kt = n("Transpose", [n("Reshape", [k, "split_heads"], [p + "kr"])], [p + "kt"],
               perm=[0, 2, 3, 1])
        vh = n("Transpose", [n("Reshape", [v, "split_heads"], [p + "vr"])], [p + "vh"],
               perm=[0, 2, 1, 3])
        s = n("Mul", [n("MatMul", [qh, kt], [p + "qk"]), "scale"], [p + "scaled"])
        s = n("Add", [s, "ext_mask"], [p + "masked"])
        pr = n("Softmax", [s], [p + "probs"], axis=-1)
        o = n("MatMul", [pr, vh], [p + "ctx"])
        o = n("Reshape", [n("Transpose", [o], [p + "ctxt"], perm=[0, 2, 1, 3]), "merge_heads"],
              [p + "ctxm"])
        o = n("Add", [n("MatMul", [o, w(p + "wo", hidden, hidden)], [p + "om"]),
                      c(p + "bo", np.zeros(hidden))], [p + "o"])
        x1 = n("LayerNormalization", [n("Add", [x, o], [p + "res1"]),
                                      c(p + "g1", np.ones(hidden)), c(p + "b1", np.zeros(hidden))],
               [p + "ln1"], axis=-1)
        f = n("MatMul", [x1, w(p + "w1", hidden, ffn)], [p + "f1"])
        f = n("Gelu", [f], [p + "gelu"]) if opset >= 20 else n("Relu", [f], [p + "gelu"])
        f = n("MatMul", [f, w(p + "w2", ffn, hidden)], [p + "f2"])
        x = n("LayerNormalization", [n("Add", [x1, f], [p + "res2"]),
                                     c(p + "g2", np.ones(hidden)), c(p + "b2", np.zeros(hidden))],
              [p + "ln2"], axis=-1)
    graph = h.make_graph(
        nodes, f"bert_like_{layers}",
        [h.make_tensor_value_info("hidden_states", T.FLOAT, ["batch", "seq", hidden]),
         h.make_tensor_value_info("attention_mask", T.INT64, ["batch", "seq"])],
        [h.make_tensor_value_info(x, T.FLOAT, ["batch", "seq", hidden])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 9
    return model
