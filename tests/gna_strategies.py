"""Hypothesis strategy for random small GNA layouts, shared by the GNA and simulator tests."""
from __future__ import annotations

from hypothesis import strategies as st

from attnopt.ir import GNALayout


@st.composite
def layouts(draw, min_dims=1, max_dims=3, max_tokens=200, max_1d=24):
    """Layouts of up to ~max_tokens tokens with random windows, strides, dilations and causal
    flags (every combination valid: w*d <= L, 1 <= s <= w)."""
    ndim = draw(st.integers(min_dims, max_dims))
    shape, window, stride, dil, causal = [], [], [], [], []
    budget = max_tokens
    for k in range(ndim):
        hi = max(2, min(max_1d if ndim == 1 else 12, budget // (2 ** (ndim - k - 1))))
        L = draw(st.integers(2, hi))
        d = draw(st.integers(1, max(1, L // 2)))
        w = draw(st.integers(2, max(2, L // d)))
        s = draw(st.integers(1, w))
        shape.append(L); window.append(w); stride.append(s); dil.append(d)
        causal.append(draw(st.booleans()))
        budget = max(2, budget // L)
    return GNALayout(tuple(shape), tuple(window), tuple(stride), tuple(dil), tuple(causal))
