"""Kernel benchmarks (issue 5).

CPU (always): the exact CPU GNA kernel (attnopt.codegen.cpu.tiles: the compiled tile kernel of cpu_native
where it builds, its build time reported first) on a 2-D layout of 64x64 tokens, window 16x16, head
dim 64, 4 heads, fp32, 2 threads, strides 1 and tile-aligned; against dense SDPA with the equivalent
boolean mask, dense unmasked SDPA, the same Q box through SDPA per tile group (the fallback path),
and flex_attention compiled on CPU with the same mask as a BlockMask (its compile time reported
separately). Repetitions are interleaved (one
call of every contender per round) and speedups are medians of per-round ratios. The simulator's
bound is for the tiles the kernel uses (its Q box is tuned on first use: the bench times from an empty
cache and reports the untuned estimate's box beside it): Q boxes `q_tile`, KV = the exact box each Q tile gathers
(dynamic KV tiling with 1-token KV tiles), i.e. simulate(layout, q_tile, (1, 1), dynamic=True).

Also 1-D causal sliding windows (LLM style, 4K tokens, windows 256 and 1024, 8 heads) through
attnopt::attention's CPU path (the exact window kernel) vs the dense masked SDPA, SDPA is_causal
and compiled flex_attention.

The GPU benchmark of the generated Triton kernels is bench/gpu_kernels.py.

    .venv/bin/python bench/kernels.py [--rounds 7] [--threads 2] [--no-flex] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from attnopt.codegen.cpu import tiles as cpu_kernels
from attnopt.codegen.cpu import native as cpu_native
from attnopt.codegen.params import AttentionParams
from attnopt.sparsity.gna import dense_mask
from attnopt.sparsity.simulator import simulate
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


def _emit(rows: list[dict], row: dict, ratio, compile_s: float | None) -> None:
    if compile_s is not None:  # flex ran
        row["speedup_vs_flex"] = ratio("flex_compiled")
        row["flex_compile_s"] = round(compile_s, 1)
    rows.append(row)
    print(json.dumps(row, default=list), flush=True)


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
        t = time.perf_counter()
        q_tile = cpu_kernels.tuned_gna_tile(layout, 0, q, k, v, None, p)  # what the kernel runs
        tune_s = time.perf_counter() - t
        estimated = cpu_kernels.choose_gna_tile(layout)  # the estimate alone, before timing
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
        # the same box through SDPA per tile group (the path before the compiled kernel, and its fallback)
        fns["attnopt_sdpa_tiles"] = lambda: cpu_kernels.run_plan(q, k, v, None, p, plan, native=False)
        if estimated != q_tile:
            fns["attnopt_cpu_estimated_tile"] = lambda: cpu_kernels.gna_attention(q, k, v, layout, p,
                                                                                   q_tile=estimated)
        compile_s = None
        if flex:
            fns["flex_compiled"], compile_s = _flex_setup(mask, S, q, k, v, "cpu")
        times = interleaved(fns, rounds)
        med = {n: statistics.median(t) for n, t in times.items()}

        def ratio(other):
            return statistics.median(o / a for o, a in zip(times[other], times["attnopt_cpu"]))

        row = {
            "stride": stride, "q_tile": q_tile, "estimated_q_tile": estimated, "tune_s": round(tune_s, 2),
            "kv_box": plan.kv_extent, "kernel": "native" if cpu_kernels.native_runs(q, k, v, None, p) else "sdpa-tiles",
            "full_tiles": int(plan.full.sum()), "tiles": plan.num_tiles, "max_abs_err": err,
            "ms": {n: round(t * 1e3, 1) for n, t in med.items()},
            "speedup_vs_dense": ratio("sdpa_dense"), "speedup_vs_bool_mask": ratio("sdpa_bool_mask"),
            "sim_bound": sim.speedup_upper_bound, "flop_bound": sim.flop_speedup,
        }
        row["fraction_of_bound"] = row["speedup_vs_dense"] / sim.speedup_upper_bound
        row["speedup_vs_sdpa_tiles"] = ratio("attnopt_sdpa_tiles")
        if estimated != q_tile:
            est_sim = simulate(layout, estimated, (1,) * len(grid), dynamic=True)
            row["estimated_tile_speedup_vs_dense"] = statistics.median(
                o / a for o, a in zip(times["sdpa_dense"], times["attnopt_cpu_estimated_tile"]))
            row["estimated_tile_fraction_of_bound"] = (row["estimated_tile_speedup_vs_dense"]
                                                       / est_sim.speedup_upper_bound)
        _emit(rows, row, ratio, compile_s)
    return rows


def bench_cpu_window(rounds: int, threads: int, flex: bool) -> list[dict]:
    """1-D causal sliding windows (LLM style): attnopt::attention with a window on CPU (the exact
    window kernel) vs the dense masked SDPA the op ran before, SDPA is_causal (dense causal work,
    not the same function: the work a window must beat), and compiled flex_attention."""
    torch.set_num_threads(threads)
    from attnopt.codegen.ops import attention_op

    B, H, D, S = 1, 8, 64, 4096
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    rows = []
    for W in (256, 1024):
        p = AttentionParams(scale=D ** -0.5, causal=True, window=(W - 1, 0))
        i = torch.arange(S)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - W)
        t = time.perf_counter()
        out = attention_op(q, k, v, scale=p.scale, causal=True, window=(W - 1, 0))  # tunes
        tune_s = time.perf_counter() - t
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        left, upper = cpu_kernels.window_bounds(p)
        tq = cpu_kernels.tuned_window_tile(left, upper, 0, q, k, v, None, p)
        plan = cpu_kernels.window_plan(S, S, left, upper, 0, tq)
        fns = {
            "attnopt_op": lambda: attention_op(q, k, v, scale=p.scale, causal=True, window=(W - 1, 0)),
            "attnopt_sdpa_tiles": lambda: cpu_kernels.run_plan(q, k, v, None, p, plan, native=False),
            "sdpa_bool_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        }
        compile_s = None
        if flex:
            fns["flex_compiled"], compile_s = _flex_setup(mask, S, q, k, v, "cpu")
        times = interleaved(fns, rounds)

        def ratio(other):
            return statistics.median(o / a for o, a in zip(times[other], times["attnopt_op"]))

        work = plan.num_tiles * plan.q_idx.shape[1] * plan.kv_idx.shape[1]
        row = {"case": f"causal window {W}", "S": S, "H": H, "D": D, "q_tile": tq, "kv_run": plan.kv_extent,
               "tune_s": round(tune_s, 2), "max_abs_err": (out - ref).abs().max().item(),
               "ms": {n: round(statistics.median(t) * 1e3, 1) for n, t in times.items()},
               "speedup_vs_bool_mask": ratio("sdpa_bool_mask"), "speedup_vs_causal": ratio("sdpa_causal"),
               "speedup_vs_sdpa_tiles": ratio("attnopt_sdpa_tiles"),
               "work_bound_vs_causal": (S * (S + 1) / 2) / work}
        _emit(rows, row, ratio, compile_s)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    # Tune from scratch, as a user's first run does (the kernel times its Q-box candidates once).
    os.environ["ATTNOPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnopt-bench-cache-")
    t = time.perf_counter()
    native = cpu_native.available()  # builds cpu_tiles.c, as a user's first call does
    print(json.dumps({"native_kernel": native, "native_build_s": round(time.perf_counter() - t, 2)}), flush=True)
    result = {"native_kernel": native, "native_build_s": round(time.perf_counter() - t, 2),
              "cpu": bench_cpu(a.rounds, a.threads, not a.no_flex),
              "cpu_window": bench_cpu_window(a.rounds, a.threads, not a.no_flex)}
    print("GPU kernels: bench/gpu_kernels.py")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, default=list)


if __name__ == "__main__":
    main()
