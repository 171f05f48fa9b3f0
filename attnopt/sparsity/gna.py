"""GNA (Generalized Neighborhood Attention) mask semantics, exactly as docs/ARCHITECTURE.md
("GNA semantics") states them.

Conventions:
  * A layout is an `attnopt.ir.GNALayout` over a 1-/2-/3-D grid `shape = (L0, L1, ...)`.
  * Tokens are flattened row-major (last grid dimension fastest); `dense_mask` is bool [N, N]
    indexed [query, key] over that flattening, N = prod(shape).
  * Key ranges are half-open `(start, end)` per dimension and per query coordinate; with
    dilation d the keys of a query are `range(start, end, d)` (they stay in the query's group).
  * "Permuted" coordinates (`dilation_permutation`) put each dilation group contiguously,
    group 0 first, as NATTEN does; the tile simulator tiles that order, because only there is
    the key set of a query contiguous.
The mask is a product over dimensions: a pair attends iff every dimension allows it, so all
work here is per dimension (O(L)) and only `dense_mask` materialises N x N.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from attnopt.ir import GNALayout

# dense_mask refuses grids larger than this: the [N, N] bool matrix is for tests and the CPU
# reference, and 16k tokens already take 256 MiB.
DENSE_MASK_MAX_TOKENS = 16384


def validate(layout: GNALayout) -> None:
    """Raise ValueError naming the dimension and the broken rule (w>=2, 1<=s<=w, w*d<=L)."""
    if not 1 <= len(layout.shape) <= 3:
        raise ValueError(f"GNA layouts are 1-D, 2-D or 3-D; got shape {layout.shape}")
    for dim, (L, w, s, d) in enumerate(zip(layout.shape, layout.window, layout.stride,
                                             layout.dilation)):
        for name, v in (("shape", L), ("window", w), ("stride", s), ("dilation", d)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise ValueError(f"dim {dim}: {name} must be an int, got {v!r}")
        if L < 1:
            raise ValueError(f"dim {dim}: length must be >= 1, got {L}")
        if w < 2:
            raise ValueError(f"dim {dim}: window must be >= 2, got {w}")
        if d < 1:
            raise ValueError(f"dim {dim}: dilation must be >= 1, got {d}")
        if not 1 <= s <= w:
            raise ValueError(f"dim {dim}: stride must satisfy 1 <= stride <= window ({w}), got {s}")
        if w * d > L:
            raise ValueError(f"dim {dim}: window*dilation = {w}*{d} = {w * d} exceeds length {L}")


def window_1d(L: int, w: int, s: int, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Undilated per-query key range [start, end) for coordinates 0..L-1 of one dimension."""
    i = np.arange(L, dtype=np.int64)
    if causal:
        leader = np.minimum((i // s) * s + s - 1, L - 1)
        start = np.maximum(leader - w + 1, 0)
        end = i + 1
    else:
        left = w // 2
        right = w // 2 + (w % 2 - 1)
        leader = np.minimum((i // s) * s + s // 2, L - 1)
        centre = np.clip(leader, left, L - 1 - right)
        start = centre - left
        end = centre + right + 1
    return start, end


def group_sizes(L: int, d: int) -> np.ndarray:
    """Number of coordinates in each dilation group g (coord % d == g); they differ when d does
    not divide L, which is why each group runs its own GNA on its own length."""
    g = np.arange(d, dtype=np.int64)
    return (L - g + d - 1) // d


def dilation_permutation(L: int, d: int) -> np.ndarray:
    """perm[p] = original coordinate at permuted position p (groups contiguous, group 0 first)."""
    return np.concatenate([np.arange(g, L, d, dtype=np.int64) for g in range(d)])


def _dim_ranges(L: int, w: int, s: int, d: int, causal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per original coordinate: (start, end) with keys range(start, end, d)."""
    x = np.arange(L, dtype=np.int64)
    g, c = x % d, x // d
    start = np.empty(L, np.int64)
    end = np.empty(L, np.int64)
    for grp, Lg in enumerate(group_sizes(L, d)):
        ws, we = window_1d(int(Lg), w, s, causal)
        sel = g == grp
        start[sel] = grp + d * ws[c[sel]]
        end[sel] = grp + d * (we[c[sel]] - 1) + 1
    return start, end


def key_ranges(layout: GNALayout) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per dimension, per query coordinate: (start, end); the keys are range(start, end, dilation).

    Arrays have length L of that dimension. A flattened query's keys are the product over
    dimensions of its coordinates' ranges.
    """
    validate(layout)
    return [_dim_ranges(L, w, s, d, bool(c)) for L, w, s, d, c in
            zip(layout.shape, layout.window, layout.stride, layout.dilation, layout.causal)]


def permuted_key_ranges(layout: GNALayout) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per dimension, per *permuted* position (see `dilation_permutation`): contiguous key range
    [start, end) in permuted positions. Starts and ends are non-decreasing in the position."""
    validate(layout)
    out = []
    for L, w, s, d, c in zip(layout.shape, layout.window, layout.stride, layout.dilation,
                             layout.causal):
        starts, ends, off = [], [], 0
        for Lg in group_sizes(L, d):
            ws, we = window_1d(int(Lg), w, s, bool(c))
            starts.append(ws + off)
            ends.append(we + off)
            off += int(Lg)
        out.append((np.concatenate(starts), np.concatenate(ends)))
    return out


def dim_masks(layout: GNALayout) -> list[np.ndarray]:
    """Per dimension, the bool [L, L] mask (query coordinate, key coordinate)."""
    masks = []
    for (start, end), L, d in zip(key_ranges(layout), layout.shape, layout.dilation):
        j = np.arange(L, dtype=np.int64)[None, :]
        st, en = start[:, None], end[:, None]
        masks.append((j >= st) & (j < en) & ((j - st) % d == 0))
    return masks


def combine_dim_masks(masks: Sequence[np.ndarray]) -> np.ndarray:
    """AND per-dimension masks into the [N, N] mask of the row-major flattened grid."""
    full = np.ones((1, 1), dtype=bool)
    for m in masks:
        n, L = full.shape[0], m.shape[0]
        full = (full[:, None, :, None] & m[None, :, None, :]).reshape(n * L, n * L)
    return full


def dense_mask(layout: GNALayout, max_tokens: int = DENSE_MASK_MAX_TOKENS) -> np.ndarray:
    """Bool [N, N] mask over the row-major flattened grid: mask[q, k] is True iff q attends k."""
    n = int(np.prod(layout.shape))
    if n > max_tokens:
        raise ValueError(f"dense_mask: {n} tokens exceeds max_tokens={max_tokens}; "
                         "use key_ranges for large grids")
    return combine_dim_masks(dim_masks(layout))


def keys_per_query(layout: GNALayout) -> np.ndarray:
    """Per dimension summed key counts are separable; returns the [N] count per flattened query."""
    counts = np.ones(1, dtype=np.int64)
    for (start, end), d in zip(key_ranges(layout), layout.dilation):
        per = (end - start + d - 1) // d
        counts = (counts[:, None] * per[None, :]).reshape(-1)
    return counts


def density(layout: GNALayout) -> float:
    """Fraction of (query, key) pairs that attend (exact; causal layouts see fewer keys)."""
    dens = 1.0
    for (start, end), L, d in zip(key_ranges(layout), layout.shape, layout.dilation):
        dens *= float(((end - start + d - 1) // d).sum()) / (L * L)
    return dens
