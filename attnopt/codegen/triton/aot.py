"""Compile generated kernels for a GPU target on a machine without a GPU.

Triton's wheel carries ptxas, so a `KernelCall` built from CPU tensors (only dtypes, shapes and
constexprs matter to the compiler) compiles all the way to a cubin for, e.g., sm_90. This is how
CI proves that every specialization compiles for real hardware (the interpreter accepts code the
compiler rejects, such as reading non-constexpr globals), and how a developer reads register,
spill and shared-memory counts before spending GPU time.

    compile_call(call, arch=90) -> triton CompiledKernel
    resources(compiled) -> {"registers", "spills", "shared_bytes"}
"""
from __future__ import annotations

import time
from typing import Any

from attnopt.codegen.triton import decode
from attnopt.codegen.triton.launcher import KernelCall


def signature(call: KernelCall | decode.Launch) -> tuple[dict[str, str], dict[str, Any]]:
    """(argument name -> triton type, constexpr name -> value) of a built call."""
    from triton.runtime.jit import mangle_type

    names = list(call.fn.arg_names)
    sig: dict[str, str] = {}
    for name, value in zip(names, call.args):
        sig[name] = mangle_type(value)
    for name in names[len(call.args):]:
        if name not in call.constexprs:
            raise ValueError(f"kernel argument {name} has no value in the call")
        sig[name] = "constexpr"
    return sig, dict(call.constexprs)


def compile_call(call: KernelCall | decode.Launch, arch: int = 90):
    """Compile `call`'s kernel for sm_<arch> (raises triton's CompilationError on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, constexprs = signature(call)
    src = ASTSource(call.fn, sig, constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": call.num_warps, "num_stages": call.num_stages})


_ONLY: frozenset[str] | None = None  # check_all(only=...): the specializations to compile


def _compiled(row: dict, make_call, arch: int) -> dict | None:
    """`row` with the sm_<arch> compile of make_call()'s kernel: its resources and ok=True, or
    ok=False and the error (a failure is reported per row, never raised), and compile_s. None
    when `only` leaves the row's specialization out (its name before any ":<kernel>")."""
    if _ONLY is not None and row["name"].split(":")[0] not in _ONLY:
        return None
    t = time.time()
    try:
        row.update(resources(compile_call(make_call(), arch)), ok=True)
    except Exception as e:  # noqa: BLE001  reported per row
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip()[-400:]}")
    row["compile_s"] = round(time.time() - t, 2)
    return row


def resources(compiled) -> dict[str, Any]:
    """Registers / spill stores / shared memory of a compiled kernel, read from its cubin with the
    cuobjdump that ships in triton's wheel, and whether its dots became Hopper wgmma."""
    import os
    import re
    import subprocess
    import tempfile

    import triton.backends.nvidia as nv

    out: dict[str, Any] = {"shared_bytes": int(getattr(compiled.metadata, "shared", 0) or 0),
                           "wgmma": "wgmma" in compiled.asm.get("ptx", "")}
    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    for key, pat in (("registers", r"REG:(\d+)"), ("stack_bytes", r"STACK:(\d+)"),
                     ("local_bytes", r"LOCAL:(\d+)")):
        m = re.search(pat, text)
        out[key] = int(m.group(1)) if m else None
    return out


# ---- every specialization, compiled for real targets (CI's proof that the kernels build) ----

def specializations():
    """(name, family, params, q/k/v shapes, mask shape and dtype, dtype, layout, (leading, trailing)
    global tokens) of every kernel specialization the tests exercise under the interpreter."""
    import torch

    from attnopt.codegen.params import AttentionParams
    from attnopt.ir import GNALayout

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    P = AttentionParams
    dense = [
        ("dense_fp32", "dense", P(scale=0.125), (1, 4, 4, 197, 197, 64), None, f32),
        ("dense_fp16_d80", "dense", P(scale=0.1), (1, 4, 4, 197, 197, 80), None, f16),
        ("dense_bf16_d128", "dense", P(scale=0.09), (1, 4, 4, 4096, 4096, 128), None, bf16),
        ("causal_bf16", "causal", P(scale=0.1, causal=True), (1, 4, 4, 1024, 1024, 128), None, bf16),
        ("causal_bottom_right", "causal", P(scale=0.1, causal=True, causal_alignment="bottom_right"),
         (1, 4, 4, 63, 197, 64), None, f16),
        ("gqa_4to1", "causal", P(scale=0.1, causal=True), (1, 8, 2, 513, 513, 64), None, bf16),
        ("mqa", "dense", P(scale=0.1), (1, 8, 1, 257, 257, 64), None, f16),
        ("bias", "dense", P(scale=0.1), (2, 4, 4, 197, 197, 64), ((1, 4, 197, 197), f32), f16),
        ("padding_mask", "dense", P(scale=0.1), (2, 4, 4, 197, 197, 64), ((2, 1, 1, 197), torch.bool), f16),
        ("softcap", "dense", P(scale=0.1, softcap=30.0), (1, 4, 4, 513, 513, 64), None, bf16),
        ("sigmoid", "sigmoid", P(scale=0.1, normalizer="sigmoid"), (1, 4, 4, 513, 513, 64), None, f16),
        ("window", "sliding_window", P(scale=0.1, window=(255, 0)), (1, 4, 4, 2000, 2000, 128), None, bf16),
        ("window_both", "sliding_window", P(scale=0.1, window=(100, 37)), (1, 4, 4, 1000, 1000, 64), None, f32),
    ]
    gna_cases = [
        ("gna_1d", GNALayout((3000,), (255,), (64,), (2,)), None, bf16),
        ("gna_2d", GNALayout((48, 40), (13, 9)), None, f16),
        ("gna_2d_blocksparse", GNALayout((64, 64), (16, 16), (16, 16)), None, bf16),
        ("gna_2d_dilated_mask", GNALayout((50, 44), (7, 9), (3, 4), (2, 1)), ((1, 1, 2200, 2200), f32), f16),
        ("gna_3d", GNALayout((8, 24, 24), (4, 8, 8), (1, 2, 4), (1, 1, 1), (True, False, False)), None, bf16),
    ]
    out = [(*c, None, (0, 0)) if len(c) == 6 else (*c, (0, 0)) for c in dense]
    gna_cases.append(("gna_2d_leading_cls", GNALayout((48, 40), (13, 9)), None, bf16, 1))
    gna_cases.append(("gna_2d_trailing_text", GNALayout((48, 40), (13, 9)), None, bf16, 0, 77))
    gna_cases.append(("gna_3d_leading_trailing", GNALayout((4, 16, 16), (3, 7, 7)), None, bf16, 1, 20))
    for name, layout, mask, dt, *glob in gna_cases:
        import math

        leading, trailing = (list(glob) + [0, 0])[:2]
        n = leading + math.prod(layout.shape) + trailing
        out.append((name, "block_sparse_gna", P(scale=0.1), (1, 4, 2, n, n, 64), mask, dt, layout,
                    (leading, trailing)))
    return out


def decode_specializations():
    """(name, params, (B, H, Hkv, Sq, Skv, D), mask shape and dtype, dtype, kv_lens shape, padding
    side, sinks, splits) of the decode family's specializations: GQA / MQA row packing (1 to 64
    rows per tile, and two tiles), ragged caches, a window with sinks, masks, softcap, sigmoid, one
    split (no combine) and many. `splits` None: the heuristic's for a 132-SM GPU (H100/H200)."""
    import torch

    from attnopt.codegen.params import AttentionParams

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    br = dict(causal=True, causal_alignment="bottom_right")
    P = AttentionParams
    return [
        ("decode_q1_gqa8_bf16_d128", P(scale=0.09, **br), (1, 32, 4, 1, 8192, 128), None, bf16, None, "right", 0,
         None),
        ("decode_q1_mqa_fp16", P(scale=0.125, **br), (1, 16, 1, 1, 4096, 64), None, f16, None, "right", 0, None),
        ("decode_q16_gqa4_bf16", P(scale=0.09, **br), (2, 16, 4, 16, 4096, 128), None, bf16, None, "right", 0,
         None),
        ("decode_q4_gqa32_fp16", P(scale=0.125, **br), (1, 32, 1, 4, 2048, 64), None, f16, None, "right", 0, None),
        ("decode_window_sinks_left", P(scale=0.125, window=(1024, None), **br), (4, 8, 2, 1, 8192, 64), None,
         f16, (4,), "left", 4, None),
        ("decode_ragged_right_bf16", P(scale=0.09, **br), (4, 8, 8, 1, 2048, 128), None, bf16, (4,), "right", 0,
         None),
        ("decode_softcap_bias_bf16", P(scale=0.09, softcap=50.0, **br), (2, 8, 2, 1, 4096, 128),
         ((2, 1, 1, 4096), f32), bf16, None, "right", 0, None),
        ("decode_bool_mask_fp32", P(scale=0.125), (2, 8, 2, 3, 1024, 64), ((2, 1, 3, 1024), torch.bool), f32,
         None, "right", 0, None),
        ("decode_sigmoid_fp16", P(scale=0.125, normalizer="sigmoid"), (1, 8, 8, 1, 4096, 64), None, f16, None,
         "right", 0, None),
        ("decode_direct_d80_fp16", P(scale=0.11, **br), (8, 32, 8, 1, 512, 80), None, f16, None, "right", 0, 1),
    ]


def _decode_rows(arch: int, table: str) -> list[dict]:
    """One row per decode launch: the split kernel, and the combine (":combine") when it splits."""
    import torch

    rows = []
    for name, params, (B, H, Hkv, Sq, Skv, D), mask_spec, dtype, lens, side, sinks, splits \
            in decode_specializations():
        q = torch.empty(B, H, Sq, D, dtype=dtype)
        k = torch.empty(B, Hkv, Skv, D, dtype=dtype)
        mask = None if mask_spec is None else torch.zeros(mask_spec[0], dtype=mask_spec[1])
        kv_lens = None if lens is None else torch.zeros(lens, dtype=torch.int32)
        cfg = decode.candidate_configs(table, B, Hkv, decode.row_tiles(q, k)[1], Skv, 132)[0]
        if splits is not None:
            cfg = decode.DecodeConfig(cfg.block_n, splits, cfg.num_warps, cfg.num_stages)
        call = decode.decode_call(cfg, q, k, k, mask, params, kv_lens, side, sinks)
        for part, launch in zip(("", ":combine"), call.calls):
            row = {"name": name + part, "family": "decode", "table": table, "arch": arch,
                   "config": cfg.to_json()}
            rows.append(_compiled(row, lambda launch=launch: launch, arch))
    return rows


def backward_specializations():
    """(name, params, (B, H, Hkv, Sq, Skv, D), mask shape and dtype, mask needs grad, dtype) of the
    dense-family backward kernels (triton/backward.py): every case the interpreter tests cover, at
    GPU sizes, at the first tuning candidate (backward.candidates)."""
    import torch

    from attnopt.codegen.params import AttentionParams

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    P = AttentionParams
    br = dict(causal=True, causal_alignment="bottom_right")
    return [
        ("bwd_dense_fp16_d64", P(scale=0.125), (2, 8, 8, 1024, 1024, 64), None, False, f16),
        ("bwd_dense_fp32_d80", P(scale=0.11), (1, 4, 4, 197, 197, 80), None, False, f32),
        ("bwd_causal_bf16_d128", P(scale=0.09, causal=True), (1, 8, 8, 2048, 2048, 128), None, False, bf16),
        ("bwd_causal_bottom_right_gqa", P(scale=0.1, **br), (1, 8, 2, 500, 1024, 64), None, False, bf16),
        ("bwd_mqa_fp16", P(scale=0.1), (1, 8, 1, 257, 257, 64), None, False, f16),
        ("bwd_window_bf16", P(scale=0.1, window=(255, 0)), (1, 4, 4, 2000, 2000, 128), None, False, bf16),
        ("bwd_window_both_fp32", P(scale=0.1, window=(100, 37)), (1, 4, 2, 1000, 1000, 64), None, False, f32),
        ("bwd_padding_mask", P(scale=0.1), (2, 4, 4, 197, 197, 64), ((2, 1, 1, 197), torch.bool), False, f16),
        ("bwd_bias_grad", P(scale=0.1), (2, 4, 4, 197, 197, 64), ((1, 4, 197, 197), f32), True, f16),
        ("bwd_softcap_bf16", P(scale=0.1, softcap=30.0), (1, 4, 2, 513, 513, 128), None, False, bf16),
        ("bwd_sigmoid_fp16", P(scale=0.1, normalizer="sigmoid"), (1, 4, 4, 513, 513, 64), None, False, f16),
    ]


# The backward specializations whose every tuning candidate is compiled too (rows "<name>@<i>:..."):
# one per dtype class of each backward family.
TUNING_CANDIDATE_SPECS = ("bwd_causal_bf16_d128", "bwd_dense_fp16_d64", "bwd_dense_fp32_d80", "gna_bwd_2d_fp16",
                          "gna_bwd_2d_globals_gqa_bool", "gna_bwd_2d_fp32_d80")


def _backward_rows(arch: int) -> list[dict]:
    """One row per launch of each backward specialization (LSE forward, preprocess, dK/dV, dQ), at
    its first tile config; for TUNING_CANDIDATE_SPECS also at each other candidate."""
    import torch

    from attnopt.codegen.triton import backward

    rows = []
    for name, params, (B, H, Hkv, Sq, Skv, D), mask_spec, mask_grad, dtype in backward_specializations():
        q = torch.empty(B, H, Sq, D, dtype=dtype)
        k = torch.empty(B, Hkv, Skv, D, dtype=dtype)
        mask = None if mask_spec is None else torch.zeros(mask_spec[0], dtype=mask_spec[1])
        cands = backward.candidates(q)
        for i, cfg in enumerate(cands if name in TUNING_CANDIDATE_SPECS else cands[:1]):
            calls, _ = backward.backward_calls(q, q, k, k, mask, params, (True, True, True, mask_grad), cfg)
            for kname, launch in calls:
                row = {"name": f"{_candidate_name(name, i)}:{kname.replace('attn_', '').replace('_kernel', '')}",
                       "family": "backward", "table": "fixed", "arch": arch, "dtype": str(dtype).replace("torch.", ""),
                       "dots": kname != "attn_bwd_pre_kernel",  # delta is a row sum: no tensor-core work
                       "config": {"block_m": cfg.block_m, "block_n": cfg.block_n, "num_warps": cfg.num_warps,
                                  "num_stages": cfg.num_stages}}
                rows.append(_compiled(row, lambda launch=launch: launch, arch))
    return rows


def _candidate_name(name: str, i: int) -> str:
    """A specialization's name at its i-th tuning candidate: the name itself for the first."""
    return name if i == 0 else f"{name}@{i}"


def gna_backward_specializations():
    """(name, layout, (leading, trailing), (B, H, Hkv, D), mask shape and dtype, mask needs grad,
    dtype) of the GNA backward kernels (triton/gna_backward.py): the cases the interpreter tests
    cover (strides, causal dims, dilation, globals, GQA, masks), at GPU sizes, first candidate tiles."""
    import torch

    from attnopt.ir import GNALayout

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    return [
        ("gna_bwd_1d_dilated_bf16_d128", GNALayout((3000,), (255,), (64,), (2,)), (0, 0), (1, 4, 4, 128), None,
         False, bf16),
        ("gna_bwd_2d_fp16", GNALayout((48, 40), (13, 9)), (0, 0), (1, 4, 2, 64), None, False, f16),
        ("gna_bwd_2d_fp32_d80", GNALayout((48, 40), (13, 9), (2, 3)), (0, 0), (1, 4, 4, 80), None, False, f32),
        ("gna_bwd_2d_dilated_bias_grad", GNALayout((50, 44), (7, 9), (3, 4), (2, 1)), (0, 0), (1, 4, 2, 64),
         ((1, 1, 2200, 2200), f32), True, f16),
        ("gna_bwd_2d_globals_gqa_bool", GNALayout((48, 40), (13, 9)), (1, 77), (1, 8, 2, 128),
         ((1, 1, 1, 1998), torch.bool), False, bf16),
        ("gna_bwd_3d_causal_bf16", GNALayout((8, 24, 24), (4, 8, 8), (1, 2, 4), (1, 1, 1), (True, False, False)),
         (1, 20), (1, 4, 2, 64), None, False, bf16),
    ]


def _gna_backward_rows(arch: int) -> list[dict]:
    """One row per launch of each GNA backward specialization (LSE + delta, dQ, dK/dV)."""
    import math

    import torch

    from attnopt.codegen.params import TokenLayout
    from attnopt.codegen.triton import gna_backward

    rows = []
    for name, layout, (leading, trailing), (B, H, Hkv, D), mask_spec, mask_grad, dtype \
            in gna_backward_specializations():
        S = leading + math.prod(layout.shape) + trailing
        q = torch.empty(B, H, S, D, dtype=dtype)
        k = torch.empty(B, Hkv, S, D, dtype=dtype)
        mask = None if mask_spec is None else torch.zeros(mask_spec[0], dtype=mask_spec[1])
        cands = gna_backward.candidates(q, len(layout.shape), mask is not None)
        for i, cfg in enumerate(cands if name in TUNING_CANDIDATE_SPECS else cands[:1]):
            calls, _ = gna_backward.backward_calls(q, q, k, k, mask, 0.1, TokenLayout(layout, leading, (), trailing),
                                                   (True, True, True, mask_grad), cfg)
            for kname, launch in calls:
                row = {"name": f"{_candidate_name(name, i)}:{kname.replace('gna_bwd_', '').replace('_kernel', '')}",
                       "family": "gna_backward", "table": "fixed", "arch": arch,
                       "dtype": str(dtype).replace("torch.", ""),
                       "config": {"q_tile": list(cfg.q_tile), "kv_tile": list(cfg.kv_tile),
                                  "dkdv_q_tile": list(cfg.dkdv_q_tile), "dkdv_kv_tile": list(cfg.dkdv_kv_tile),
                                  "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}}
                rows.append(_compiled(row, lambda launch=launch: launch, arch))
    return rows


def check_all(arch: int = 90, families=("hopper",), only=None) -> list[dict]:
    """Compile every specialization with the first config of each tile table; one row each (the
    decode family: one per launch, its split count the heuristic's). `only`: names of the
    specializations to compile (a fresh compile of all of them takes ~10 min on 2 cores; make
    test compiles a subset, make test-long all); an unknown name raises ValueError."""
    global _ONLY
    _ONLY = None if only is None else frozenset(only)
    try:
        rows = _check_all(arch, families)
    finally:
        _ONLY = None
    if only is not None:
        unknown = set(only) - {r["name"].split(":")[0] for r in rows if r is not None}
        if unknown:
            raise ValueError(f"no specialization named {sorted(unknown)}")
    return [r for r in rows if r is not None]


def _check_all(arch: int, families) -> list[dict | None]:
    import torch

    from attnopt.codegen.triton import generator, launcher

    rows = []
    for name, family, params, (B, H, Hkv, Sq, Skv, D), mask_spec, dtype, layout, (leading, trailing) \
            in specializations():
        q = torch.empty(B, H, Sq, D, dtype=dtype)
        k = torch.empty(B, Hkv, Skv, D, dtype=dtype)
        mask = None
        if mask_spec is not None:
            mask = torch.zeros(mask_spec[0], dtype=mask_spec[1])
        ndim = 1 if layout is None else len(layout.shape)
        for table in families:
            cfg = generator.candidate_configs(table, ndim)[0]
            row = {"name": name, "family": family, "table": table, "arch": arch, "config": cfg.to_json()}
            rows.append(_compiled(row, lambda: launcher.kernel_call(family, cfg, q, k, k, mask, params, layout,
                                                                  leading, trailing), arch))
    for table in families:
        rows.extend(_decode_rows(arch, table))
    rows.extend(_backward_rows(arch))
    rows.extend(_gna_backward_rows(arch))
    return rows


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Compile every generated-kernel specialization for a GPU target.")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--table", nargs="+", default=["hopper"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", nargs="+", default=None, metavar="NAME",
                    help="compile only these specializations (names as printed, before any ':')")
    a = ap.parse_args(argv)
    from attnopt.codegen.triton.generator import interpreter_active

    if interpreter_active():
        raise SystemExit("unset TRITON_INTERPRET: the interpreter does not compile")
    rows = check_all(a.arch, tuple(a.table), a.only)
    if a.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            status = "ok " if r["ok"] else "FAIL"
            extra = (f"regs {r.get('registers')} stack {r.get('stack_bytes')} smem {r.get('shared_bytes')}"
                     f" wgmma {r.get('wgmma')}") if r["ok"] else r["error"]
            print(f"{status} {r['name']:<34} {r['table']:<8} sm_{r['arch']} {r['compile_s']:>5}s  {extra}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
