"""What a causal mask costs ONNX Runtime's CPU attention ops (why emit/ort_gqa.py exists).

One com.microsoft.MultiHeadAttention node on random q/k/v [B, S, H*D] with an additive bias
[B, 1, S, S]: all zeros, causal with HF's fill (finfo.min), causal with -1e4; against one
com.microsoft.GroupQueryAttention node (causal, seqlens_k = S - 1) on the same q/k/v, and the
same with ragged right padding (seqlens_k per row). Cases take turns; fastest of --reps each.

    python bench/ort_masked_exp.py [--batch 4 --heads 8 --seq 2048 --dim 64 --reps 5 --json F]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper


def _session(node, inputs, outputs):
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, None) for n, t in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    B, H, S, D = a.batch, a.heads, a.seq, a.dim
    f = TensorProto.FLOAT
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, S, H * D), dtype=np.float32) for _ in range(3))
    mha = _session(helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "", "m"], ["o"],
                                    domain="com.microsoft", num_heads=H, scale=D ** -0.5),
                   [("q", f), ("k", f), ("v", f), ("m", f)], ["o"])
    gqa = _session(helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "sl", "tl"], ["o", "pk", "pv"],
                                    domain="com.microsoft", num_heads=H, kv_num_heads=H, scale=D ** -0.5),
                   [("q", f), ("k", f), ("v", f), ("sl", TensorProto.INT32), ("tl", TensorProto.INT32)],
                   ["o", "pk", "pv"])
    upper = np.triu(np.ones((S, S), bool), 1)

    def bias(fill):
        m = np.zeros((B, 1, S, S), np.float32)
        if fill is not None:
            m[:, :, upper] = fill
        return m

    ragged = np.array([max(1, S * (B - b) // B) for b in range(B)], np.int32)
    def on_mha(fill):
        m = bias(fill)
        return lambda: mha.run(None, {"q": q, "k": k, "v": v, "m": m})

    cases = {
        "mha_no_mask_bias_zeros": on_mha(None),
        "mha_causal_finfo_min": on_mha(np.finfo(np.float32).min),
        "mha_causal_minus_1e4": on_mha(-1e4),
        "gqa_causal": lambda: gqa.run(None, {"q": q, "k": k, "v": v, "sl": np.full(B, S - 1, np.int32),
                                             "tl": np.array(S, np.int32)}),
        "gqa_causal_ragged_right": lambda: gqa.run(None, {"q": q, "k": k, "v": v, "sl": ragged - 1,
                                                          "tl": np.array(S, np.int32)}),
    }
    for fn in cases.values():
        fn()
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(a.reps):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    base = best["mha_no_mask_bias_zeros"]
    rows = [dict(case=n, ms=round(t * 1e3, 1), over_no_mask=round(t / base, 3)) for n, t in best.items()]
    for r in rows:
        print(json.dumps(r), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(shape=dict(batch=B, heads=H, seq=S, dim=D), reps=a.reps, onnxruntime=ort.__version__,
                           rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
