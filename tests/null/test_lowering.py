"""One lowering (issue 17): a recipe is lowered once into neutral steps (passes/lower.py), and both
emitters (emit/fx.py, emit/onnx.py) realize exactly those steps. The same model written as a
torch program and as an ONNX graph with the same value names gives the same recipe, hence the same
steps in both emitters, and both rewrites reproduce the model."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import attnopt.emit.fx as emit_fx
import attnopt.emit.onnx as emit_onnx
from attnopt.frontends import fx as fx_front
from attnopt.frontends.onnx import load_onnx
from attnopt.passes.detect import detect
from attnopt.passes.lower import (Attend, CombineMasks, Expand, Flatten, LoadOperand, MeanVOnDeadRows,
                                  Permute, SplitLead, Squeeze, StoreOutput, ToRank, Unflatten,
                                  Unsqueeze, ZeroNaNRows, lower)
from attnopt.passes.rewrite import MaskTerm, Operand, Recipe, plan

B, H, S, D = 2, 4, 6, 8
FILL = float(np.finfo(np.float32).min)


# ---- the same model, twice -------------------------------------------------------------------

class Additive(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.125 + mask, dim=-1) @ v


class FiniteWhere(torch.nn.Module):
    """An input-dependent where-mask with a finite fill: fully masked rows are the mean of V."""

    def forward(self, q, k, v, mask):
        return torch.softmax(torch.where(mask, q @ k.transpose(-1, -2) * 0.125, FILL), dim=-1) @ v


def _torch_graph(module, args):
    gm = torch.fx.symbolic_trace(module)

    class Record(torch.fx.Interpreter):  # shapes as dynamo leaves them (meta example_value)
        def run_node(self, n):
            r = super().run_node(n)
            n.meta["example_value"] = r
            return r

    with torch.no_grad():
        Record(gm).run(*args)
    return gm, fx_front.from_graph_module(gm, args, source="fx")


def _onnx_model(form: str, mask_type):
    vi = h.make_tensor_value_info
    nodes = [h.make_node("Transpose", ["k"], ["transpose"], perm=[0, 1, 3, 2]),
             h.make_node("MatMul", ["q", "transpose"], ["matmul"]),
             h.make_node("Mul", ["matmul", "c"], ["mul"])]
    inits = [nh.from_array(np.array(0.125, np.float32), "c")]
    if form == "additive":
        nodes.append(h.make_node("Add", ["mul", "mask"], ["add"]))
        scores = "add"
    else:
        nodes.append(h.make_node("Where", ["mask", "mul", "fill"], ["where"]))
        inits.append(nh.from_array(np.array(FILL, np.float32), "fill"))
        scores = "where"
    nodes += [h.make_node("Softmax", [scores], ["softmax"], axis=-1),
              h.make_node("MatMul", ["softmax", "v"], ["matmul_1"])]
    ins = [vi(n, T.FLOAT, [B, H, S, D]) for n in "qkv"] + [vi("mask", mask_type, [B, 1, 1, S])]
    m = h.make_model(h.make_graph(nodes, "g", ins, [vi("matmul_1", T.FLOAT, [B, H, S, D])], inits),
                     opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 9
    return m


def _inputs(form: str):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    keep = torch.ones(B, 1, 1, S, dtype=torch.bool)
    keep[0, ..., -2:] = False
    if form == "additive":
        return [q, k, v, torch.where(keep, 0.0, FILL)]
    keep[1] = False  # a batch row with every key masked: its rows are the mean of V
    return [q, k, v, keep]


@pytest.mark.parametrize("form", ["additive", "finite_where"])
def test_the_same_recipe_lowers_to_the_same_steps_in_both_emitters(monkeypatch, form):
    args = _inputs(form)
    gm, tg = _torch_graph(Additive() if form == "additive" else FiniteWhere(), args)
    og = load_onnx(_onnx_model(form, T.FLOAT if form == "additive" else T.BOOL))
    (ts,), _ = detect(tg)
    (os_,), _ = detect(og)
    rt, ro = plan(tg, ts), plan(og, os_)
    assert isinstance(rt, Recipe) and isinstance(ro, Recipe)
    assert rt == ro, "the two front ends agree on the recipe"
    assert rt.dead_rows_mean_v == (form == "finite_where")

    seen: dict[str, list] = {"fx": [], "onnx": []}

    def spy(which):
        def lowered(r):
            out = lower(r)
            seen[which].append(out.steps)
            return out
        return lowered

    monkeypatch.setattr(emit_fx, "lower", spy("fx"))
    monkeypatch.setattr(emit_onnx, "lower", spy("onnx"))
    new_gm, _ = emit_fx.splice(gm, [rt])
    with torch.no_grad():
        ref, got = gm(*args), new_gm(*args)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    feeds = {n: a.numpy() for n, a in zip(("q", "k", "v", "mask"), args)}
    for op in ("ort", "standard"):
        res = emit_onnx.splice_report(og, [ro], op=op)
        assert not res.skipped and len(emit_onnx.fused_nodes(res.model)) == 1, res.skipped
        out = ort.InferenceSession(res.model.SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        np.testing.assert_allclose(out, ref.numpy(), atol=1e-5, rtol=0)
    assert len(seen["fx"]) == 1 and len(seen["onnx"]) == 2
    assert seen["fx"][0] == seen["onnx"][0] == seen["onnx"][1] == lower(rt).steps
    kinds = [type(s) for s in seen["fx"][0]]
    want = [LoadOperand] * 3 + [CombineMasks, Attend] + ([MeanVOnDeadRows] if form != "additive" else []) \
        + [StoreOutput]
    assert kinds == want


# ---- the steps themselves ----------------------------------------------------------------------

def _recipe(rank: int, **kw) -> Recipe:
    ident = tuple(range(rank + 2))
    base = dict(site="s", q=Operand("q", ident), k=Operand("k", ident), v=Operand("v", ident),
                batch_rank=rank, batch_sizes=(2, 3, 4)[:rank], k_group_broadcast=False, masks=(),
                scale=0.5, causal=False, causal_alignment="top_left", window=None, softcap=None,
                normalizer="softmax", out_perm=ident, output="o")
    base.update(kw)
    return Recipe(**base)


@pytest.mark.parametrize("rank,views,out", [
    (2, (), ()),
    (1, (Unsqueeze((1,)),), (Squeeze((1,)),)),
    (0, (Unsqueeze((0, 1)),), (Squeeze((0, 1)),)),
    (3, (Flatten(1, 2, (3, 4)),), (Unflatten(1, (3, 4)),)),
])
def test_batch_ranks_view_to_the_ops_layout_and_back(rank, views, out):
    low = lower(_recipe(rank))
    for role in "qkv":
        assert low.operand(role).views == views
    assert low.step(StoreOutput).views == out
    assert low.batch_rank == rank and not low.merged_heads


def test_rank3_grouped_kv_and_masks():
    t = MaskTerm("m", "add", None, 1.0, 5, (0, 1, 2, 3, 4))
    low = lower(_recipe(3, k_group_broadcast=True, masks=(t,)))
    assert low.operand("q").views == (Flatten(1, 2, (3, 4)),)
    assert low.operand("k").views == low.operand("v").views == (Squeeze((2,)),)
    cm = low.step(CombineMasks)
    assert cm.views == (Expand((-1, 3, 4, -1, -1)), Flatten(1, 2, (3, 4)))
    assert cm.inputs[0].views == (ToRank(5),) and not cm.boolean


def test_merged_heads_and_permutations():
    merged = MaskTerm("alibi", "add", None, 1.0, 3, (0, 1, 2), merged_heads=4)
    view4 = MaskTerm("pad", "drop", FILL, 1.0, 4, (0, 1, 2, 3))
    r = _recipe(1, split_heads=4, masks=(merged, view4), q=Operand("q", (1, 0, 2)),
                out_perm=(1, 0, 2))
    low = lower(r)
    assert low.operand("q").views == (Permute((1, 0, 2)), Unflatten(0, (-1, 4)))
    assert low.operand("k").views == (Unflatten(0, (-1, 4)),)
    cm = low.step(CombineMasks)
    assert cm.views == ()  # the terms are [B, H, Sq, Skv] already
    assert cm.inputs[0].views == (ToRank(3), SplitLead(4, 3)) and cm.inputs[1].views == (ToRank(4),)
    assert low.step(StoreOutput).views == (Flatten(0, 1), Permute((1, 0, 2)))
    assert low.merged_heads == 4


def test_masks_fixups_and_the_call():
    keep = MaskTerm("k_ok", "keep", -math.inf, 1.0, 4, (0, 1, 3, 2))
    low = lower(_recipe(2, masks=(keep,), nan_guard=True, causal=True, softcap=30.0))
    cm = low.step(CombineMasks)
    assert cm.boolean and cm.inputs[0].views == (ToRank(4), Permute((0, 1, 3, 2)))
    a = low.step(Attend)
    assert (a.scale, a.causal, a.softcap, a.normalizer) == (0.5, True, 30.0, "softmax")
    assert [type(s) for s in low.steps][-3:] == [Attend, ZeroNaNRows, StoreOutput]
    assert lower(_recipe(2)).step(CombineMasks).inputs == ()  # no terms: no mask
    lit = MaskTerm("c", "add", None, 1.0, 4, (0, 1, 2, 3), literal=-1.0)
    assert lower(_recipe(2, masks=(lit,))).step(CombineMasks).inputs[0].views == ()

    sel = MaskTerm("pad", "keep", FILL, 1.0, 4, (0, 1, 2, 3))
    bias = MaskTerm("bias", "add", None, 1.0, 4, (0, 1, 2, 3))
    low = lower(_recipe(2, masks=(sel, bias), dead_rows_mean_v=True, q_heads=8, k_heads=2))
    fix = low.step(MeanVOnDeadRows)
    assert [i.term for i in fix.selects] == [sel] and fix.kv_repeat == 4
    assert not low.step(CombineMasks).boolean  # a finite fill is not a bool mask


def test_lowering_is_pure_and_frozen():
    r = _recipe(2, masks=(MaskTerm("m", "add", None, 2.0, 4, (0, 1, 2, 3)),))
    a, b = lower(r), lower(r)
    assert a == b and hash(a.steps) == hash(b.steps)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.steps[0].node = "x"
    assert a.bypass == r.bypass and a.remove == r.remove and a.site == r.site
