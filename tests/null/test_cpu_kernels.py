"""Exact CPU sparse kernels (attnopt.codegen.cpu) vs the dense masked reference at real sizes.

Layouts: q [B, H, N, D], k/v [B, Hkv, N, D]; GNA tokens are the row-major flattened grid.
"""
from __future__ import annotations

import pytest
import torch

from attnopt.codegen import cpu
from attnopt.codegen.ops import AttentionParams
from attnopt.codegen.reference import reference_attention
from attnopt.cost.gna import dense_mask
from attnopt.cost.simulator import simulate
from attnopt.functional import attention
from attnopt.ir import GNALayout


def _qkv(B, H, Hkv, Sq, Skv, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Sq, D, generator=g).to(dtype), torch.randn(B, Hkv, Skv, D, generator=g).to(dtype),
            torch.randn(B, Hkv, Skv, D, generator=g).to(dtype))


LAYOUTS = {
    "32x32_w8": GNALayout((32, 32), (8, 8)),
    "32x32_w8_s8_blocked": GNALayout((32, 32), (8, 8), (8, 8)),
    "32x32_w7_s3_unaligned": GNALayout((32, 32), (7, 7), (3, 3)),
    "32x32_w5x9_dil2x3": GNALayout((32, 32), (5, 9), (1, 2), (2, 3)),
    "32x32_causal": GNALayout((32, 32), (6, 6), (2, 1), (1, 1), (True, True)),
    "8x8x8_w4": GNALayout((8, 8, 8), (4, 4, 4)),
    "8x8x8_mixed": GNALayout((8, 8, 8), (3, 4, 5), (1, 2, 5), (2, 1, 1), (True, False, False)),
    "1d_1000": GNALayout((1000,), (65,), (16,), (2,)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_gna_cpu_matches_dense_reference(name):
    layout = LAYOUTS[name]
    n = int(torch.tensor(layout.shape).prod())
    q, k, v = _qkv(1, 4, 2, n, n, 32)
    p = AttentionParams(scale=32 ** -0.5)
    ref = reference_attention(q, k, v, torch.from_numpy(dense_mask(layout)), **p.kwargs())
    out = cpu.gna_attention(q, k, v, layout, p)
    assert (out - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("q_tile", [(8, 8), (16, 8), (4, 4), (8, 16)])
def test_gna_cpu_any_tile(q_tile):
    layout = GNALayout((24, 20), (7, 5), (2, 5), (1, 2))
    q, k, v = _qkv(2, 2, 2, 480, 480, 16, seed=1)
    p = AttentionParams(scale=0.25)
    ref = reference_attention(q, k, v, torch.from_numpy(dense_mask(layout)), **p.kwargs())
    assert (cpu.gna_attention(q, k, v, layout, p, q_tile=q_tile) - ref).abs().max().item() < 1e-5


def test_gna_cpu_masks_softcap_sigmoid_fp16():
    layout = GNALayout((16, 16), (5, 5), (1, 1))
    q, k, v = _qkv(2, 2, 1, 256, 256, 16, seed=2)
    pad = (torch.arange(256)[None, :] < torch.tensor([200, 256])[:, None])[:, None, None, :]
    bias = torch.randn(1, 2, 256, 256)
    allowed = torch.from_numpy(dense_mask(layout))
    for mask, dense in ((pad, allowed & pad), (bias, torch.where(allowed, bias, float("-inf")))):
        for kw in (dict(), dict(softcap=3.0), dict(normalizer="sigmoid")):
            p = AttentionParams(scale=0.25, **kw)
            ref = reference_attention(q, k, v, dense, **p.kwargs())
            assert (cpu.gna_attention(q, k, v, layout, p, mask) - ref).abs().max().item() < 1e-5
    p = AttentionParams(scale=0.25)
    h = [t.half() for t in (q, k, v)]
    ref = reference_attention(*h, allowed, **p.kwargs())
    assert (cpu.gna_attention(*h, layout, p).float() - ref.float()).abs().max().item() < 2e-3


@pytest.mark.parametrize("kw", [dict(window=(64, 64)), dict(window=(100, None), causal=True),
                                dict(window=(31, 7), causal=True, causal_alignment="bottom_right"),
                                dict(window=(0, 50))])
@pytest.mark.parametrize("lens", [(1000, 1000), (333, 1000), (1000, 333)])
def test_sliding_window_cpu(kw, lens):
    q, k, v = _qkv(1, 4, 1, lens[0], lens[1], 32, seed=3)
    p = AttentionParams(scale=0.2, **kw)
    ref = reference_attention(q, k, v, None, **p.kwargs())
    assert (cpu.sliding_window_attention(q, k, v, p) - ref).abs().max().item() < 1e-5


def test_unbounded_band_declined():
    q, k, v = _qkv(1, 1, 1, 64, 64, 16)
    ok, why = cpu.can_run_cpu_sliding_window(AttentionParams(scale=1.0, causal=True), q, k, v, None)
    assert not ok and "unbounded" in why


def test_tile_plan_work_equals_simulator_bound():
    """The kernel's per-tile KV box is the simulator's worst Q tile for dynamic 1-token KV tiles."""
    layout = GNALayout((64, 64), (16, 16), (1, 1))
    for q_tile in ((8, 8), (16, 8)):
        plan = cpu.gna_plan(layout, q_tile)
        sim = simulate(layout, q_tile, (1, 1), dynamic=True)
        assert plan.kv_idx.shape[1] == sim.max_kv_tiles
    blocked = cpu.gna_plan(GNALayout((64, 64), (16, 16), (16, 16)), (16, 16))
    assert bool(blocked.full.all())  # perfectly block-sparse: no mask at all


def test_functional_cpu_backends_agree():
    q, k, v = _qkv(1, 2, 2, 1024, 1024, 16, seed=4)
    for kw in (dict(grid=(32, 32), window=9, stride=(1, 3), dilation=(1, 2)), dict(window=(40, 40)),
               dict(grid=(8, 8, 16), window=(3, 4, 5), causal=(True, False, False))):
        ref = attention(q, k, v, backend="reference", **kw)
        for backend in ("auto", "cpu"):
            assert (attention(q, k, v, backend=backend, **kw) - ref).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="grid"):
        attention(q, k, v, stride=2)
