"""Time load + detect on BERT-shaped ONNX graphs of 12, 48 and 192 layers.

Acceptance (issue 2): cost grows linearly (per-layer cost at 192 layers <= 1.3x that at 12)
and the 192-layer graph takes under 10 s on the project's 2-core machine.

    .venv/bin/python bench/detect_scaling.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import onnx  # noqa: E402

import attnopt  # noqa: E402
from onnx_encoder import bert_like  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, nargs="*", default=[12, 48, 192])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for n in args.layers:
            paths[n] = os.path.join(tmp, f"bert_{n}.onnx")
            onnx.save_model(bert_like(n), paths[n])
        times = {n: [] for n in args.layers}
        for _ in range(args.repeats):  # interleaved, so machine noise hits every size alike
            for n in args.layers:
                t0 = time.perf_counter()
                report = attnopt.inspect(paths[n])
                times[n].append(time.perf_counter() - t0)
                assert len(report.sites) == n, (n, len(report.sites))
                assert all(s.spec.mask.kind == "padding" for s in report.sites)
        base = statistics.median(times[args.layers[0]]) / args.layers[0]
        for n in args.layers:
            med = statistics.median(times[n])
            rows.append((n, med, med / n * 1e3, (med / n) / base))
    print(f"{'layers':>6} {'load+detect s':>14} {'ms/layer':>9} {'per-layer vs first':>19}")
    for n, med, per, ratio in rows:
        print(f"{n:>6} {med:>14.3f} {per:>9.2f} {ratio:>19.2f}")


if __name__ == "__main__":
    main()
