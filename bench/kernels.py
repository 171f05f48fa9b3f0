"""Kernel benchmarks (issue 5).

CPU (always): the exact CPU GNA kernel (attnopt.codegen.cpu) on a 2-D layout of 64x64 tokens,
window 16x16, head dim 64, 4 heads, fp32, 2 threads, strides 1 and tile-aligned; against dense SDPA
with the equivalent boolean mask, dense unmasked SDPA, and flex_attention compiled on CPU with the
same mask as a BlockMask (its compile time reported separately). Repetitions are interleaved (one
call of every contender per round) and speedups are medians of per-round ratios. The simulator's
bound is for the tiles the kernel uses: Q boxes `q_tile`, KV = the exact box each Q tile gathers
(dynamic KV tiling with 1-token KV tiles), i.e. simulate(layout, q_tile, (1, 1), dynamic=True).

GPU (only with CUDA): generated Triton kernels vs SDPA (flash) and compiled flex_attention, fp16,
sequence 1K-32K, for a 1-D sliding window and 2-D GNA layouts.

    .venv/bin/python bench/kernels.py [--rounds 7] [--threads 2] [--no-flex] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from attnopt.codegen import cpu as cpu_kernels
from attnopt.codegen.ops import AttentionParams
from attnopt.cost.gna import dense_mask
from attnopt.cost.simulator import simulate
from attnopt.ir import GNALayout


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    for fn in fns.values():
        fn()  # warm
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return times


def _flex_setup(mask: torch.Tensor, S: int, q, k, v, device: str):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return mask[q_idx, kv_idx]

    block_mask = create_block_mask(mask_mod, None, None, S, S, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    t = time.perf_counter()
    compiled(q, k, v, block_mask=block_mask)
    compile_s = time.perf_counter() - t
    return (lambda: compiled(q, k, v, block_mask=block_mask)), compile_s


def bench_cpu(rounds: int, threads: int, flex: bool) -> list[dict]:
    torch.set_num_threads(threads)
    B, H, D = 1, 4, 64
    grid, window = (64, 64), (16, 16)
    S = math.prod(grid)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    p = AttentionParams(scale=D ** -0.5)
    rows = []
    for stride in ((1, 1), (8, 8), (16, 16)):
        layout = GNALayout(grid, window, stride)
        mask = torch.from_numpy(dense_mask(layout))
        q_tile = cpu_kernels.choose_gna_tile(layout)
        plan = cpu_kernels.gna_plan(layout, q_tile)
        sim = simulate(layout, q_tile, (1,) * len(grid), dynamic=True)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = cpu_kernels.gna_attention(q, k, v, layout, p)
        err = (out - ref).abs().max().item()
        fns = {
            "attnopt_cpu": lambda: cpu_kernels.gna_attention(q, k, v, layout, p),
            "sdpa_dense": lambda: F.scaled_dot_product_attention(q, k, v),
            "sdpa_bool_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        }
        compile_s = None
        if flex:
            fns["flex_compiled"], compile_s = _flex_setup(mask, S, q, k, v, "cpu")
        times = interleaved(fns, rounds)
        med = {n: statistics.median(t) for n, t in times.items()}

        def ratio(other):
            return statistics.median(o / a for o, a in zip(times[other], times["attnopt_cpu"]))

        row = {
            "stride": stride, "q_tile": q_tile, "kv_box": plan.kv_extent,
            "full_tiles": int(plan.full.sum()), "tiles": plan.num_tiles, "max_abs_err": err,
            "ms": {n: round(t * 1e3, 1) for n, t in med.items()},
            "speedup_vs_dense": ratio("sdpa_dense"), "speedup_vs_bool_mask": ratio("sdpa_bool_mask"),
            "sim_bound": sim.speedup_upper_bound, "flop_bound": sim.flop_speedup,
        }
        row["fraction_of_bound"] = row["speedup_vs_dense"] / sim.speedup_upper_bound
        if flex:
            row["speedup_vs_flex"] = ratio("flex_compiled")
            row["flex_compile_s"] = round(compile_s, 1)
        rows.append(row)
        print(json.dumps(row, default=list), flush=True)
    return rows


def bench_gpu(rounds: int) -> list[dict]:  # pragma: no cover - needs CUDA
    import triton.testing

    from attnopt.codegen import triton as tk
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    B, H, D = 1, 16, 128
    for S in (1024, 2048, 4096, 8192, 16384, 32768):
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.float16) for _ in range(3))
        side = int(math.isqrt(S))
        cases = [("window_1d_256", AttentionParams(scale=D ** -0.5, window=(256, 256)), None)]
        if side * side == S:
            w = max(2, side // 4)
            cases += [(f"gna_2d_{side}x{side}_w{w}", AttentionParams(scale=D ** -0.5),
                       GNALayout((side, side), (w, w))),
                      (f"gna_2d_{side}x{side}_w{w}_blocked", AttentionParams(scale=D ** -0.5),
                       GNALayout((side, side), (w, w), (w, w)))]
        for name, p, layout in cases:
            tk.launch(q, k, v, None, p, layout)  # autotune + cache
            t_tri = triton.testing.do_bench(lambda: tk.launch(q, k, v, None, p, layout))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                t_sdpa = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v))
            row = {"S": S, "case": name, "triton_ms": t_tri, "sdpa_flash_dense_ms": t_sdpa}
            if S <= 16384:
                if layout is not None:
                    mask = torch.from_numpy(dense_mask(layout, max_tokens=1 << 15)).cuda()
                else:
                    i = torch.arange(S, device="cuda")
                    mask = (i[None, :] - i[:, None]).abs() <= 256
                flex_fn, compile_s = _flex_setup(mask, S, q, k, v, "cuda")
                row["flex_ms"] = triton.testing.do_bench(flex_fn)
                row["flex_compile_s"] = compile_s
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    result = {"cpu": bench_cpu(a.rounds, a.threads, not a.no_flex)}
    if torch.cuda.is_available():
        result["gpu"] = bench_gpu(a.rounds)
    else:
        print("no CUDA device: GPU section skipped")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, default=list)


if __name__ == "__main__":
    main()
