"""An ONNX case: the choices as an ONNX graph (onnx.helper), its feeds, and an ORT run."""
from __future__ import annotations

import math
from typing import Any

from attnopt.testing.fuzz.grammar import check_choices, scale_value


def onnx_model(c: dict[str, Any]):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    check_choices(c)
    B, H, KVH, S, Sk, D, Dv = c["B"], c["H"], c["KVH"], c["S"], c["Sk"], c["D"], c["Dv"]
    near = c["near"]
    fp16 = c["dtype"] == "float16"
    ET = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    npdt = np.float16 if fp16 else np.float32
    rng = np.random.default_rng(c["seed"] + 1)
    nodes, inits, inputs, outputs = [], [], [], []
    cnt = [0]

    def name(p: str) -> str:
        cnt[0] += 1
        return f"{p}_{cnt[0]}"

    def const(val, dtype=None) -> str:
        n = name("c")
        arr = np.asarray(val, dtype=dtype if dtype is not None else npdt)
        inits.append(numpy_helper.from_array(arr, n))
        return n

    def node(op, ins, **attrs) -> str:
        out = name(op.lower())
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    dyn = near == "dynamic_seq"
    sdim = "S" if dyn else S
    skdim = "S" if dyn and not c["cross"] else ("Sk" if dyn else Sk)
    sc = scale_value(c)
    if c["layout"] == "proj":
        inputs.append(helper.make_tensor_value_info("x", ET, [B, sdim, H * D]))

        def proj(nh, d):
            w = const((rng.standard_normal((H * D, nh * d)) * 2 / math.sqrt(H * D)).astype(npdt))
            y = node("MatMul", ["x", w])
            y = node("Reshape", [y, const([0, 0, nh, d], np.int64)])
            return y
        q = node("Transpose", [proj(H, D)], perm=[0, 2, 1, 3])
        kb = proj(KVH, D)  # [B,S,KVH,D]
        v = node("Transpose", [proj(KVH, Dv)], perm=[0, 2, 1, 3])
    else:
        inputs.append(helper.make_tensor_value_info("q", ET, [B, H, sdim, D]))
        kshape = [B, KVH, D, skdim] if c["ktrans"] == "pretransposed" else (
            [B, skdim, KVH, D] if c["ktrans"] == "bshd_permute" else [B, KVH, skdim, D])
        inputs.append(helper.make_tensor_value_info("k", ET, kshape))
        inputs.append(helper.make_tensor_value_info("v", ET, [B, KVH, skdim, Dv]))
        q, kb, v = "q", "k", "v"
    # kT: [B, KVH, D, Sk]
    if c["ktrans"] == "pretransposed":
        kt = kb
    elif c["ktrans"] == "bshd_permute" or c["layout"] == "proj":
        kt = node("Transpose", [kb], perm=[0, 2, 3, 1])
    else:
        kt = node("Transpose", [kb], perm=[0, 1, 3, 2])
    if c["gqa"] != "none":
        n = H // KVH
        if c["gqa"] == "expand":
            def rep(t, a, b_):  # [B,KVH,a,b] -> [B,KVH,n,a,b] -> [B,H,a,b]
                u = node("Unsqueeze", [t, const([2], np.int64)])
                e = node("Expand", [u, const([1, 1, n, 1, 1], np.int64)])
                return node("Reshape", [e, const([B, H, a, b_] if not dyn else [0, H, -1, b_], np.int64)])
            kt = node("Reshape", [node("Expand", [node("Unsqueeze", [kt, const([2], np.int64)]),
                                                  const([1, 1, n, 1, 1], np.int64)]),
                                  const([B, H, D, -1], np.int64)])
            v = rep(v, Sk, Dv) if not dyn else rep(v, -1, Dv)
        else:  # tile then reshape (repeat_interleave order)
            kt = node("Reshape", [node("Tile", [node("Unsqueeze", [kt, const([2], np.int64)]),
                                                const([1, 1, n, 1, 1], np.int64)]),
                                  const([B, H, D, -1], np.int64)])
            v = node("Reshape", [node("Tile", [node("Unsqueeze", [v, const([2], np.int64)]),
                                               const([1, 1, n, 1, 1], np.int64)]),
                                 const([B, H, -1, Dv], np.int64)])
    s_ = c["scale"]
    if near == "nonconst_scale":
        inputs.append(helper.make_tensor_value_info("t", ET, []))
    if s_ == "q_mul":
        q = node("Mul", [q, const(sc)])
    elif s_ == "split_sqrt":
        q = node("Mul", [q, const(math.sqrt(sc))])
        kt = node("Mul", [kt, const(math.sqrt(sc))])
    s = node("MatMul", [q, kt])
    if s_ == "scores_mul":
        s = node("Mul", [s, "t" if near == "nonconst_scale" else const(sc)])
    elif s_ == "scores_div":
        s = node("Div", [s, "t" if near == "nonconst_scale" else const(1 / sc)])
    elif near == "nonconst_scale":
        s = node("Mul", [s, "t"])
    if c["softcap"]:
        s = node("Mul", [node("Tanh", [node("Div", [s, const(30.0)])]), const(30.0)])
    m = c["mask"]
    fillv = {"-inf": -np.inf, "finfo_min": float(np.finfo(npdt).min),
             "large_neg": -1e4 if fp16 else -1e9}[c["fill"]]
    tril = np.tril(np.ones((S, Sk), dtype=bool))
    if m == "pad_add":
        inputs.append(helper.make_tensor_value_info("am", TensorProto.INT64, [B, skdim]))
        f = node("Cast", ["am"], to=ET)
        f = node("Sub", [const(1.0), f])
        f = node("Mul", [f, const(float(np.finfo(npdt).min))])
        f = node("Unsqueeze", [f, const([1, 2], np.int64)])
        s = node("Add", [s, f])
    elif m == "pad_bool":
        # transformers 5: a bool key mask broadcast over queries by And with a trivially true
        # query test, turned additive by Where (the form attnopt folds into q/k for ORT's MHA)
        inputs.append(helper.make_tensor_value_info("am", TensorProto.INT64, [B, skdim]))
        kb = node("Unsqueeze", [node("Cast", ["am"], to=TensorProto.BOOL), const([1, 2], np.int64)])
        if dyn:  # the query positions at run time (self-attention: the mask's length)
            n = node("Gather", [node("Shape", ["am"]), const([1], np.int64)], axis=0)
            qi = node("Range", [const(0, np.int64), node("Squeeze", [n, const([0], np.int64)]),
                                const(1, np.int64)])
            qi = node("Reshape", [qi, const([1, 1, -1, 1], np.int64)])
        else:
            qi = const(np.arange(S).reshape(1, 1, S, 1), np.int64)
        qok = node("GreaterOrEqual", [qi, const(0, np.int64)])
        both = node("And", [qok, kb])
        s = node("Add", [s, node("Where", [both, const(0.0), const(fillv)])])
    elif m == "causal_where":
        s = node("Where", [const(tril, bool), s, const(fillv)])
    elif m == "causal_add":
        s = node("Add", [s, const(np.where(tril, 0.0, fillv).astype(npdt))])
    elif m == "sliding":
        i, j = np.arange(S)[:, None], np.arange(Sk)[None, :]
        s = node("Where", [const((j <= i) & (i - j < 3), bool), s, const(fillv)])
    elif m == "bias":
        s = node("Add", [s, const((rng.standard_normal((H, S, Sk)) * 2).astype(npdt))])
    elif m == "dense_input":
        inputs.append(helper.make_tensor_value_info("dm", TensorProto.BOOL, [B, 1, sdim, skdim]))
        s = node("Where", ["dm", s, const(fillv)])
    if c["cast"] == "float_cast":
        s = node("Cast", [s], to=TensorProto.FLOAT)
    p = node("Softmax", [s], axis=2 if near == "softmax_axis" else -1)
    if c["cast"] == "float_cast":
        p = node("Cast", [p], to=ET)
    if c["nan_guard"]:
        p = node("Where", [node("IsNaN", [p]), const(0.0), p])
    if near == "extra_op_probs":
        p = node("Mul", [p, p])
    pp = node("Transpose", [p], perm=[0, 1, 3, 2]) if near == "contract_query" else p
    o = node("MatMul", [pp, v])
    if c["layout"] == "proj":
        o = node("Transpose", [o], perm=[0, 2, 1, 3])
        o = node("Reshape", [o, const([0, 0, H * Dv], np.int64)])
    nodes.append(helper.make_node("Identity", [o], ["out"], name="out_identity"))
    oshape = [B, sdim, H * Dv] if c["layout"] == "proj" else [B, H, skdim if near == "contract_query" else sdim, Dv]
    outputs.append(helper.make_tensor_value_info("out", ET, oshape))
    if near == "probs_returned":
        nodes.append(helper.make_node("Identity", [p], ["probs"], name="probs_identity"))
        outputs.append(helper.make_tensor_value_info("probs", ET, [B, H, sdim, skdim]))
    g = helper.make_graph(nodes, f"fuzz_{c['seed']}", inputs, outputs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", c["opset"])])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def onnx_feeds(c: dict[str, Any], model, seed: int, pad: bool = True, seq: int | None = None,
               empty_row: bool = False):
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = {"S": seq or c["S"], "Sk": (seq or c["S"]) + (c["Sk"] - c["S"])}
    feeds = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else sizes[d.dim_param] for d in tt.shape.dim]
        if vi.name == "am":
            a = np.ones(shape, dtype=np.int64)
            if pad:
                for b in range(shape[0]):
                    a[b, rng.integers(1, shape[1] + 1):] = 0
            if empty_row and c["mask"] == "pad_bool":
                a[0] = 0  # every key of batch row 0 masked
            feeds[vi.name] = a
        elif vi.name == "dm":
            d = rng.random(shape) < 0.6
            d[..., 0] = True
            if empty_row:
                d[0, 0, 0, :] = False
            feeds[vi.name] = d
        elif vi.name == "t":
            feeds[vi.name] = np.asarray(scale_value(c), dtype=np.float16 if c["dtype"] == "float16" else np.float32)
        else:
            dt = np.float16 if c["dtype"] == "float16" else np.float32
            feeds[vi.name] = (rng.standard_normal(shape) * 1.5).astype(dt)
    return feeds


def ort_run(model, feeds):
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
