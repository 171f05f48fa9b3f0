"""TorchScript ONNX (opset 17) models whose q/k are written by slice assignment (exported as
ScatterND) and split into heads by `unflatten` (a Reshape whose target goes through Mod, which
ONNX shape inference cannot follow): the ranks inference loses are read off probe runs
(frontends/onnx_eval.recover_shapes), so the sites are found, rewritten and validated. Near
misses: ScatterND writing the scores or the probabilities is not attention and stays as it is.

Layouts: x [B, S, E]; q, k, v [B, H, S, D] (E = H * D).
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import attnopt
from attnopt.frontends.onnx import load_onnx
from zoo import coverage_registry as reg
from zoo import flavours
from zoo.hf import ZooModel
from zoo.sharpen import sharpen_
from zoo.testing import shared_dir

TOL = 1e-4
B, S, E, H = 2, 16, 32, 4
D = E // H
R = D // 2  # rotated part of the head dim
T = 4  # leading text tokens left unrotated


class PartialRope(nn.Module):
    """Heads by unflatten; rotary embedding on a part of q and k, written back in place.

    part="dims": the first R channels of every head (CogView4, Cosmos); part="tokens": every
    token after the first T (Mochi's text stays unrotated). write: what else the model writes
    by slice assignment ("scores": a column of the scores; "probs": a column of the weights)."""

    def __init__(self, part: str = "dims", write: str | None = None, unflatten: bool = True):
        super().__init__()
        self.part, self.write, self.unflatten = part, write, unflatten
        self.qkv, self.o = nn.Linear(E, 3 * E), nn.Linear(E, E)
        w = R if part == "dims" else D
        ang = torch.arange(S)[:, None] * torch.arange(1, w // 2 + 1)[None] * 0.37
        self.register_buffer("cos", ang.cos().repeat(1, 2))
        self.register_buffer("sin", ang.sin().repeat(1, 2))

    def _rot(self, t, cos, sin):
        a, b = t.chunk(2, -1)
        return t * cos + torch.cat((-b, a), -1) * sin

    def forward(self, x):
        b, s, _ = x.shape
        y = self.qkv(x)
        y = y.unflatten(-1, (3, H, D)) if self.unflatten else y.view(b, s, 3, H, D)
        q, k, v = y.permute(2, 0, 3, 1, 4)
        q, k = q.clone(), k.clone()
        if self.part == "dims":
            q[..., :R] = self._rot(q[..., :R], self.cos, self.sin)
            k[..., :R] = self._rot(k[..., :R], self.cos, self.sin)
        else:
            q[:, :, T:] = self._rot(q[:, :, T:], self.cos[T:], self.sin[T:])
            k[:, :, T:] = self._rot(k[:, :, T:], self.cos[T:], self.sin[T:])
        sc = q @ k.transpose(-1, -2) * D ** -0.5
        if self.write == "scores":
            sc[..., 0] = 0.0
        p = torch.softmax(sc, -1)
        if self.write == "probs":
            p[..., 0] = 0.0
        return self.o((p @ v).transpose(1, 2).reshape(b, s, E))


class CatRope(nn.Module):
    """Heads by unflatten, rotary on half the head dim by cat (no ScatterND): exported with
    dynamic batch and sequence, so the lost ranks come back with symbolic dims."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(E, 3 * E), nn.Linear(E, E)
        ang = torch.arange(64)[:, None] * torch.arange(1, R + 1)[None] * 0.37
        self.register_buffer("cos", ang.cos())
        self.register_buffer("sin", ang.sin())

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, H, D)).permute(2, 0, 3, 1, 4)
        q = torch.cat((q[..., :R] * self.cos[:s] + q[..., R:] * self.sin[:s], q[..., R:]), -1)
        p = torch.softmax(q @ k.transpose(-1, -2) * D ** -0.5, -1)
        return self.o((p @ v).transpose(1, 2).reshape(b, s, E))


def _export(model: nn.Module, path, dynamic_axes=None) -> str:
    sharpen_(model).eval()
    x = torch.randn(B, S, E, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), opset_version=17, dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes=dynamic_axes)
    return str(path)


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _run(model, x: np.ndarray) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("part", ["dims", "tokens"])
def test_slice_assigned_rope_found_and_rewritten(tmp_path, part):
    path = _export(PartialRope(part), tmp_path / f"rope_{part}.onnx")
    assert _ops(path).count("ScatterND") == 2 and "Mod" in _ops(path)  # what the test is about
    res = attnopt.optimize(path)
    assert res.sites_found == 1, [r.reason for r in res.rejected]
    assert res.sites_rewritten == 1, [s.reason for s in res.sites]
    assert res.rel_error <= TOL
    s = res.sites[0]
    assert (s.spec.num_heads, s.spec.head_dim, s.spec.q_len, s.spec.kv_len) == (H, D, S, S)
    assert "MultiHeadAttention" in [n.op_type for n in res.model.graph.node]
    x = np.random.default_rng(1).standard_normal((B, S, E)).astype(np.float32)
    want, got = _run(path, x), _run(res.model, x)
    assert np.linalg.norm(got - want) <= TOL * np.linalg.norm(want)


def test_recovered_ranks_keep_symbolic_dims(tmp_path):
    """Dynamic batch and sequence: the probe runs name the axes that move with them, the
    rest static; the rewritten model runs at other sizes and gives the original's numbers."""
    path = _export(CatRope(), tmp_path / "cat_rope.onnx", {"x": {0: "batch", 1: "seq"}})
    g = load_onnx(path)
    mm = [n for n in g.nodes() if g.op(n) == "matmul" and g.rank(g.inputs_of(n)[1]) == 4]
    assert mm, "the score and value matmuls have rank-4 operands once shapes are recovered"
    assert {g.shape(n) for n in mm} == {("batch", H, "seq", "seq"), ("batch", H, "seq", D)}
    res = attnopt.optimize(path)
    assert (res.sites_found, res.sites_rewritten) == (1, 1) and res.rel_error <= TOL
    x = np.random.default_rng(2).standard_normal((3, 21, E)).astype(np.float32)
    want, got = _run(path, x), _run(res.model, x)
    assert np.linalg.norm(got - want) <= TOL * np.linalg.norm(want)


def test_pinned_sizes_stay_static(tmp_path):
    """Slice assignment bakes the example's sizes into the TorchScript export, so the graph
    declared with a dynamic batch runs at batch 2 only: recovered dims are that size, not a
    symbol the model cannot take, and the site is still rewritten."""
    path = _export(PartialRope("dims"), tmp_path / "pinned.onnx", {"x": {0: "batch"}})
    g = load_onnx(path)
    scat = [n for n in g.nodes() if g.attr(n, "native", "").endswith("::ScatterND")]
    assert scat and all(g.shape(n) == (B, H, S, D) for n in scat)
    res = attnopt.optimize(path)
    assert (res.sites_found, res.sites_rewritten) == (1, 1) and res.rel_error <= TOL


@pytest.mark.parametrize("write, why", [
    ("scores", "ScatterND)) sits between the score matmul and the softmax"),
    ("probs", "are also used elsewhere"),
], ids=["scores", "probs"])
def test_near_miss_scatter_into_scores_or_weights(tmp_path, write, why):
    """A column of the scores (before the softmax) or of the weights (after it) overwritten by
    slice assignment: what multiplies v is not the softmax of q k^T, so no site is found (now
    for that reason, not for a lost rank) and the model is unchanged."""
    path = _export(PartialRope("dims", write=write), tmp_path / f"near_{write}.onnx")
    assert _ops(path).count("ScatterND") == 3
    res = attnopt.optimize(path)
    assert res.sites_found == 0, [(s.name, s.status) for s in res.sites]
    reasons = [r.reason for r in res.rejected]
    assert any(why in r for r in reasons) and not any("unknown rank" in r for r in reasons), reasons
    assert "MultiHeadAttention" not in [n.op_type for n in res.model.graph.node]
    x = np.random.default_rng(3).standard_normal((B, S, E)).astype(np.float32)
    np.testing.assert_allclose(_run(res.model, x), _run(path, x), rtol=0, atol=0)


def test_cosmos_onnx_ts17(tmp_path_factory):
    """Cosmos (diffusers) in TorchScript ONNX 17: rotary on q/k written back by index, heads by
    unflatten. Both sites (self- and cross-attention) found and rewritten."""
    name = "cosmos"
    model, kw = reg.build(name)
    path = flavours.export(ZooModel(name, model, kw, []), "onnx_ts17", shared_dir(tmp_path_factory))[0]
    res = attnopt.optimize(path)
    assert res.sites_found == reg.ALL[name].sites, [r.reason for r in res.rejected]
    assert res.sites_rewritten == res.sites_found, [s.reason for s in res.sites]
    assert res.rel_error <= TOL
