"""Exact CPU sparse kernels (attnopt.codegen.cpu.tiles) vs the dense masked reference at real sizes.

Layouts: q [B, H, N, D], k/v [B, Hkv, N, D]; GNA tokens are the row-major flattened grid.
"""
from __future__ import annotations

import pytest
import torch

from attnopt.codegen.cpu import tiles as cpu
from attnopt.codegen.params import AttentionParams
from attnopt.codegen.reference import reference_attention
from attnopt.sparsity.gna import dense_mask
from attnopt.sparsity.simulator import simulate
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
    ok, why = cpu.can_run_window(q, k, v, None, AttentionParams(scale=1.0, causal=True))
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


@pytest.mark.parametrize("causal", [False, True])
def test_gna_cpu_leading_tokens(causal):
    """Leading global tokens ([CLS], sinks): tiles' KV boxes start with every leading key; leading
    rows attend every key (causal: every earlier key). Against the op's dense reference, with a
    float bias, GQA, and a non-softmax normalizer."""
    from attnopt.codegen.gna_exact import reference_gna

    layout = GNALayout((12, 10), (5, 3), (2, 1), (1, 2), (causal, False))
    S = 3 + 120
    q, k, v = _qkv(2, 4, 2, S, S, 16, seed=5)
    bias = torch.randn(2, 1, S, S)
    pad = torch.ones(2, 1, 1, S, dtype=torch.bool)
    pad[1, ..., -7:] = False
    for mask in (None, bias, pad):
        for normalizer in ("softmax", "sigmoid"):
            p = AttentionParams(scale=0.3, normalizer=normalizer)
            ref = reference_gna(q, k, v, mask, 0.3, layout, 3, normalizer)
            for q_tile in (None, (4, 4), (8, 8)):
                out = cpu.gna_attention(q, k, v, layout, p, mask, q_tile=q_tile, leading=3)
                assert (out - ref).abs().max().item() < 1e-5, (mask is None, normalizer, q_tile)


def test_gna_cpu_tile_is_tuned_once_and_remembered(tmp_path, monkeypatch):
    """Without q_tile the kernel times its best-estimated Q boxes once per shape, keeps the fastest
    in memory and on disk, and a second process reads it from disk without timing anything."""
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu, "TUNE_MIN_ELEMS", 0)
    monkeypatch.setattr(cpu, "_TUNED", {})
    layout = GNALayout((24, 24), (9, 9))
    q, k, v = _qkv(1, 2, 2, 576, 576, 16, seed=6)
    p = AttentionParams(scale=0.25)
    ref = reference_attention(q, k, v, torch.from_numpy(dense_mask(layout)), **p.kwargs())
    timed = []
    real = cpu._bench_seconds
    monkeypatch.setattr(cpu, "_bench_seconds", lambda fn: timed.append(1) or real(fn))
    out = cpu.gna_attention(q, k, v, layout, p)
    assert (out - ref).abs().max().item() < 1e-5
    cands = cpu.tile_candidates(layout)[:cpu.TUNE_TOP]
    assert len(timed) == len(cands) > 1
    files = list((tmp_path / "cpu").glob("tune-*.json"))
    assert len(files) == 1
    chosen = cpu.tuned_gna_tile(layout, 0, q, k, v, None, p)
    assert chosen in cands and len(timed) == len(cands)  # memory: not timed again
    monkeypatch.setattr(cpu, "_TUNED", {})
    monkeypatch.setattr(cpu, "_bench_seconds", lambda fn: pytest.fail("re-tuned"))
    assert cpu.tuned_gna_tile(layout, 0, q, k, v, None, p) == chosen  # disk
    # another shape is another choice; ATTNOPT_AUTOTUNE=0 takes the estimate without timing
    monkeypatch.setenv("ATTNOPT_AUTOTUNE", "0")
    assert cpu.tuned_gna_tile(layout, 0, q[:, :1], k[:, :1], v[:, :1], None, p) == cands[0]


def test_fastest_skips_failing_and_stale_choices(tmp_path, monkeypatch):
    from attnopt.codegen import autotune

    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    memo = {}

    def bench(c):
        if c == "broken":
            raise RuntimeError("cannot run here")
        return {"a": 2.0, "b": 1.0}[c]

    kw = dict(subdir="x", encode=str, decode=str)
    assert autotune.fastest({"k": 1}, ["broken", "a", "b"], bench, memo=memo, **kw) == "b"
    # a remembered choice that is no longer offered is re-measured
    assert autotune.fastest({"k": 1}, ["a"], bench, memo={}, **kw) == "a"
    with pytest.raises(RuntimeError, match="no candidate ran"):
        autotune.fastest({"k": 2}, ["broken"], bench, memo={}, **kw)
    (tmp_path / "x" / f"tune-{autotune.key_hash({'k': 3})}.json").write_text("{not json")
    assert autotune.fastest({"k": 3}, ["a", "b"], bench, memo={}, **kw) == "b"


def test_tile_candidates_clip_to_the_grid():
    cands = cpu.tile_candidates(GNALayout((4, 40), (3, 9)))
    assert len(cands) == len(set(cands)) and all(t[0] <= 4 for t in cands)


def test_sliding_window_reads_kv_in_place():
    """1-D windows: every tile's keys are one contiguous range, so K/V are strided views of the
    caller's tensors (no gather), in runs of arithmetic-progression starts; batch 2, GQA 4:2,
    transposed (non-contiguous) k/v and a float bias all still match the reference."""
    plan = cpu.window_plan(1000, 1000, 100, 0, 0, 64)
    runs = plan.all_tiles.kv_runs
    assert runs is not None and 1 < len(runs) <= 4 and sum(r.n for r, _, _ in runs) == plan.num_tiles
    assert cpu.gna_plan(GNALayout((32, 32), (8, 8)), (8, 8)).all_tiles.kv_runs is None  # 2-D boxes
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 4, 333, 16, generator=g)
    k, v = (torch.randn(2, 333, 2, 16, generator=g).transpose(1, 2) for _ in range(2))
    bias = torch.randn(2, 1, 333, 333, generator=g)
    for kw in (dict(window=(40, 0), causal=True), dict(window=(17, 23))):
        p = AttentionParams(scale=0.25, **kw)
        for mask in (None, bias):
            ref = reference_attention(q, k, v, mask, **p.kwargs())
            for tq in (16, 64):
                out = cpu.sliding_window_attention(q, k, v, p, mask, q_tile=tq)
                assert (out - ref).abs().max().item() < 1e-5, (kw, mask is None, tq)


@pytest.mark.parametrize("q_tile", [(8, 8), (12, 8), (5, 7)])
def test_gna_cpu_boxes_relaid_out_once(q_tile):
    """2-D boxes: K/V are gathered once per distinct column range (over all rows) and each tile
    reads its box as a contiguous range of that (runs of strided views); tile sizes that do not
    divide the grid shift the last tiles back (non-monotone starts: separate runs)."""
    layout = GNALayout((30, 26), (9, 7), (1, 2))
    plan = cpu.gna_plan(layout, q_tile)
    relayout, runs = plan.all_tiles.box_runs
    assert sum(r.n for r, _, _ in runs) == plan.num_tiles and all(step >= 0 for _, _, step in runs)
    assert relayout.numel() < plan.kv_idx.numel()
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 4, 780, 16, generator=g)
    k, v = (torch.randn(2, 780, 2, 16, generator=g).transpose(1, 2) for _ in range(2))
    p = AttentionParams(scale=0.25)
    ref = reference_attention(q, k, v, torch.from_numpy(dense_mask(layout)), **p.kwargs())
    assert (cpu.gna_attention(q, k, v, layout, p, q_tile=q_tile) - ref).abs().max().item() < 1e-5
