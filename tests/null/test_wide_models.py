"""Breadth: ~50 transformers architectures (zoo.hf_wide) are detected and rewritten exactly.

Module flavour for every one; the torch.export program for the families whose attention needed
a pattern of its own (merged heads, masks before the scale, finite fills over ALiBi, subtracted
masks). Outputs are compared under one seed (ViTMAE draws random numbers in its forward)."""
from __future__ import annotations

import pytest
import torch

import attnopt
from zoo import hf_wide as wide
from zoo.testing import rel_l2, run_first

TOL = 1e-4
OWN_PATTERNS = ("bloom", "mpt", "codegen", "deberta_v3", "funnel")


def _headline(spec) -> dict:
    return {"num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads, "mask": spec.mask.kind,
            "padding": spec.mask.padding, "score_mods": tuple(spec.score_mods)}


def _check(res, w: wide.Wide) -> None:
    kept = {s.name: s.reason for s in res.sites if s.status != "rewritten"}
    assert res.sites_found == w.sites, f"found {res.sites_found} sites, want {w.sites}: {res.to_json()}"
    assert _headline(res.sites[0].spec) == w.first
    assert not kept, kept
    assert res.rel_error <= TOL


# Swin's module flavour takes ~30 s on 2 cores (torch.export's symbolic shapes over its window
# partition), the others listed 4-8 s: make test-long (CI's budget); their other flavours stay here,
# and test_views_relpos runs transformers' Swin in every flavour.
LONG = {"swin", "segformer", "t5", "m2m100", "gemma3text", "beit", "pegasus", "granite", "marian", "funnel",
        "mixtral", "codegen"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.long) if n in LONG else n
                                  for n in wide.NAMES])
def test_module(name):
    w = wide.WIDE[name]
    model, kw = wide.build(name)
    res = attnopt.optimize(model, kw)
    _check(res, w)
    assert rel_l2(run_first(res.model, kw), run_first(model, kw)) <= TOL


@pytest.mark.parametrize("name", OWN_PATTERNS)
def test_exported_program(name):
    w = wide.WIDE[name]
    model, kw = wide.build(name)
    with torch.no_grad():
        ep = torch.export.export(model, (), kw, strict=False)
    res = attnopt.optimize(ep)
    _check(res, w)
    assert rel_l2(run_first(res.model.module(), kw), run_first(model, kw)) <= TOL


class _GatedMLP(torch.nn.Module):
    """SiLU and QuickGELU spelled out (x * sigmoid(x), x * sigmoid(1.702 x)) between matmuls."""

    def __init__(self):
        super().__init__()
        self.up, self.mid, self.down = (torch.nn.Linear(16, 16) for _ in range(3))

    def forward(self, x):
        h = self.up(x)
        h = self.mid(h * torch.sigmoid(h))
        return self.down(h * torch.sigmoid(1.702 * h))


@pytest.mark.parametrize("flavour", ["module", "onnx"])
def test_gated_activations_are_not_near_misses(flavour, tmp_path):
    model, x = _GatedMLP().eval(), torch.randn(2, 5, 16)
    if flavour == "onnx":
        path = tmp_path / "mlp.onnx"
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
        report = attnopt.inspect(str(path))
    else:
        report = attnopt.inspect(model, (x,))
    assert not report.sites and not report.rejected, [r.reason for r in report.rejected]


ONNX_CASES = [(n, "onnx_ts17", op) for n in OWN_PATTERNS + ("deberta_v2",) for op in ("ort", "standard")] + \
    [("deberta_v3", "onnx_dynamo23", "ort"), ("mpt", "onnx_dynamo23", "ort"), ("bloom", "onnx_dynamo23", "ort"),
     # softcap: MultiHeadAttention has none, so an opset-23 model's sites take the standard op
     ("gemma2", "onnx_dynamo23", "ort"), ("gemma2", "onnx_ts17", "standard")]


@pytest.mark.parametrize("name,flavour,op", ONNX_CASES)
def test_onnx(name, flavour, op, tmp_path):
    import onnx

    from attnopt.emit.onnx import fused_nodes
    from attnopt.pipeline.optimize_onnx import write_onnx_atomically
    from zoo import flavours as fl
    from zoo.hf import ZooModel

    w = wide.WIDE[name]
    model, kw = wide.build(name)
    zm = ZooModel(name, model, kw, [])
    path, _ = fl.export(zm, flavour, tmp_path)
    res = attnopt.optimize(path, onnx_op=op)
    _check(res, w)
    out = tmp_path / "opt.onnx"
    write_onnx_atomically(res.model, str(out), res.base_dir)
    fused = fused_nodes(onnx.load(str(out)))  # (a guarded site's MHA sits in an If branch)
    assert len(fused) == w.sites
    got = torch.as_tensor(fl.run_onnx(out, zm.inputs)[0])
    assert rel_l2(got, run_first(model, kw)) <= 1e-3  # ORT's kernels vs torch's


@pytest.mark.parametrize("name", OWN_PATTERNS + ("falcon", "mpnet"))
def test_compile_backend(name):
    """torch.compile(backend="attnopt"): dynamo's torch-level graphs (BLOOM calls
    alibi.baddbmm(batch1=..., batch2=...) with keywords there; Falcon and MPNet scale the scores
    in place, operator.itruediv)."""
    from zoo import flavours as fl
    from zoo.hf import ZooModel

    model, kw = wide.build(name)
    graphs = fl.via_compile(ZooModel(name, model, kw, []))
    results = [attnopt.optimize(gm, ex) for gm, ex in graphs]
    assert sum(r.sites_found for r in results) == wide.WIDE[name].sites
    assert all(r.sites_rewritten == r.sites_found and r.rel_error <= TOL for r in results)
    torch._dynamo.reset()
    got = run_first(torch.compile(model, backend=attnopt.pipeline.backend.make_backend("eager")), kw)
    torch._dynamo.reset()
    assert rel_l2(got, run_first(model, kw)) <= TOL
