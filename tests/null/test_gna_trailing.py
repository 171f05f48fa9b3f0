"""GNA layouts with global tokens on both sides of the grid: [leading][grid, row-major][trailing]
(a ViT's CLS before the image; SD3 / HunyuanVideo text tokens after it).

Every kernel against a dense masked reference whose mask is built here, from the grid's GNA mask
(sparsity/gna.py) plus global rows and columns: grid queries see their GNA keys and every global
key (under a causal layout only keys j <= i: no trailing key); global queries see every key (causal:
j <= i). Paths: the exact helpers (gna_exact), the GNA op on CPU (the CPU tile kernel through the
kernel table), the CPU tile kernel in both its forms, and the generated Triton kernel under the
interpreter (TRITON_INTERPRET=1, fp32: bf16 tl.dot is garbage there). Then the simulator's counts
and a plan JSON carrying `trailing`.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from attnopt.codegen import gna_exact, select
from attnopt.codegen.cpu import tiles as cpu
from attnopt.codegen.gna_op import gna_attention_op
from attnopt.codegen.params import AttentionParams
from attnopt.codegen.reference import reference_attention
from attnopt.ir import GNALayout
from attnopt.sparsity import gna
from attnopt.sparsity.simulator import simulate

# (id, layout, leading, trailing): odd sizes, 1-D / 2-D / 3-D, stride, dilation, causal
LAYOUTS = [
    ("1d_trail", GNALayout((29,), (7,)), 0, 5),
    ("1d_both", GNALayout((23,), (6,), (3,)), 2, 3),
    ("1d_causal_both", GNALayout((21,), (5,), (1,), (1,), (True,)), 2, 3),
    ("2d_trail", GNALayout((7, 9), (3, 4), (1, 2)), 0, 7),
    ("2d_both_dilated", GNALayout((9, 10), (4, 5), (1, 1), (2, 1)), 1, 17),
    ("2d_lead_only", GNALayout((5, 7), (3, 3)), 3, 0),
    ("3d_both", GNALayout((3, 5, 6), (3, 3, 4), (1, 2, 1)), 2, 4),
    ("3d_causal_time_both", GNALayout((4, 5, 5), (2, 3, 3), (1, 1, 1), (1, 1, 1), (True, False, False)), 1, 3),
]
IDS = [c[0] for c in LAYOUTS]


def expected_mask(layout: GNALayout, leading: int, trailing: int) -> torch.Tensor:
    """Bool [S, S] from the semantics (not from gna_exact.full_mask)."""
    n = math.prod(layout.shape)
    S = leading + n + trailing
    grid = gna.dense_mask(layout)
    causal = any(layout.causal)
    m = np.zeros((S, S), dtype=bool)
    for i in range(S):
        for j in range(S):
            gi, gj = i - leading, j - leading
            q_global = not 0 <= gi < n
            k_global = not 0 <= gj < n
            if q_global or k_global:
                m[i, j] = j <= i if causal else True
            else:
                m[i, j] = grid[gi, gj]
    return torch.from_numpy(m)


def _qkv(H, Hkv, S, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, h, S, D, generator=g).to(dtype) for h in (H, Hkv, Hkv))


def _ref(q, k, v, mask, allowed, scale):
    m = allowed if mask is None else (mask & allowed if mask.dtype == torch.bool
                                      else torch.where(allowed, mask, float("-inf")))
    return reference_attention(q.float(), k.float(), v.float(), m, scale=scale)


def _close(out, ref, tol=2e-5):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), err


@pytest.mark.parametrize("name,layout,leading,trailing", LAYOUTS, ids=IDS)
def test_full_mask_matches_semantics(name, layout, leading, trailing):
    assert torch.equal(gna_exact.full_mask(layout, leading, trailing), expected_mask(layout, leading, trailing))


@pytest.mark.parametrize("mask_kind", [None, "bool", "bias"])
@pytest.mark.parametrize("name,layout,leading,trailing", LAYOUTS, ids=IDS)
def test_cpu_paths_exact(name, layout, leading, trailing, mask_kind):
    """The op (kernel table on CPU), the CPU tile kernel (compiled C and SDPA per tile group), the
    exact SDPA path and the dense reference helper, against the mask built from the semantics;
    GQA 2:1."""
    S = leading + math.prod(layout.shape) + trailing
    q, k, v = _qkv(4, 2, S, 16, seed=len(name))
    mask = None
    if mask_kind == "bool":
        mask = torch.ones(2, 1, 1, S, dtype=torch.bool)
        mask[1, ..., -1] = False   # a trailing key (or the last grid key)
        mask[1, ..., 0] = False    # a leading key (or the first grid key)
    elif mask_kind == "bias":
        mask = torch.randn(2, 1, S, S, generator=torch.Generator().manual_seed(1))
    allowed = expected_mask(layout, leading, trailing)
    ref = _ref(q, k, v, mask, allowed, 0.3)
    p = AttentionParams(scale=0.3)
    _close(gna_attention_op(q, k, v, mask, scale=0.3, layout=layout, leading=leading, trailing=trailing), ref)
    for native in (False, True):
        _close(cpu.gna_attention(q, k, v, layout, p, mask, leading=leading, trailing=trailing, native=native), ref)
    _close(gna_exact.sdpa_gna(q, k, v, mask, 0.3, layout, leading, trailing), ref)
    _close(gna_exact.reference_gna(q, k, v, mask, 0.3, layout, leading, trailing=trailing), ref)


def test_cpu_plan_keeps_globals_out_of_grid_tiles():
    """Trailing keys end every KV box (none under a causal layout); no tile holds a global query."""
    layout = GNALayout((6, 7), (3, 3))
    plan = cpu.gna_plan(layout, (4, 4), 2, 5)
    q = plan.q_idx.numpy()
    assert q.min() >= 2 and q.max() < 2 + 42
    kv = plan.kv_idx.numpy()
    assert (kv[:, :2] == np.arange(2)).all() and (kv[:, -5:] == np.arange(44, 49)).all()
    assert plan.mask[:, :, -5:].all()
    causal = GNALayout((6, 7), (3, 3), (1, 1), (1, 1), (True, False))
    assert cpu.gna_plan(causal, (4, 4), 2, 5).kv_idx.max().item() < 44


def test_op_per_head_split_and_schema_default():
    """Heads outside `heads` run the exact counterpart with the same global tokens; calls without
    `trailing` (old programs) mean trailing=0."""
    layout = GNALayout((5, 6), (3, 3))
    S = 1 + 30 + 4
    q, k, v = _qkv(4, 2, S, 8, seed=5)
    out = gna_attention_op(q, k, v, None, scale=0.4, layout=layout, leading=1, trailing=4, heads=(0, 1))
    sparse = expected_mask(layout, 1, 4)
    _close(out[:, :2], _ref(q[:, :2], k[:, :1], v[:, :1], None, sparse, 0.4))
    _close(out[:, 2:], _ref(q[:, 2:], k[:, 1:], v[:, 1:], None, torch.ones(S, S, dtype=torch.bool), 0.4))
    schema = str(torch.ops.attnopt.gna_attention.default._schema)
    assert schema.endswith("int[] heads=[], int trailing=0) -> Tensor"), schema
    S0 = 1 + 30
    q0, k0, v0 = _qkv(2, 2, S0, 8, seed=6)
    old = torch.ops.attnopt.gna_attention(q0, k0, v0, None, 0.4, [5, 6], [3, 3], [1, 1], [1, 1], [False, False],
                                          1, "softmax", [])
    _close(old, _ref(q0, k0, v0, None, expected_mask(layout, 1, 0), 0.4))
    with pytest.raises(ValueError, match="trailing"):
        gna_attention_op(q0, k0, v0, None, scale=0.4, layout=layout, leading=1, trailing=2)


def test_non_softmax_reference_path():
    """Sigmoid goes to backend "reference" with the layout's full mask, trailing tokens included."""
    layout = GNALayout((11,), (3,))
    S = 11 + 3
    q, k, v = _qkv(2, 2, S, 8, seed=2)
    out = gna_attention_op(q, k, v, None, scale=0.5, layout=layout, trailing=3, normalizer="sigmoid")
    ref = reference_attention(q, k, v, expected_mask(layout, 0, 3), scale=0.5, normalizer="sigmoid")
    _close(out, ref)


# ---- Triton, under the interpreter -----------------------------------------------------------

@pytest.fixture
def interpreter(tmp_path_factory, monkeypatch):
    pytest.importorskip("attnopt.codegen.triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "attnopt-cache"))


@pytest.mark.parametrize("name,layout,leading,trailing", LAYOUTS, ids=IDS)
def test_triton_kernel_exact(interpreter, name, layout, leading, trailing):
    """The generated kernel writes the grid rows (trailing keys one extra block per Q tile); the
    Triton row of the kernel table fills the global rows. fp32, GQA 2:1, head dim 24."""
    S = leading + math.prod(layout.shape) + trailing
    q, k, v = _qkv(4, 2, S, 24, seed=len(name) + 1)
    p = AttentionParams(scale=24 ** -0.5)
    out = select.launch_triton(q, k, v, None, p, layout, leading, trailing)
    _close(out, _ref(q, k, v, None, expected_mask(layout, leading, trailing), p.scale))
    ok, why = select.can_run_triton(q, k, v, None, p, None, leading, trailing)
    if trailing:  # without a grid only the GNA kernel could take global tokens: every row refuses
        assert not ok and ("leading" if leading else "trailing") in why


@pytest.mark.parametrize("mask_kind", ["bool", "bias"])
def test_triton_op_forced_with_masks(interpreter, monkeypatch, mask_kind):
    """attnopt::gna_attention's accelerator path (ATTNOPT_FORCE_TRITON=1) with both ends, a user
    mask that hides a trailing key, and a per-head split."""
    from attnopt.codegen.triton import launcher

    monkeypatch.setenv("ATTNOPT_FORCE_TRITON", "1")
    calls = []
    real = launcher.gna_call
    monkeypatch.setattr(launcher, "gna_call", lambda *a, **kw: calls.append(a[-1]) or real(*a, **kw))
    layout = GNALayout((9, 7), (5, 3), (2, 1))
    S = 2 + 63 + 19
    q, k, v = _qkv(2, 2, S, 16, seed=3)
    if mask_kind == "bool":
        m = torch.ones(2, 1, 1, S, dtype=torch.bool)
        m[1, ..., -3:] = False
        m[0, ..., 1] = False
    else:
        m = torch.randn(2, 1, S, S, generator=torch.Generator().manual_seed(4))
    out = gna_attention_op(q, k, v, m, scale=0.3, layout=layout, leading=2, trailing=19)
    _close(out, _ref(q, k, v, m, expected_mask(layout, 2, 19), 0.3))
    assert calls and calls[-1] == 19
    out = gna_attention_op(q, k, v, m, scale=0.3, layout=layout, leading=2, trailing=19, heads=(1,))
    _close(out[:, 1:], _ref(q[:, 1:], k[:, 1:], v[:, 1:], m, expected_mask(layout, 2, 19), 0.3))
    _close(out[:, :1], _ref(q[:, :1], k[:, :1], v[:, :1], m, torch.ones(S, S, dtype=torch.bool), 0.3))


# ---- simulator, cost model ---------------------------------------------------------------------

def test_simulator_counts_globals():
    layout = GNALayout((16, 16), (5, 5))
    base = simulate(layout, (8, 8), (8, 8))
    r = simulate(layout, (8, 8), (8, 8), leading=1, trailing=77)
    tk = tq = 64
    g_k = 1 + math.ceil(77 / tk)                        # one leading block, two trailing blocks
    g_q = 1 + math.ceil(77 / tq)
    assert r.full_kv_tiles == base.full_kv_tiles + g_k
    assert r.max_kv_tiles == base.max_kv_tiles + g_k
    assert r.num_q_tiles == base.num_q_tiles + g_q and r.global_q_tiles == g_q
    assert r.total_kv_tiles == base.total_kv_tiles + base.num_q_tiles * g_k + g_q * r.full_kv_tiles
    assert r.masked_tiles == base.masked_tiles
    S, n = 1 + 256 + 77, 256
    pairs = int(expected_mask(layout, 1, 77).sum())
    assert r.density == pytest.approx(pairs / S ** 2)
    assert r.flop_speedup == pytest.approx(S * S / (n * 25 + n * 78 + 78 * S))
    assert r.to_json()["trailing"] == 77 and "trailing" not in base.to_json()
    # causal: grid queries visit no trailing block
    c = GNALayout((64,), (9,), (1,), (1,), (True,))
    rc, bc = simulate(c, (16,), (16,), trailing=20), simulate(c, (16,), (16,))
    assert rc.max_kv_tiles == bc.max_kv_tiles
    assert rc.density == pytest.approx(int(expected_mask(c, 0, 20).sum()) / 84 ** 2)
    # runs of the flattened grid
    rr = simulate(layout, (32,), (32,), trailing=40)
    assert rr.max_kv_tiles == simulate(layout, (32,), (32,)).max_kv_tiles + 2


def test_cost_model_prices_trailing():
    from attnopt.cost.variants import _cost, candidate_from_json, candidate_to_json, _make, describe_layout
    from attnopt.cost.hardware import get_profile as profile
    from attnopt.ir import AttentionSpec, Variant

    layout = GNALayout((32, 32), (9, 9))
    S = 1024 + 77
    spec = AttentionSpec(normalizer="softmax", batch=1, num_heads=8, num_kv_heads=8, q_len=S, kv_len=S,
                         head_dim=64, v_head_dim=64, scale=0.125, dtype="bfloat16")
    v = Variant(family="block_sparse_gna", q_tile=(8, 8), kv_tile=(8, 8), layout=layout, exact=False)
    hw = profile("h100")
    t0 = _cost(spec, v, hw, 0)[0]
    t1 = _cost(spec, v, hw, 0, 77)[0]
    t2 = _cost(spec, v, hw, 1, 77)[0]
    assert t0 < t1 < t2
    c = _make("approx:gna(x)", spec, v, hw, 1.0, leading=1, trailing=77)
    assert c.trailing == 77 and candidate_from_json(candidate_to_json(c)) == c
    assert "trailing" in describe_layout(layout, 1, 77)


# ---- plan JSON ---------------------------------------------------------------------------------

TOKENS = 33  # 1 leading + a 28-token grid + 4 trailing


@pytest.fixture(scope="module")
def small():
    """(model, example, exported program, exact plan JSON) of the planner's two-site test model."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from zoo.small import Net

    from attnopt.planner.search import make_plan

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(1, TOKENS, 32)
    ep = torch.export.export(model, (x,))
    return model, x, ep, make_plan(ep, policy="exact", target="cpu").to_json()


def _with_trailing(exact: dict, leading=1, trailing=4) -> dict:
    d = copy.deepcopy(exact)
    d["policy"], d["max_error"] = "approx", 1.0
    n = TOKENS - leading - trailing
    d["sites"][0]["choice"].update(
        name=f"approx:gna(grid {n} window 8 stride 1 +{leading} global +{trailing} trailing global)",
        family="block_sparse_gna", exact=False, q_tile=[16], kv_tile=[16], leading=leading, trailing=trailing,
        layout={"shape": [n], "window": [8], "stride": [1], "dilation": [1], "causal": [False]})
    return d


def _masked_forward(model, x, allowed):
    """The model with block 0's attention restricted to `allowed` (the plan's meaning)."""
    h = x
    for i, a in enumerate(model.blocks):
        B, S, D = h.shape
        q, k, v = a.qkv(h).view(B, S, 3, a.h, D // a.h).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) * (D // a.h) ** -0.5
        if i == 0:
            s = s.masked_fill(~allowed, float("-inf"))
        h = h + a.o((s.softmax(-1) @ v).transpose(1, 2).reshape(B, S, D))
    return h


def test_plan_json_trailing_validated_and_applied(small):
    import attnopt
    from attnopt.errors import BadArgument
    from attnopt.planner.plan import Plan

    model, x, ep, exact = small
    d = _with_trailing(exact)
    plan = Plan.coerce(d) if hasattr(Plan, "coerce") else Plan.from_json(d)
    assert plan.sites[0].choice.trailing == 4 and plan.sites[0].choice.leading == 1
    assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()
    assert plan.to_json()["sites"][0]["choice"]["trailing"] == 4
    for bad_value in (-1, 1.5, "4", True):
        b = copy.deepcopy(d)
        b["sites"][0]["choice"]["trailing"] = bad_value
        with pytest.raises(BadArgument, match="sites\\[0\\].choice.trailing"):
            attnopt.optimize(ep, plan=b)
    b = copy.deepcopy(exact)
    b["sites"][1]["choice"]["trailing"] = 3  # no layout
    with pytest.raises(BadArgument, match="trailing"):
        attnopt.optimize(ep, plan=b)
    b = copy.deepcopy(d)
    b["sites"][0]["choice"]["trailing"] = 5
    with pytest.raises(BadArgument, match="5 trailing"):  # 1 + 28 + 5 tokens do not fit 33
        attnopt.optimize(ep, plan=b)
    res = attnopt.optimize(ep, plan=d)
    assert res.sites[0].status == "rewritten" and "trailing" in res.sites[0].variant
    gm = res.model.module() if hasattr(res.model, "module") else res.model
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.attnopt.gna_attention.default]
    assert len(calls) == 1 and calls[0].args[-1] == 4
    with torch.no_grad():
        out = gm(x)
        ref = _masked_forward(model, x, expected_mask(GNALayout((28,), (8,)), 1, 4))
        dense = model(x)
    assert (out - ref).abs().max().item() < 1e-4
    assert (out - dense).abs().max().item() > 1e-3  # the layout did change something
