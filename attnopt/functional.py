"""Functional attention API: one call for dense, causal, windowed and GNA (grid) attention.

Canonical layouts: q [B, H, S, D], k/v [B, H_kv, S_kv, D/Dv] (H % H_kv == 0: GQA/MQA),
mask / bias broadcastable to [B, H, S, S_kv], out [B, H, S, Dv] in q.dtype.

  attention(q, k, v, *, mask=None, bias=None, causal=False, scale=None, softcap=None,
            normalizer="softmax", grid=None, window=None, stride=None, dilation=None,
            backend="auto", leading=0, trailing=0)

With `grid` (e.g. (64, 64); tokens flattened row-major into S) window / stride / dilation / causal
(an int or bool for every dimension, or one per dimension) define a GNA layout (docs/ARCHITECTURE.md,
"GNA semantics"); without a grid, `window=(left, right)` is a 1-D sliding window (None on a side =
unbounded) and `causal` masks keys after the query (top-left aligned unless
causal_alignment="bottom_right").
With a grid, the sequence may hold global tokens around it: [leading][grid][trailing] (CLS or
joint text tokens before the image, SD3 / HunyuanVideo's text after it): grid queries attend to
their neighborhood and every global token, global queries to every token; the counts must add up.
`mask` is bool (True = attend) or float (added); `bias` is float and added; both may be given.

backend: "auto" (Triton on CUDA when a generated kernel fits, the exact CPU sparse kernels on CPU,
else the exact dense path), "triton" (error if no kernel fits, with the reasons), "cpu" (the exact
CPU kernels; dense SDPA where nothing is sparse), "reference" (dense float32 math with the full
mask materialised: the ground truth). Which kernel runs is the kernel table's choice
(attnopt/codegen/select.py, caller "functional"): its rows, in order, and the rules above.

Gradients (q, k, v, and a float mask / bias) are exact on every path that returns a tensor needing
them: the CPU tile kernels (the compiled forward with its compiled backward, cpu/native_backward.py,
or SDPA per tile group where that cannot take the call, e.g. a learned bias; each query's row from one
tile), SDPA and the reference. The Triton forward kernels here are forward only: "auto" leaves them
out when a gradient is needed, and "triton" raises instead of returning a result cut off from the
graph (the custom ops' backward runs the Triton backward kernels: codegen/autograd.py).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from attnopt.codegen import select
from attnopt.codegen.params import AttentionParams, TokenLayout
from attnopt.ir.vocab import NORMALIZERS
from attnopt.ir import GNALayout

BACKENDS = select.BACKENDS
IntOrTuple = int | Sequence[int] | None


def _per_dim(value, n: int, name: str, default):
    if value is None:
        return (default,) * n
    if isinstance(value, (bool, int)):
        return (type(default)(value),) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} needs one entry per grid dimension ({n}), got {value}")
    return tuple(type(default)(x) for x in value)


def gna_layout(grid: Sequence[int], window, stride=None, dilation=None, causal=False) -> GNALayout:
    """The GNALayout of a token grid; ints/bools apply to every dimension."""
    grid = tuple(int(x) for x in grid)
    n = len(grid)
    if window is None:
        raise ValueError("a grid needs a window (an int or one per dimension)")
    layout = GNALayout(
        shape=grid, window=_per_dim(window, n, "window", 0), stride=_per_dim(stride, n, "stride", 1),
        dilation=_per_dim(dilation, n, "dilation", 1), causal=_per_dim(causal, n, "causal", False),
    )
    from attnopt.sparsity import gna

    gna.validate(layout)
    return layout


def _combine_masks(mask: Tensor | None, bias: Tensor | None) -> Tensor | None:
    if bias is not None and not bias.is_floating_point():
        raise TypeError(f"bias must be floating point, got {bias.dtype}")
    if mask is None:
        return bias
    if bias is None:
        return mask
    if mask.dtype == torch.bool:
        return torch.where(mask, bias, torch.tensor(float("-inf"), dtype=bias.dtype, device=bias.device))
    return mask + bias


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool | Sequence[bool] = False,
    scale: float | None = None,
    softcap: float | None = None,
    normalizer: str = "softmax",
    grid: Sequence[int] | None = None,
    window: IntOrTuple | tuple[int | None, int | None] = None,
    stride: IntOrTuple = None,
    dilation: IntOrTuple = None,
    backend: str = "auto",
    causal_alignment: str = "top_left",
    leading: int = 0,
    trailing: int = 0,
) -> Tensor:
    """Attention of q [B, H, S, D] over k/v [B, H_kv, S_kv, D]; see the module docstring."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    attn_mask = _combine_masks(mask, bias)

    layout = None
    if grid is not None:
        layout = gna_layout(grid, window, stride, dilation, causal)
        _check_segments(q, k, layout, leading, trailing)
        params = AttentionParams(scale=scale, softcap=softcap, normalizer=normalizer)
    else:
        if leading or trailing:
            raise ValueError("leading / trailing global tokens frame a token grid: give grid=...")
        if stride is not None or dilation is not None:
            raise ValueError("stride and dilation need a token grid (grid=...)")
        if not isinstance(causal, bool):
            raise ValueError("per-dimension causal flags need a token grid (grid=...)")
        win = None
        if window is not None:
            if isinstance(window, int) or len(tuple(window)) != 2:
                raise ValueError("without a grid, window is (left, right); use None for an unbounded side")
            left, right = window
            win = (None if left is None else int(left), None if right is None else int(right))
        params = AttentionParams(scale=scale, causal=causal, causal_alignment=causal_alignment,
                                 window=win, softcap=softcap, normalizer=normalizer)

    # the generated kernels write a plain tensor: no autograd graph behind it
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, attn_mask))
    request = select.Request(caller="functional", backend=backend, needs_grad=needs_grad)
    token_layout = None if layout is None else TokenLayout(layout, leading=int(leading), trailing=int(trailing))
    return select.dispatch(q, k, v, attn_mask, params, token_layout, request)


def _check_segments(q: Tensor, k: Tensor, layout: GNALayout, leading: int, trailing: int) -> None:
    """The sequence must be exactly [leading globals][the grid][trailing globals]."""
    for name, n in (("leading", leading), ("trailing", trailing)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    cells = math.prod(layout.shape)
    for name, t in (("q", q), ("k", k)):
        if t.shape[2] != leading + cells + trailing:
            raise ValueError(
                f"{name} has {t.shape[2]} tokens but the layout holds {leading} leading + "
                f"{cells} grid ({'x'.join(map(str, layout.shape))}) + {trailing} trailing = "
                f"{leading + cells + trailing}")
