"""Microbenchmark: one attention layer in ONNX Runtime (CPU), decomposed vs rewritten.

The layer is the exporter's decomposed form on BSD activations: q/k/v [B, S, H*D] ->
Reshape/Transpose (k to [B, H, D, S]) -> MatMul -> Mul(scale) [-> Add(padding mask)] -> Softmax
-> MatMul -> Transpose/Reshape. attnopt detects it, plans it and splices it with
op="ort" (com.microsoft.MultiHeadAttention) and op="standard" (opset-23 Attention).
Timings are interleaved (decomposed, ort, standard, decomposed, ...) and the median is kept.

    python bench/onnx_attention.py [--seq 128 512 2048] [--reps 30] [--threads 2] [--mask]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def decomposed(b: int, s: int, heads: int, d: int, mask: bool | str) -> onnx.ModelProto:
    """mask: False (none), True or "int" (BERT's classic (1 - float(mask)) * finfo.min from the
    int64 attention_mask), or "bool" (transformers 5: Where(bool(mask), 0, finfo.min))."""
    e = heads * d
    nodes = [
        h.make_node("Reshape", ["q", "shp4"], ["q4"]), h.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        h.make_node("Reshape", ["k", "shp4"], ["k4"]), h.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        h.make_node("Reshape", ["v", "shp4"], ["v4"]), h.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        h.make_node("MatMul", ["qt", "kt"], ["qk"]),
        h.make_node("Mul", ["qk", "scale"], ["qks"]),
    ]
    ins = [h.make_tensor_value_info(n, T.FLOAT, [b, s, e]) for n in "qkv"]
    last = "qks"
    if mask == "bool":
        nodes += [h.make_node("Unsqueeze", ["attention_mask", "ax12"], ["am4"]),
                  h.make_node("Cast", ["am4"], ["amb"], to=T.BOOL),
                  h.make_node("Where", ["amb", "zero", "neg"], ["ext"]),
                  h.make_node("Add", ["qks", "ext"], ["qkm"])]
    elif mask:
        nodes += [h.make_node("Unsqueeze", ["attention_mask", "ax12"], ["am4"]),
                  h.make_node("Cast", ["am4"], ["amf"], to=T.FLOAT),
                  h.make_node("Sub", ["one", "amf"], ["inv"]),
                  h.make_node("Mul", ["inv", "neg"], ["ext"]),
                  h.make_node("Add", ["qks", "ext"], ["qkm"])]
    if mask:
        ins.append(h.make_tensor_value_info("attention_mask", T.INT64, [b, s]))
        last = "qkm"
    nodes += [
        h.make_node("Softmax", [last], ["p"], axis=-1),
        h.make_node("MatMul", ["p", "vt"], ["o"]),
        h.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        h.make_node("Reshape", ["ot", "shp3"], ["y"]),
    ]
    inits = [nh.from_array(np.array([0, 0, heads, d], np.int64), "shp4"),
             nh.from_array(np.array([0, 0, e], np.int64), "shp3"),
             nh.from_array(np.array(d ** -0.5, np.float32), "scale"),
             nh.from_array(np.array([1, 2], np.int64), "ax12"),
             nh.from_array(np.array(1.0, np.float32), "one"),
             nh.from_array(np.array(0.0, np.float32), "zero"),
             nh.from_array(np.array(np.finfo(np.float32).min, np.float32), "neg")]
    g = h.make_graph(nodes, "attention", ins, [h.make_tensor_value_info("y", T.FLOAT, [b, s, e])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 20)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--mask", action="store_true", help="add an HF-style padding mask")
    args = ap.parse_args()

    import onnxruntime as ort

    import attnopt
    from attnopt.emit.onnx import fused_nodes, splice
    from attnopt.passes.rewrite import plan
    from attnopt.pipeline.validate_onnx import compare_onnx, session

    print(f"onnxruntime {ort.__version__}, CPU, {args.threads} threads, B=1 H={args.heads} "
          f"D={args.head_dim} fp32, mask={args.mask}, {args.reps} interleaved reps, median ms")
    print(f"{'seq':>6} {'decomposed':>11} {'ort MHA':>9} {'std Attn':>9} {'MHA x':>7} {'Attn x':>7}  max rel err")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.seq:
            model = decomposed(1, s, args.heads, args.head_dim, args.mask)
            path = os.path.join(tmp, f"attn{s}.onnx")
            onnx.save(model, path)
            rep = attnopt.inspect(path)
            recipes = [plan(rep.graph, st) for st in rep.sites]
            variants = {"decomposed": model}
            for op in ("ort", "standard"):
                m = splice(rep.graph, recipes, op=op)
                assert len(fused_nodes(m)) == 1, op
                variants[op] = m
            feeds = {n: rng.standard_normal((1, s, args.heads * args.head_dim)).astype(np.float32) for n in "qkv"}
            if args.mask:
                am = np.ones((1, s), np.int64)
                am[0, -s // 4:] = 0
                feeds["attention_mask"] = am
            err = max(compare_onnx(path, variants[op], [feeds], threads=args.threads)["max_rel_error"]
                      for op in ("ort", "standard"))
            sess = {k: session(m, None, threads=args.threads) for k, m in variants.items()}
            times: dict[str, list[float]] = {k: [] for k in sess}
            for k, se in sess.items():  # warm-up
                se.run(None, feeds)
            for _ in range(args.reps):
                for k, se in sess.items():
                    t0 = time.perf_counter()
                    se.run(None, feeds)
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"{s:>6} {med['decomposed']:>11.3f} {med['ort']:>9.3f} {med['standard']:>9.3f} "
                  f"{med['decomposed'] / med['ort']:>6.2f}x {med['decomposed'] / med['standard']:>6.2f}x  {err:.1e}")


if __name__ == "__main__":
    main()
