"""attnopt.attention with global segments around a GNA grid: [leading][grid][trailing] (the
user-given layout of joint text+image attention), exact against the dense masked reference on
every backend, and clear errors when the segments do not add up."""
from __future__ import annotations

import math

import pytest
import torch

import attnopt
from attnopt.codegen import gna_exact
from attnopt.ir import GNALayout

CASES = [((5, 6), 3, 3, 5), ((4, 4, 3), (3, 3, 2), 0, 7), ((9,), 4, 2, 0), ((3, 5), 3, 0, 1)]


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference", "triton"])
@pytest.mark.parametrize("grid,window,leading,trailing", CASES)
def test_segments_exact(grid, window, leading, trailing, backend):
    n = leading + math.prod(grid) + trailing
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g) * 2 for _ in range(3))
    win = (window,) * len(grid) if isinstance(window, int) else window
    allowed = gna_exact.full_mask(GNALayout(tuple(grid), win), leading, trailing)
    ref = ((q @ k.transpose(-1, -2)) * 8 ** -0.5).masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    out = attnopt.attention(q, k, v, grid=grid, window=window, leading=leading, trailing=trailing,
                            backend=backend)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_segments_that_do_not_add_up():
    q = torch.randn(1, 1, 11, 8)
    with pytest.raises(ValueError, match="3 leading \\+ 9 grid \\(9\\) \\+ 0 trailing = 12"):
        attnopt.attention(q, q, q, grid=(9,), window=4, leading=3)
    with pytest.raises(ValueError, match="non-negative int"):
        attnopt.attention(q, q, q, grid=(9,), window=4, leading=-1, trailing=3)
    with pytest.raises(ValueError, match="frame a token grid"):
        attnopt.attention(q, q, q, trailing=2)
