"""GPU kernel benchmark (issue 5): the generated Triton kernels vs SDPA's flash backend and
flex_attention (compiled, same mask as a BlockMask), on one CUDA device.

Layouts: q [B, H, S, D], k/v [B, H, S, D]; GNA tokens are the row-major flattened grid.
Every figure is a median of `triton.testing.do_bench` (CUDA events) in one process; ratios are
between contenders timed back to back on the same inputs. Each case also checks the generated
kernel's output against a contender's (max abs error), so a fast wrong kernel cannot pass.

Sections:
  dense   non-causal and causal, bf16/fp16, head dim 64/128, S = 1K..16K (B*S = 16K tokens)
  window  causal sliding window (LLM style) vs flex with the same window and vs dense causal flash
  gna     2-D / 3-D GNA layouts (stride 1 and perfectly block-sparse) vs flex with the GNA mask,
          vs our dense kernel and flash; realized speedup over our dense kernel as a fraction of
          the simulator's bound for the tile shapes the autotuner chose
  leading GNA with leading global tokens ([CLS], registers) through attnopt::gna_attention vs flex
          with the same mask, flash on the whole sequence, and the bare grid

    python bench/gpu_kernels.py [--quick] [--sections dense window gna] [--json out.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from attnopt.codegen import select
from attnopt.codegen import triton as tk
from attnopt.codegen.params import AttentionParams, as_layout
from attnopt.sparsity import gna
from attnopt.sparsity.simulator import simulate
from attnopt.ir import GNALayout

ROWS: list[dict] = []


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def emit(row: dict) -> None:
    ROWS.append(row)
    print(json.dumps(row, default=lambda x: list(x) if isinstance(x, tuple) else str(x)), flush=True)


def _qkv(B, H, S, D, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(B, H, S, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))


_FLEX = None


def flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        # Every case is a new shape or mask: without this, dynamo stops recompiling after 8 and
        # silently runs flex_attention eagerly (unfused), which made flex look 30-90x slower.
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 4096)

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def block_mask(mask_mod, S):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, None, None, S, S, device="cuda")


def flash_ms(q, k, v, causal: bool) -> tuple[float, torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)), out


def _err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---- dense / causal --------------------------------------------------------------------------

def dense_cases(quick: bool) -> list[tuple]:
    cases = [(torch.bfloat16, 128, S) for S in (1024, 2048, 4096, 8192, 16384)]
    cases += [(torch.bfloat16, 64, S) for S in (4096, 16384)]
    cases += [(torch.float16, 128, S) for S in (4096, 16384)]
    if not quick:
        cases += [(torch.bfloat16, 128, 32768), (torch.float16, 64, 4096), (torch.float16, 64, 16384)]
    return cases


def triton_kernel(q, k, v, p: AttentionParams, layout: GNALayout | None = None):
    """(out, family, config, run) of the generated kernel the kernel table picks for this case;
    `run` launches that family directly (the timed path: no per-call checks)."""
    family, reasons = select.triton_family(q, k, v, None, p, layout)
    if family is None:
        raise RuntimeError(f"no Triton kernel fits: {reasons}")
    lay = as_layout(layout)
    run = lambda: tk.launch(family, q, k, v, None, p, lay)  # noqa: E731
    out = run()
    return out, family, tk.chosen_config(family, q, k, v, None, p, lay), run


def section_dense(quick: bool, deadline: float) -> None:
    for dtype, D, S in dense_cases(quick):
        for causal in (False, True):
            if time.time() > deadline:
                return
            H = 16 if D == 128 else 32
            B = max(1, 16384 // S)
            q, k, v = _qkv(B, H, S, D, dtype)
            p = AttentionParams(scale=D ** -0.5, causal=causal)
            out, family, cfg, run = triton_kernel(q, k, v, p)
            t_tri = bench_ms(run)
            t_flash, ref = flash_ms(q, k, v, causal)
            bm = block_mask(lambda b, h, qi, ki: qi >= ki, S) if causal else None
            t_flex = bench_ms(lambda: flex()(q, k, v, block_mask=bm))
            flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
            emit({"section": "dense", "dtype": str(dtype)[6:], "D": D, "S": S, "B": B, "H": H,
                  "causal": causal, "family": family, "config": cfg.to_json(),
                  "triton_ms": t_tri, "flash_ms": t_flash, "flex_ms": t_flex,
                  "triton_tflops": flops / t_tri * 1e-9, "flash_tflops": flops / t_flash * 1e-9,
                  "vs_flash": t_flash / t_tri, "vs_flex": t_flex / t_tri, "max_abs_err_vs_flash": _err(out, ref)})


# ---- 1-D sliding window ---------------------------------------------------------------------

def band_tiles(S: int, bm: int, bn: int, left: int) -> int:
    """KV tiles a causal window-(left+1) kernel must visit, summed over Q tiles."""
    total = 0
    for m0 in range(0, S, bm):
        m1 = min(m0 + bm, S) - 1
        lo = max(m0 - left, 0) // bn
        hi = m1 // bn
        total += hi - lo + 1
    return total


def window_cases(quick: bool) -> tuple:
    return ((4096, 1024), (16384, 1024), (16384, 4096)) + (() if quick else ((32768, 4096),))


def section_window(quick: bool, deadline: float) -> None:
    for S, W in window_cases(quick):
        if time.time() > deadline:
            return
        dtype, D, H = torch.bfloat16, 128, 16
        B = max(1, 16384 // S)
        q, k, v = _qkv(B, H, S, D, dtype, seed=1)
        p = AttentionParams(scale=D ** -0.5, window=(W - 1, 0))
        out, family, cfg, run = triton_kernel(q, k, v, p)
        t_tri = bench_ms(run)
        pc = AttentionParams(scale=D ** -0.5, causal=True)
        _, _, cfg_c, run_c = triton_kernel(q, k, v, pc)
        t_tri_causal = bench_ms(run_c)
        t_flash_causal, _ = flash_ms(q, k, v, True)

        def window_mod(b, h, qi, ki):
            return (qi >= ki) & (qi - ki < W)

        bm = block_mask(window_mod, S)
        ref = flex()(q, k, v, block_mask=bm)
        t_flex = bench_ms(lambda: flex()(q, k, v, block_mask=bm))
        # Work the two kernels' tiles cover (tiles x tile area: their tuned tiles may differ).
        bmc, bnc = cfg_c.q_tile[0], cfg_c.kv_tile[0]
        bm_, bn_ = cfg.q_tile[0], cfg.kv_tile[0]
        bound = (band_tiles(S, bmc, bnc, S) * bmc * bnc) / (band_tiles(S, bm_, bn_, W - 1) * bm_ * bn_)
        realized = t_tri_causal / t_tri
        emit({"section": "window", "S": S, "window": W, "B": B, "H": H, "D": D, "dtype": "bfloat16",
              "family": family, "config": cfg.to_json(), "triton_ms": t_tri, "flex_ms": t_flex,
              "triton_causal_dense_ms": t_tri_causal, "flash_causal_dense_ms": t_flash_causal,
              "vs_flex": t_flex / t_tri, "vs_flash_causal": t_flash_causal / t_tri,
              "realized_vs_own_causal": realized, "tile_bound_vs_own_causal": bound,
              "fraction_of_bound": realized / bound, "max_abs_err_vs_flex": _err(out, ref)})


# ---- GNA ----------------------------------------------------------------------------------

GNA_CASES = {
    "2d_64x64_w16": GNALayout((64, 64), (16, 16)),
    "2d_64x64_w16_s16_blocksparse": GNALayout((64, 64), (16, 16), (16, 16)),
    "2d_128x128_w32": GNALayout((128, 128), (32, 32)),
    "2d_128x128_w32_s16": GNALayout((128, 128), (32, 32), (16, 16)),
    "2d_128x128_w32_s32_blocksparse": GNALayout((128, 128), (32, 32), (32, 32)),
    "3d_16x32x32_w8x16x16": GNALayout((16, 32, 32), (8, 16, 16)),
    "3d_16x32x32_w8x16x16_blocksparse": GNALayout((16, 32, 32), (8, 16, 16), (8, 16, 16)),
}
QUICK_SKIP = {"2d_128x128_w32_s16"}


def gna_mask_mod(layout: GNALayout):
    """flex mask_mod of an undilated GNA layout: per-dimension key range lookups."""
    shape = layout.shape
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    ranges = [(torch.as_tensor(s, device="cuda"), torch.as_tensor(e, device="cuda"))
              for s, e in gna.key_ranges(layout)]

    def mod(b, h, qi, ki):
        keep = None
        for L, st, (start, end) in zip(shape, strides, ranges):
            qc = (qi // st) % L
            kc = (ki // st) % L
            ok = (kc >= start[qc]) & (kc < end[qc])
            keep = ok if keep is None else keep & ok
        return keep

    return mod


def section_gna(quick: bool, deadline: float) -> None:
    for name, layout in GNA_CASES.items():
        if time.time() > deadline or (quick and name in QUICK_SKIP):
            continue
        dtype, D, H, B = torch.bfloat16, 128, 16, 1
        N = math.prod(layout.shape)
        q, k, v = _qkv(B, H, N, D, dtype, seed=2)
        p = AttentionParams(scale=D ** -0.5)
        out, family, cfg, run = triton_kernel(q, k, v, p, layout)
        t_tri = bench_ms(run)
        t_dense = bench_ms(triton_kernel(q, k, v, p)[3])
        t_flash, _ = flash_ms(q, k, v, False)
        bm = block_mask(gna_mask_mod(layout), N)
        ref = flex()(q, k, v, block_mask=bm)
        t_flex = bench_ms(lambda: flex()(q, k, v, block_mask=bm))
        # The host-side token permutation (3 gathers in, 1 out) that the launcher pays per call.
        idx = torch.randperm(N, device="cuda")
        t_perm = bench_ms(lambda: [x.index_select(2, idx) for x in (q, k, v, out)])
        sim = simulate(layout, cfg.q_tile, cfg.kv_tile)
        realized = t_dense / t_tri
        kpq = float(np.mean(gna.keys_per_query(layout)))
        flops = 4 * B * H * N * kpq * D
        emit({"section": "gna", "case": name, "layout": repr(layout), "N": N, "B": B, "H": H, "D": D,
              "dtype": "bfloat16", "config": cfg.to_json(), "triton_ms": t_tri, "flex_ms": t_flex,
              "triton_dense_ms": t_dense, "flash_dense_ms": t_flash, "permutation_ms": t_perm,
              "effective_tflops": flops / t_tri * 1e-9,
              "vs_flex": t_flex / t_tri, "vs_flash_dense": t_flash / t_tri,
              "realized_vs_own_dense": realized, "sim_bound": sim.speedup_upper_bound,
              "fraction_of_bound": realized / sim.speedup_upper_bound,
              "fully_block_sparse": sim.fully_block_sparse, "max_abs_err_vs_flex": _err(out, ref)})


LEADING_CASES = {  # ViT [CLS] / register tokens and LLM-style sinks before a 2-D grid
    "cls1_2d_64x64_w16": (GNALayout((64, 64), (16, 16)), 1),
    "reg4_2d_64x64_w16_s16_blocksparse": (GNALayout((64, 64), (16, 16), (16, 16)), 4),
    "cls1_2d_128x128_w32": (GNALayout((128, 128), (32, 32)), 1),
}


def section_leading(quick: bool, deadline: float) -> None:
    """attnopt::gna_attention with leading global tokens (what an approximate ViT plan splices):
    the GNA kernel with one extra block of leading keys per Q tile, plus SDPA for the leading
    rows; vs flash on the whole sequence, flex with the same mask, and the bare grid (leading 0)."""
    from attnopt.codegen.gna_op import gna_attention_op

    for name, (layout, lead) in LEADING_CASES.items():
        if time.time() > deadline or (quick and "128" in name):
            continue
        dtype, D, H, B = torch.bfloat16, 128, 16, 1
        N = math.prod(layout.shape)
        S = lead + N
        q, k, v = _qkv(B, H, S, D, dtype, seed=3)
        scale = D ** -0.5
        op = lambda: gna_attention_op(q, k, v, None, scale=scale, layout=layout, leading=lead)  # noqa: E731
        out = op()
        t_op = bench_ms(op)
        qg, kg, vg = (x[:, :, lead:].contiguous() for x in (q, k, v))
        bare = lambda: gna_attention_op(qg, kg, vg, None, scale=scale, layout=layout)  # noqa: E731
        bare()
        t_bare = bench_ms(bare)
        t_flash, _ = flash_ms(q, k, v, False)
        grid_mod = gna_mask_mod(layout)

        def mod(b, h, qi, ki):
            g = grid_mod(b, h, (qi - lead).clamp(min=0), (ki - lead).clamp(min=0))
            return (qi < lead) | (ki < lead) | g

        bm = block_mask(mod, S)
        ref = flex()(q, k, v, block_mask=bm, scale=scale)
        t_flex = bench_ms(lambda: flex()(q, k, v, block_mask=bm, scale=scale))
        emit({"section": "leading", "case": name, "layout": repr(layout), "leading": lead, "S": S,
              "B": B, "H": H, "D": D, "dtype": "bfloat16", "triton_ms": t_op, "bare_grid_ms": t_bare,
              "flex_ms": t_flex, "flash_dense_ms": t_flash, "vs_flex": t_flex / t_op,
              "vs_flash_dense": t_flash / t_op, "leading_overhead": t_op / t_bare,
              "max_abs_err_vs_flex": _err(out, ref)})


# ---- parallel precompile ----------------------------------------------------------------------
# Autotuning compiles every candidate config of every case (~1-2 s each, ~250 in all); doing that
# inside the timed sequence would spend most of a GPU lease compiling. Worker processes compile
# (by running each config once on the case's real shapes) into the shared TRITON_CACHE_DIR first;
# the sequential, timed phase then loads the binaries from disk. Timing stays single-process.

def kernel_cases(sections, quick: bool) -> list[tuple]:
    """(B, H, S, D, dtype name, params kwargs, layout) of every generated-kernel launch below."""
    out = []
    if "dense" in sections:
        for dtype, D, S in dense_cases(quick):
            H, B = (16 if D == 128 else 32), max(1, 16384 // S)
            for causal in (False, True):
                out.append((B, H, S, D, str(dtype)[6:], {"scale": D ** -0.5, "causal": causal}, None))
    if "window" in sections:
        for S, W in window_cases(quick):
            B = max(1, 16384 // S)
            out.append((B, 16, S, 128, "bfloat16", {"scale": 128 ** -0.5, "window": (W - 1, 0)}, None))
            out.append((B, 16, S, 128, "bfloat16", {"scale": 128 ** -0.5, "causal": True}, None))
    if "gna" in sections:
        for name, layout in GNA_CASES.items():
            if quick and name in QUICK_SKIP:
                continue
            N = math.prod(layout.shape)
            out.append((1, 16, N, 128, "bfloat16", {"scale": 128 ** -0.5}, layout))
            out.append((1, 16, N, 128, "bfloat16", {"scale": 128 ** -0.5}, None))
    return list({repr(c): c for c in out}.values())


def _compile_worker(jobs: list[tuple]) -> list[str]:
    from attnopt.codegen.triton import launcher

    errors = []
    for (B, H, S, D, dt, kw, layout), cfg in jobs:
        try:
            q = torch.randn(B, H, S, D, device="cuda", dtype=getattr(torch, dt))
            p = AttentionParams(**kw)
            family, _ = select.triton_family(q, q, q, None, p, layout)
            launcher.kernel_call(family, cfg, q, q, q, None, p, layout).run()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001  reported, the timed phase skips what fails
            errors.append(f"{cfg}: {type(e).__name__}: {str(e)[:120]}")
    return errors


def precompile(cases: list[tuple], workers: int) -> None:
    import multiprocessing as mp

    from attnopt.codegen.triton import generator

    jobs = []
    for case in cases:
        ndim = 1 if case[6] is None else len(case[6].shape)
        jobs += [(case, cfg) for cfg in generator.candidate_configs("hopper", ndim)]
    # Jobs that share a binary (same dtype, head dim, kernel flags, layout and config; only the
    # sequence length differs) go to one worker, so each binary is compiled once.
    chunks = [[] for _ in range(workers)]
    for case, cfg in jobs:
        B, H, S, D, dt, kw, layout = case
        key = repr((dt, D, sorted(k for k in kw if kw[k] not in (False, None)), layout, cfg))
        chunks[int(hashlib.sha1(key.encode()).hexdigest(), 16) % workers].append((case, cfg))
    t = time.time()
    with mp.get_context("spawn").Pool(workers) as pool:
        errors = [e for errs in pool.map(_compile_worker, chunks) for e in errs]
    print(f"precompiled {len(jobs)} (case, config) pairs with {workers} processes in {time.time() - t:.0f} s;"
          f" {len(errors)} failed {errors[:3]}", flush=True)


def print_table() -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"attnopt Triton kernels on {torch.cuda.get_device_name()}")
    for col in ("section", "case", "triton ms", "vs flash", "vs flex", "of bound", "err"):
        t.add_column(col)
    for r in ROWS:
        case = r.get("case") or (f"{r.get('dtype')} D{r.get('D')} S{r.get('S')}"
                                 + (" causal" if r.get("causal") else "")
                                 + (f" w{r['window']}" if "window" in r else ""))
        vs_flash = r.get("vs_flash", r.get("vs_flash_causal", r.get("vs_flash_dense")))
        frac = r.get("fraction_of_bound")
        err = r.get("max_abs_err_vs_flash", r.get("max_abs_err_vs_flex"))
        t.add_row(r["section"], case, f"{r['triton_ms']:.3f}", f"{vs_flash:.2f}x", f"{r['vs_flex']:.2f}x",
                  "" if frac is None else f"{frac:.0%}", f"{err:.1e}")
    Console(width=140).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", nargs="+", default=["dense", "window", "gna", "leading"])
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new cases after this")
    ap.add_argument("--json", default=None)
    ap.add_argument("--compile-workers", type=int, default=12, help="0: compile inside the timed phase")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_kernels.py needs a CUDA device")
    deadline = time.time() + a.budget_s
    import triton

    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if a.compile_workers:
        precompile(kernel_cases(a.sections, a.quick), a.compile_workers)
    for name in a.sections:
        t0 = time.time()
        {"dense": section_dense, "window": section_window, "gna": section_gna,
         "leading": section_leading}[name](a.quick, deadline)
        print(f"section {name}: {time.time() - t0:.0f} s", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "rows": ROWS}, f, indent=1, default=str)
    print_table()


if __name__ == "__main__":
    main()
