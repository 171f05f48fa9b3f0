"""Microbenchmark: one layer's attention subgraph in ONNX Runtime (CPU), decomposed vs attnopt.

The layer is bench/onnx_attention.py's `decomposed` graph (the dynamo exporter's form on BSD
activations, optionally with an HF-style extended padding mask built from a [B, S] int mask).
Unlike onnx_attention.py (which calls the splice directly) this goes through the public entry
point, `attnopt.optimize(path, onnx_op=...)`, so detection, planning, splice and validation are
all on the measured path. Timings: ORT CPU fp32, default graph optimizations, interleaved
(decomposed, attnopt-ort, attnopt-standard, decomposed, ...), median; ratio = decomposed / fused.

    python bench/attention_layer.py [--seq 128 512 2048] [--reps 30] [--threads 2] [--pad-fraction 0.25]

With a mask, the last --pad-fraction of the tokens are padding (default a quarter). attnopt's
MultiHeadAttention does not compute keys that padding hides from every query, so its gain with a
mask depends on this fraction; --pad-fraction 0 shows the masked case without that.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_attention import decomposed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--masks", nargs="+", default=["none", "int", "bool"],
                    help="none; int: (1 - float(mask)) * finfo.min (classic BERT); bool: "
                         "where(bool(mask), 0, finfo.min) (transformers 5 exports)")
    ap.add_argument("--pad-fraction", type=float, default=0.25,
                    help="with a mask: the fraction of tokens at the end that are padding")
    args = ap.parse_args()

    import onnxruntime as ort

    import attnopt
    from attnopt.emit.onnx import fused_nodes
    from attnopt.pipeline.validate_onnx import compare_onnx, session

    print(f"onnxruntime {ort.__version__}, CPU, {args.threads} threads, B=1 H={args.heads} "
          f"D={args.head_dim} fp32, {args.reps} interleaved reps, median ms; ratio = decomposed / fused")
    print("| mask | seq | decomposed ms | attnopt-ort ms | attnopt-standard ms | ort x | standard x | "
          "max rel err | load 1/5/15 |")
    print("|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for mask in args.masks:
            for s in args.seq:
                model = decomposed(1, s, args.heads, args.head_dim, {"none": False}.get(mask, mask))
                path = os.path.join(tmp, f"attn{s}_{mask}.onnx")
                onnx.save(model, path)
                variants = {"decomposed": model}
                notes = []
                for op in ("ort", "standard"):
                    try:
                        res = attnopt.optimize(path, onnx_op=op)
                    except Exception as e:  # recorded, not worked around
                        notes.append(f"{op}: attnopt.optimize raised {type(e).__name__}: {e}")
                        continue
                    n = len(fused_nodes(res.model))
                    if n != 1:
                        notes.append(f"{op}: {n} fused nodes")
                    variants[op] = res.model
                feeds = {n: rng.standard_normal((1, s, args.heads * args.head_dim)).astype(np.float32)
                         for n in "qkv"}
                if mask != "none":
                    am = np.ones((1, s), np.int64)
                    am[0, s - int(round(s * args.pad_fraction)):] = 0
                    feeds["attention_mask"] = am
                err = max([compare_onnx(path, variants[op], [feeds], threads=args.threads)["max_rel_error"]
                           for op in ("ort", "standard") if op in variants] or [float("nan")])
                sess = {k: session(m, None, threads=args.threads) for k, m in variants.items()}
                times: dict[str, list[float]] = {k: [] for k in sess}
                for se in sess.values():  # warm-up
                    se.run(None, feeds)
                for _ in range(args.reps):
                    for k, se in sess.items():
                        t0 = time.perf_counter()
                        se.run(None, feeds)
                        times[k].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}

                def cell(k):
                    return f"{med[k]:.3f}" if k in med else "failed"

                def ratio(k):
                    return f"{med['decomposed'] / med[k]:.2f}x" if k in med else "failed"

                load = "/".join(f"{x:.1f}" for x in os.getloadavg())
                print(f"| {mask} | {s} | {cell('decomposed')} | {cell('ort')} | "
                      f"{cell('standard')} | {ratio('ort')} | {ratio('standard')} | {err:.1e} | {load} |",
                      flush=True)
                for n in notes:
                    print(f"  note: {n}", flush=True)


if __name__ == "__main__":
    main()
