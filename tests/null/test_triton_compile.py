"""Every generated-kernel specialization compiles for a real GPU (sm_90, Hopper tile table) on
this GPU-less machine: triton's wheel carries ptxas, and the interpreter alone accepts code the
compiler rejects (it once let a non-constexpr global through that failed on the first H100).

Runs `python -m attnopt.codegen.triton.aot --json` in a fresh process without TRITON_INTERPRET,
because `make test` sets it for the whole session and triton fixes its mode at import.

A fresh compile of all ~100 kernels takes ~10 min on 2 cores (CI's cache is empty), so make test
compiles one specialization of each kernel family and feature most likely to break the compiler
(REPRESENTATIVE), and make test-long compiles every one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")

# one per family (forward, block-sparse GNA with both global ends, decode + its combine, the dense
# backward's four kernels, the GNA backward's three), with the features that reach most code paths:
# bf16 at D 128, causal, softcap, GQA, a bool mask, sinks and a window
REPRESENTATIVE = ["dense_bf16_d128", "causal_bf16", "softcap", "gna_2d_blocksparse", "gna_3d_leading_trailing",
                  "decode_q1_gqa8_bf16_d128", "decode_window_sinks_left", "bwd_causal_bf16_d128",
                  "gna_bwd_2d_globals_gqa_bool"]


def _compile(only=None) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    cmd = [sys.executable, "-m", "attnopt.codegen.triton.aot", "--json"] + (["--only", *only] if only else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.stdout.strip(), proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    failed = {r["name"]: r["error"] for r in rows if not r["ok"]}
    assert not failed, failed
    assert proc.returncode == 0
    # Half-precision dots must reach Hopper's tensor-core instruction (wgmma), not a scalar path
    # (decode tiles of 16 query rows are below wgmma's 64: they use mma.sync, as flash-decoding does).
    half = [r for r in rows if not r["name"].endswith("fp32") and r["name"] != "window_both"
            and r["family"] != "decode" and r.get("dtype") != "float32" and r.get("dots", True)]
    assert all(r["wgmma"] for r in half), [r["name"] for r in half if not r["wgmma"]]
    return rows


def test_representative_specializations_compile_for_sm90():
    rows = _compile(REPRESENTATIVE)
    names = {r["name"] for r in rows}
    assert {r.split(":")[0] for r in names} == set(REPRESENTATIVE)
    assert {"decode_q1_gqa8_bf16_d128:combine"} | {f"bwd_causal_bf16_d128:{k}" for k in
                                                   ("fwd_lse", "bwd_pre", "bwd_dkdv", "bwd_dq")} <= names


@pytest.mark.long
def test_every_specialization_compiles_for_sm90():
    names = {r["name"] for r in _compile()}
    assert {"dense_bf16_d128", "causal_bf16", "window", "sigmoid", "softcap", "padding_mask", "bias",
            "gqa_4to1", "mqa", "gna_1d", "gna_2d", "gna_2d_blocksparse", "gna_3d", "gna_2d_leading_cls"} <= names
    assert {"decode_q1_gqa8_bf16_d128", "decode_q1_gqa8_bf16_d128:combine", "decode_window_sinks_left",
            "decode_direct_d80_fp16"} <= names
    assert {f"bwd_causal_bf16_d128:{k}" for k in ("fwd_lse", "bwd_pre", "bwd_dkdv", "bwd_dq")} <= names


def test_unknown_specialization_is_refused():
    from attnopt.codegen.triton import aot

    with pytest.raises(ValueError, match="no specialization named"):
        aot.check_all(only=["no_such_kernel"])
