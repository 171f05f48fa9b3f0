"""Real transformers models optimized on the GPU (skipped without CUDA).

The user's flow: the model and example inputs live on the GPU, `attnopt.optimize` rewrites and
validates there, and the rewritten graph's attnopt::attention calls run the generated Triton
kernels (counted here) — not the exact fallback. fp32 (the kernels use IEEE fp32 dots for fp32
inputs) and bf16, against the original model on the same device.
"""
from __future__ import annotations

import pytest
import torch

import attnopt
import dataclasses

from attnopt.codegen import select
from zoo import hf

MODELS = hf.NAMES


@pytest.fixture
def triton_calls(monkeypatch, tmp_path):
    """One entry per kernel-table dispatch of the rewritten model: whether a Triton row ran."""
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ATTNOPT_AUTOTUNE", "0")
    calls = []

    def counted(row):
        def run(*a, **kw):
            calls.append(row.group == "triton")
            return row.run(*a, **kw)
        return dataclasses.replace(row, run=run)

    monkeypatch.setattr(select, "TABLE", tuple(counted(c) for c in select.TABLE))
    return calls


def _err(a, b):
    return (a.float() - b.float()).abs().max().item() / max(1e-6, b.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_optimized_model_matches_on_gpu(name, dtype, triton_calls):
    import copy

    zm = hf.build(name)
    ref32_model = copy.deepcopy(zm.model).to("cuda", torch.float32)
    model = zm.model.to("cuda", dtype)
    kw32 = {k: v.to("cuda") for k, v in zm.kwargs.items()}
    kwargs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kw32.items()}
    with torch.no_grad():
        ref32 = hf.first_tensor(ref32_model(**kw32)).float()
        ref = hf.first_tensor(model(**kwargs)).float()
    res = attnopt.optimize(model, kwargs)
    detail = [(s.name, s.status, s.error, s.reason) for s in res.sites]
    assert res.sites_found == len(zm.expected), detail
    assert res.sites_rewritten == res.sites_found, detail
    triton_calls.clear()
    with torch.no_grad():
        got = hf.first_tensor(res.model(**kwargs)).float()
    assert triton_calls and all(triton_calls), "the generated kernels did not run"
    if dtype == torch.float32:
        assert _err(got, ref) <= 1e-4
    else:
        # At least as close to the fp32 model as the original bf16 model is (plus rounding).
        assert _err(got, ref32) <= 1.25 * _err(ref, ref32) + 2e-3, (_err(got, ref32), _err(ref, ref32))
