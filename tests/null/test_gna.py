"""GNA mask semantics vs an independent per-pair transcription of DESIGN.md."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from gna_strategies import layouts
from hypothesis import HealthCheck, given, settings

from attnopt.sparsity import gna
from attnopt.ir import GNALayout

# Deterministic for CI, without touching the global hypothesis profile of other test files.
CI = settings(derandomize=True, deadline=None, max_examples=150, database=None,
              suppress_health_check=[HealthCheck.too_slow])


def ref_dim_allows(i: int, j: int, L: int, w: int, s: int, d: int, causal: bool) -> bool:
    """Written from the DESIGN.md text, one pair at a time, no shared code with gna.py."""
    if i % d != j % d:
        return False
    g = i % d
    Lg = len(range(g, L, d))
    i, j, L = i // d, j // d, Lg
    if causal:
        leader = min((i // s) * s + (s - 1), L - 1)
        return j <= i and leader - j < w
    left = w // 2
    right = w // 2 + (w % 2 - 1)
    leader = min((i // s) * s + s // 2, L - 1)
    centre = max(left, min(leader, L - 1 - right))
    return centre - left <= j <= centre + right


def ref_dense(layout: GNALayout) -> np.ndarray:
    coords = list(itertools.product(*[range(L) for L in layout.shape]))
    n = len(coords)
    m = np.zeros((n, n), dtype=bool)
    for a, q in enumerate(coords):
        for b, k in enumerate(coords):
            m[a, b] = all(ref_dim_allows(q[x], k[x], layout.shape[x], layout.window[x],
                                         layout.stride[x], layout.dilation[x], layout.causal[x])
                          for x in range(len(coords[0])))
    return m


@CI
@given(layouts(max_tokens=120))
def test_dense_mask_matches_per_pair_reference(layout):
    np.testing.assert_array_equal(gna.dense_mask(layout), ref_dense(layout))


_CASES_1D = [(L, w, s, d) for L, w, s in [(10, 4, 1), (10, 4, 3), (11, 5, 2), (9, 2, 2),
                                            (7, 6, 4), (13, 8, 5), (16, 16, 16), (12, 3, 3)]
             for d in (1, 2) if w * d <= L]


@pytest.mark.parametrize("L,w,s,d", _CASES_1D)
@pytest.mark.parametrize("causal", [False, True])
def test_1d_even_windows_borders_and_nondividing_strides(L, w, s, d, causal):
    lay = GNALayout((L,), (w,), (s,), (d,), (causal,))
    np.testing.assert_array_equal(gna.dense_mask(lay), ref_dense(lay))


def test_non_causal_every_query_sees_exactly_w_keys():
    lay = GNALayout((37, 23), (8, 5), (3, 4), (2, 3))
    np.testing.assert_array_equal(gna.keys_per_query(lay), np.full(37 * 23, 40))
    np.testing.assert_array_equal(gna.dense_mask(lay).sum(1), 40)
    assert gna.density(lay) == pytest.approx(40 / (37 * 23))


def test_even_window_has_extra_key_on_the_left():
    start, end = gna.key_ranges(GNALayout((20,), (4,)))[0]
    assert (start[10], end[10]) == (8, 12)  # keys 8..11: two left, one right


def test_key_ranges_with_dilation_are_strided_in_group():
    lay = GNALayout((10,), (3,), (1,), (3,))  # groups: {0,3,6,9} {1,4,7} {2,5,8}
    start, end = gna.key_ranges(lay)[0]
    assert list(range(start[1], end[1], 3)) == [1, 4, 7]
    assert list(range(start[9], end[9], 3)) == [3, 6, 9]


def test_permuted_ranges_are_monotone_and_agree_with_mask():
    lay = GNALayout((11, 9), (3, 4), (2, 3), (3, 2), (True, False))
    m = gna.dense_mask(lay)
    perms = [gna.dilation_permutation(L, d) for L, d in zip(lay.shape, lay.dilation)]
    flat = (perms[0][:, None] * 9 + perms[1][None, :]).reshape(-1)
    mp = m[np.ix_(flat, flat)]
    (s0, e0), (s1, e1) = gna.permuted_key_ranges(lay)
    for s, e in ((s0, e0), (s1, e1)):
        assert (np.diff(s) >= 0).all() and (np.diff(e) >= 0).all()
    exp = np.zeros_like(mp)
    for a in range(11):
        for b in range(9):
            row = np.zeros((11, 9), bool)
            row[s0[a]:e0[a], s1[b]:e1[b]] = True
            exp[a * 9 + b] = row.reshape(-1)
    np.testing.assert_array_equal(mp, exp)


@pytest.mark.parametrize("kw,msg", [
    (dict(shape=(10,), window=(1,)), "window must be >= 2"),
    (dict(shape=(10,), window=(4,), stride=(5,)), "stride"),
    (dict(shape=(10,), window=(4,), stride=(0,)), "stride"),
    (dict(shape=(10,), window=(4,), dilation=(3,)), "exceeds length"),
    (dict(shape=(10,), window=(11,)), "exceeds length"),
    (dict(shape=(2, 2, 2, 2), window=(2, 2, 2, 2)), "1-D, 2-D or 3-D"),
])
def test_validation_messages(kw, msg):
    with pytest.raises(ValueError, match=msg):
        gna.validate(GNALayout(**kw))


def test_dense_mask_refuses_huge_grids():
    with pytest.raises(ValueError, match="max_tokens"):
        gna.dense_mask(GNALayout((256, 256), (80, 80)))
