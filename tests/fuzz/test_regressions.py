"""Every failure the graph fuzzer (attnopt.testing.fuzz) found, replayed from its case file.

Each case file holds the grammar choices of one generated program; `run_case` rebuilds it,
optimizes it and checks it independently of attnopt's validator. The second column says what
the case must show beyond the fuzz invariant (e.g. that the site is actually rewritten).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnopt.testing.fuzz import run_case

CASES = Path(__file__).parent / "cases"

# case file -> minimum number of rewritten sites (0: the invariant alone)
REGRESSIONS = {
    # nn.Dropout left as a call_module leaf by symbolic_trace was opaque: the site was missed.
    "dropout_module_leaf.json": 1,
    # fp16 ONNX sites were always reverted: validation compared them at the fp32 tolerance.
    "onnx_fp16_tolerance.json": 1,
    # baddbmm's bias (a causal mask) was treated as added after the softcap: miscompile.
    "baddbmm_bias_under_softcap.json": 0,
    # an input-dependent where-mask with a finite fill: a fully masked row averages V in the model; the ONNX splice gave another value (now left alone)
    "onnx_where_finite_fill_dense_input.json": 0,
    # the same in torch: the fused op now puts mean(V) on fully masked rows
    "torch_where_finite_fill_dense_input.json": 1,
    # a -inf where-mask with a fully masked row: the model gives NaN (undefined), the kernel zeros; NaN in the original is not compared
    "torch_where_inf_fill_dense_input.json": 1,
    # torch.export with a dynamic sequence and a dense mask: the splice reshaped the mask to [1, 1, -1, -1] and crashed (masks are now unsqueezed)
    "torch_export_dynamic_seq_dense_mask.json": 0,
    # sigmoid with a where padding mask and a scalar bias: bias/mask shapes differed in the bias classification and the site was missed
    "torch_sigmoid_pad_fill_scalar_bias.json": 1,
    # sigmoid(q kᵀ)ᵀ @ v is sigmoid attention with q and k swapped: a site is fine when it matches
    "torch_sigmoid_transposed_probs.json": 0,
    # baddbmm(zeros, q, kᵀ) with a softcap: the constant zero bias made the site a near miss; a zero bias is now no bias
    "torch_baddbmm_zero_bias_softcap.json": 1,
    # fp16: the original's own rounding reached the tolerance; both programs are now measured against the fp32 twin
    "onnx_fp16_against_fp32_twin.json": 1,
    # torch fp16 with unscaled scores: the original's own fp16 rounding reached the tolerance.
    "torch_fp16_against_fp32_twin.json": 1,
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_fuzz_regression(name):
    case = json.loads((CASES / name).read_text())
    o = run_case(case["choices"])
    assert o.ok, f"{name}: {o.message} (first seen: {case['message']})"
    assert o.rewritten >= REGRESSIONS[name], f"{name}: {o.rewritten} sites rewritten"
