"""Host-side cost of one `attnopt::attention` call at a decode step, layer by layer (issue 20).

What it times, per call, on the decode shapes of bench/generate.py's model (q [B, 8, 1, 64],
K/V [B, 2, Skv, 64], a bool key mask [B, 1, 1, Skv], causal bottom-right):
  sdpa       F.scaled_dot_product_attention(enable_gqa=True): the competitor's kernel
  dispatch   select.dispatch (the kernel table, then the chosen row)
  op         torch.ops.attnopt.attention (the dispatcher, the op's autograd and CPU kernels)
  op_overload torch.ops.attnopt.attention.default (what an inductor graph calls)
all under torch.no_grad (what `generate` runs). Fastest of --repeats batches of --calls calls per
case, the cases taking turns, one torch thread, wall clock; the per-call figure is batch time / calls.

  python bench/op_overhead.py [--kv 640] [--batch 1] [--calls 2000] [--repeats 7]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import attnopt  # noqa: F401  (registers the op)
from attnopt.codegen import select
from attnopt.codegen.params import AttentionParams


def _per_call_us(cases: dict, calls: int, repeats: int) -> dict[str, float]:
    """Fastest batch per case; the cases take turns batch by batch, so drift in the host's speed
    reaches every case alike."""
    for fn in cases.values():
        for _ in range(50):
            fn()
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: t / calls * 1e6 for name, t in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", type=int, default=640)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D, S = args.batch, args.heads, args.kv_heads, args.dim, args.kv
    q = torch.randn(B, H, 1, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[:, :, :, S - 37:] = False  # a static cache's unwritten slots
    scale = D ** -0.5
    params = AttentionParams.from_schema(scale, True, "bottom_right", -1, -1, 0.0, "softmax")
    request = select.Request.for_op("attention")
    op_args = (q, k, v, mask, scale, True, "bottom_right", -1, -1, 0.0, "softmax")
    cases = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True),
        "dispatch": lambda: select.dispatch(q, k, v, mask, params, None, request),
        "op": lambda: torch.ops.attnopt.attention(*op_args),
        "op_overload": lambda: torch.ops.attnopt.attention.default(*op_args),
    }
    ref = cases["sdpa"]()
    for name in ("dispatch", "op"):
        torch.testing.assert_close(cases[name]().reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)
    row = select.choose(q, k, v, mask, params, None, request).name
    with torch.no_grad():
        results = _per_call_us(cases, args.calls, args.repeats)
    print(f"decode step B{B} H{H}/{Hkv} D{D} Skv {S}, one thread; the op's row: {row}")
    for name, us in results.items():
        print(f"  {name:12s} {us:8.1f} us/call   ({us - results['sdpa']:+7.1f} vs sdpa)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), row=row, us_per_call=results, torch=torch.__version__), f, indent=1)


if __name__ == "__main__":
    main()
