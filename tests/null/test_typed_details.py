"""The typed contract between matchers and recipes (issue 17): each pattern family hands its sites
a frozen details type of its own, one registry maps every details type back to the family that
builds the recipe, and score modifiers are typed values that still render as reports show them."""
from __future__ import annotations

import dataclasses
import json
import pickle

import pytest
from onnx import TensorProto as T
from onnx import helper as h

import attnopt
from attnopt.ir import PatternDetails, Site
from attnopt.ir.score_mods import Alibi, Bias, ScoreMod, Softcap, softcap_of
from attnopt.passes.rewrite import Recipe, plan
from attnopt.patterns import details as details_mod
from attnopt.patterns.details import DecomposedDetails, FoldedScale, FusedDetails
from attnopt.patterns.match import Details
from attnopt.patterns.registry import FAMILIES, family_of
from zoo import handwritten as hw


def _sites(name):
    case = hw.get(name)
    report = attnopt.inspect(case.module, case.args)
    return report


@pytest.mark.parametrize("name", ["matmul_div_scores", "scale_on_q_mul", "merged_heads_baddbmm_alibi",
                                  "nan_guard", "gqa_repeat_kv"])
def test_decomposed_sites_carry_decomposed_details(name):
    report = _sites(name)
    assert report.sites
    for s in report.sites:
        assert type(s.details) is DecomposedDetails and s.pattern == "decomposed"
        d = s.details
        assert dataclasses.is_dataclass(d) and d.__dataclass_params__.frozen
        assert all(isinstance(x, FoldedScale) for x in d.scale_nodes)
        assert d.mask_operands == tuple(d.mask_operands)  # detection filled the analyzed operands
        assert family_of(d).name == "decomposed"
        assert isinstance(plan(report.graph, s), Recipe)
        with pytest.raises(dataclasses.FrozenInstanceError):
            d.c1 = "x"


def test_typed_fields_say_what_the_model_did():
    (s,) = _sites("scale_on_q_mul").sites
    assert [(f.side, f.node) for f in s.details.scale_nodes if f.side == "q"]
    (s,) = _sites("nan_guard").sites
    assert s.details.nan_guard
    (s,) = _sites("merged_heads_baddbmm_alibi").sites
    assert s.details.split_heads == hw.H  # [B*H, S, D] operands, scores viewed as [B, H, S, S]
    (s,) = _sites("gqa_repeat_kv").sites
    assert s.details.kv_repeat == 2


def test_fused_sites_carry_fused_details():
    (s,) = _sites("sdpa_causal").sites
    assert type(s.details) is FusedDetails and s.details.flavor == "torch_sdpa"
    assert family_of(s.details).name == "fused"
    assert isinstance(plan(_sites("sdpa_causal").graph, s), Recipe)
    nodes = [h.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=2)]
    vi = [h.make_tensor_value_info(n, T.FLOAT, [1, 6, 16]) for n in ("q", "k", "v")]
    m = h.make_model(h.make_graph(nodes, "g", vi, [h.make_tensor_value_info("y", T.FLOAT, [1, 6, 16])]),
                     opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    r = attnopt.inspect(m)
    (s,) = r.sites
    assert type(s.details) is FusedDetails and s.details.flavor == "ms_mha"
    assert plan(r.graph, s) == "fused:ms_mha sites are kept as they are (already fused)"


def test_the_registry_covers_every_family_and_details_type():
    names = [f.name for f in FAMILIES]
    assert sorted(names) == ["decomposed", "fused"] and len(set(names)) == len(names)
    types = {f.details_type for f in FAMILIES}
    assert len(types) == len(FAMILIES)
    defined = {c for c in vars(details_mod).values()
               if isinstance(c, type) and issubclass(c, Details) and c is not Details}
    assert defined == types, "every details type in patterns/details.py belongs to one family"
    for f in FAMILIES:
        assert issubclass(f.details_type, PatternDetails)
        assert callable(f.anchors) and callable(f.match) and callable(f.recipe)
        assert dataclasses.is_dataclass(f.details_type) and f.details_type.__dataclass_params__.frozen
    with pytest.raises(LookupError):
        family_of(PatternDetails())
    assert Site("s", _sites("sdpa_plain").sites[0].spec, "o").details == PatternDetails()


def test_softcap_round_trips_as_a_typed_value():
    report = _sites("softcap")
    (s,) = report.sites
    (mod,) = s.spec.score_mods
    assert isinstance(mod, Softcap) and mod.cap == 30.0
    assert mod == "softcap:30.0" and str(mod) == "softcap:30.0"  # rendered as reports always did
    assert json.loads(json.dumps(s.to_json()))["score_mods"] == ["softcap:30.0"]
    assert plan(report.graph, s).softcap == 30.0  # read from the typed field, never parsed
    assert softcap_of(s.spec.score_mods) == 30.0
    back = pickle.loads(pickle.dumps(mod))
    assert type(back) is Softcap and back.cap == 30.0
    assert ScoreMod.from_text(str(mod)) == mod and type(ScoreMod.from_text(str(mod))) is Softcap
    with pytest.raises(AttributeError):
        mod.cap = 1.0


def test_bias_modifiers_are_typed():
    (s,) = _sites("alibi_causal").sites
    assert s.spec.score_mods == ("alibi",) and isinstance(s.spec.score_mods[0], Alibi)
    (s,) = _sites("relative_position_table").sites
    assert s.spec.score_mods == ("bias",) and isinstance(s.spec.score_mods[0], Bias)
    assert ",".join(s.spec.score_mods) == "bias"
    for m in (Bias(), Alibi(), Softcap(2.5)):
        assert ScoreMod.from_text(str(m)) == m and type(ScoreMod.from_text(str(m))) is type(m)
    with pytest.raises(ValueError):
        ScoreMod.from_text("unknown")
