"""Tile simulator vs brute force over the dense reference mask, plus the GNA paper's FLUX bounds."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from gna_strategies import layouts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnopt.sparsity import gna
from attnopt.sparsity.simulator import amdahl, run_boxes, simulate, tile_detail
from attnopt.ir import GNALayout

# Deterministic for CI, without touching the global hypothesis profile of other test files.
CI = settings(derandomize=True, deadline=None, max_examples=150, database=None,
              suppress_health_check=[HealthCheck.too_slow])


# ---- brute force ---------------------------------------------------------------------------

def permuted_mask(layout):
    """Dense mask reordered so each dilation group is contiguous per dimension (the simulator's
    documented token order), still row-major over the grid."""
    m = gna.dense_mask(layout)
    perms = [gna.dilation_permutation(L, d) for L, d in zip(layout.shape, layout.dilation)]
    idx = np.zeros(1, dtype=np.int64)
    for p, L in zip(perms, layout.shape):
        idx = (idx[:, None] * L + p[None, :]).reshape(-1)
    return m[np.ix_(idx, idx)]


def brute(layout, q_tile, kv_tile, dynamic):
    """Per Q tile (in the simulator's order): visited KV tiles and masked ones."""
    shape = layout.shape
    n = len(shape)
    N = int(np.prod(shape))
    mp = permuted_mask(layout)
    coords = np.stack(np.unravel_index(np.arange(N), shape), -1)  # [N, n]
    box = len(q_tile) == n
    if box:
        qt = coords // np.asarray(q_tile)
        nqt = [-(-L // t) for L, t in zip(shape, q_tile)]
        q_id = np.ravel_multi_index(qt.T, nqt)
        nq = int(np.prod(nqt))
    else:
        q_id = np.arange(N) // q_tile[0]
        nq = -(-N // q_tile[0])
    vis = np.zeros(nq, int)
    msk = np.zeros(nq, int)
    for q in range(nq):
        rows = mp[q_id == q]
        keys = rows.any(0)
        if box:
            if dynamic:
                start = coords[keys].min(0)
            else:
                start = np.zeros(n, int)
            kc = (coords - start) // np.asarray(kv_tile)
            ok = (coords >= start).all(1)
            nk = kc.max(0) + 1
            k_id = np.where(ok, np.ravel_multi_index(np.where(ok[:, None], kc, 0).T, nk), -1)
        else:
            start = np.argmax(keys) if dynamic else 0
            k_id = np.where(np.arange(N) >= start, (np.arange(N) - start) // kv_tile[0], -1)
        valid = k_id >= 0
        cnt = np.bincount(k_id[valid], weights=rows[:, valid].sum(0))
        size = np.bincount(k_id[valid]) * rows.shape[0]
        visited = cnt > 0
        vis[q] = visited.sum()
        msk[q] = (visited & (cnt < size)).sum()
    return vis, msk


@st.composite
def cases(draw, tiling):
    lay = draw(layouts(min_dims=1 if tiling == "box" else 2, max_dims=3, max_tokens=160, max_1d=30))
    shape = lay.shape
    if tiling == "box":
        qt = tuple(draw(st.integers(1, L + 1)) for L in shape)
        kt = tuple(draw(st.integers(1, L + 1)) for L in shape)
    else:
        N = int(np.prod(shape))
        qt = (draw(st.integers(1, N)),)
        kt = (draw(st.integers(1, N)),)
    return lay, qt, kt, draw(st.booleans())


def check_against_brute(lay, qt, kt, dyn):
    r = simulate(lay, qt, kt, dynamic=dyn)
    vis, msk = brute(lay, qt, kt, dyn)
    np.testing.assert_array_equal(r.kv_tiles_per_q.reshape(-1), vis)
    np.testing.assert_array_equal(r.masked_per_q.reshape(-1), msk)
    assert r.max_kv_tiles == vis.max() and r.total_kv_tiles == vis.sum()
    assert r.masked_tiles == msk.sum()
    assert r.fully_block_sparse == (msk.sum() == 0)
    return r


@settings(CI, max_examples=250)
@given(cases("box"))
def test_box_tiling_matches_brute_force(case):
    lay, qt, kt, dyn = case
    r = check_against_brute(lay, qt, kt, dyn)
    # the worst tile's detail lists exactly its visited tiles and their masks
    det = tile_detail(lay, qt, kt, r.worst_q_tile, dynamic=dyn)
    assert len(det.full) == r.max_kv_tiles
    worst_flat = np.ravel_multi_index(r.worst_q_tile, r.kv_tiles_per_q.shape)
    assert (~det.full).sum() == r.masked_per_q.reshape(-1)[worst_flat]


@settings(CI, max_examples=200)
@given(cases("run"))
def test_run_tiling_on_multi_d_grid_matches_brute_force(case):
    check_against_brute(*case)


def test_run_boxes_cover_runs_exactly():
    shape = (3, 5, 7)
    N = 105
    a = np.array([0, 3, 6, 34, 35, 50, 0])
    b = np.array([1, 40, 100, 36, 70, 51, 105])
    ids, lo, hi = run_boxes(a, b, shape)
    assert np.bincount(ids, minlength=len(a)).max() <= 5
    grid = np.arange(N).reshape(shape)
    for t in range(len(a)):
        got = sorted(int(x) for i in np.nonzero(ids == t)[0]
                     for x in grid[tuple(slice(l, h + 1) for l, h in zip(lo[i], hi[i]))].ravel())
        assert got == list(range(a[t], b[t]))


# ---- GNA paper, FLUX 4K ---------------------------------------------------------------------

@pytest.mark.parametrize("stride,bound,perfect", [((1, 1), 6.10, False), ((16, 1), 8.53, False),
                                                   ((16, 16), 10.24, True)])
def test_flux_4k_bounds_from_gna_paper(stride, bound, perfect):
    r = simulate(GNALayout((256, 256), (80, 80), stride), (16, 16), (16, 8))
    assert round(r.speedup_upper_bound, 2) == bound
    assert r.flop_speedup == pytest.approx(10.24)
    assert r.fully_block_sparse is perfect
    assert r.full_kv_tiles == 512


def test_flux_simulates_fast():
    lay = GNALayout((256, 256), (80, 80), (1, 1))
    simulate(lay, (16, 16), (16, 8))
    t = time.perf_counter()
    for _ in range(10):
        simulate(lay, (16, 16), (16, 8))
    assert (time.perf_counter() - t) / 10 < 0.1


def test_e2e_and_json():
    r = simulate(GNALayout((256, 256), (80, 80), (16, 16)), (16, 16), (16, 8), attn_share=0.5)
    assert r.e2e_speedup == pytest.approx(amdahl(10.24, 0.5))
    j = json.loads(json.dumps(r.to_json()))
    for k in ("speedup_upper_bound", "flop_speedup", "max_kv_tiles", "mean_kv_tiles",
              "total_kv_tiles", "masked_tiles", "fully_block_sparse", "e2e_speedup"):
        assert k in j
    with pytest.raises(ValueError, match="share"):
        amdahl(2.0, 1.5)


def test_mixed_tile_kinds_rejected():
    with pytest.raises(ValueError, match="both have"):
        simulate(GNALayout((16, 16), (4, 4)), (4, 4), (16,))
    with pytest.raises(ValueError, match="positive"):
        simulate(GNALayout((16,), (4,)), (0,), (4,))


# ---- search ----------------------------------------------------------------------------------

def test_search_agrees_with_simulate_and_pareto_is_nondominated():
    import itertools

    from attnopt.cost.search import search

    shape, w = (20, 24), (6, 8)
    tiles = (((4, 4), (8, 4)), ((4, 4), (4, 8)))
    res = search(shape, [w, (5, 6)], tiles=tiles, causal=(True, False))
    best = max(simulate(GNALayout(shape, w, (a, b), causal=(True, False)), qt, kt)
               .speedup_upper_bound
               for a in range(1, 7) for b in range(1, 9)
               for qt, kt in itertools.product(*tiles))
    assert res.best.speedup_upper_bound == pytest.approx(max(best, res.best.speedup_upper_bound))
    for p in res.pareto:
        r = simulate(GNALayout(shape, p.window, p.stride, causal=(True, False)), p.q_tile,
                     p.kv_tile)
        assert r.speedup_upper_bound == pytest.approx(p.speedup_upper_bound)
        assert r.fully_block_sparse == p.fully_block_sparse
        assert r.masked_tiles == p.masked_tiles
    for p, q in itertools.permutations(res.pareto, 2):
        assert not (q.speedup_upper_bound >= p.speedup_upper_bound and
                    np.prod(q.window) >= np.prod(p.window) and
                    np.prod(q.stride) <= np.prod(p.stride))


def test_search_flux_finds_paper_optimum_with_block_sparsity():
    from attnopt.cost.hardware import B200
    from attnopt.cost.search import search

    res = search((256, 256), (80, 80), hw=B200, require_block_sparse=True)
    assert res.best.fully_block_sparse and round(res.best.speedup_upper_bound, 2) == 10.24
    assert all(p.fully_block_sparse for p in res.pareto)
