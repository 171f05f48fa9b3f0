"""GNA token layouts as exact math: the layout as a bool mask (with leading / trailing global
tokens), the dense reference, the global tokens' rows, and per-head splits. Shared by the GNA op, the CPU tile
kernels, the Triton GNA row of the kernel table and attnopt.attention; it sits below all of them
(it imports no kernel), so none of them imports another for these helpers.

Canonical layouts (BHSD, see params.py):
  q [B, H, S, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], S = leading + prod(grid.shape) + trailing:
  the leading tokens first, then the grid's tokens flattened row-major, then the trailing tokens;
  attn_mask broadcastable to [B, H, S, S] (bool: True = attend; float: added), out [B, H, S, Dv]
  in q.dtype.

Which pairs attend (on top of attn_mask):
  * a global (leading or trailing) query attends every key (if the layout is causal: every key
    j <= i);
  * a grid query attends every global key (if the layout is causal: every leading key, no
    trailing one), and the grid keys its GNA layout allows (docs/ARCHITECTURE.md, "GNA
    semantics").
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from attnopt.codegen.params import AttentionParams
from attnopt.codegen.reference import reference_attention
from attnopt.ir import GNALayout
from attnopt.sparsity import gna


@functools.lru_cache(maxsize=32)
def full_mask(layout: GNALayout, leading: int, trailing: int = 0) -> Tensor:
    """Bool [S, S] (True = attend) of the layout with its leading and trailing global tokens."""
    n = int(np.prod(layout.shape))
    s = leading + n + trailing
    end = leading + n
    m = np.zeros((s, s), dtype=bool)
    m[leading:end, leading:end] = gna.dense_mask(layout, max_tokens=max(n, gna.DENSE_MASK_MAX_TOKENS))
    m[:, :leading] = True
    m[:, end:] = True
    m[:leading, :] = True
    m[end:, :] = True
    if any(layout.causal):  # global rows and columns: key j <= query i (the grid block as GNA says)
        tri = np.tril(np.ones((s, s), dtype=bool))
        m[:leading] &= tri[:leading]
        m[end:] &= tri[end:]
        m[:, end:] &= tri[:, end:]
    return torch.from_numpy(m)


def and_mask(attn_mask: Tensor | None, allowed: Tensor) -> Tensor:
    """attn_mask restricted to the `allowed` pairs (bool: AND; float: -inf where not allowed)."""
    if attn_mask is None:
        return allowed
    if attn_mask.dtype == torch.bool:
        return attn_mask & allowed
    return torch.where(allowed, attn_mask, float("-inf"))


def full_window(layout: GNALayout) -> GNALayout:
    """The layout's exact counterpart: every grid key (causal ones: every earlier key)."""
    n = len(layout.shape)
    return GNALayout(layout.shape, layout.shape, (1,) * n, (1,) * n, layout.causal)


def every_head(heads, num_heads: int) -> bool:
    """`heads` selects every head (empty means all)."""
    return not heads or len(set(heads)) == num_heads


def layout_mask(layout: GNALayout, leading: int, heads, num_heads: int, device, trailing: int = 0) -> Tensor:
    """Bool [S, S] of the layout (or [H, S, S] when only `heads` run it: the others get the
    layout's full-window counterpart)."""
    allowed = full_mask(layout, leading, trailing).to(device)
    if not every_head(heads, num_heads):
        full = full_mask(full_window(layout), leading, trailing).to(device)
        per_head = full.repeat(num_heads, 1, 1)
        per_head[sorted(set(int(h) for h in heads))] = allowed
        allowed = per_head
    return allowed


def reference_gna(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float,
                  layout: GNALayout, leading: int, normalizer: str = "softmax", heads=(),
                  trailing: int = 0) -> Tensor:
    """Dense reference: the layout as a full mask (any device, any normalizer); with `heads`,
    only those heads get the layout (the others: the same mask minus the layout)."""
    allowed = layout_mask(layout, leading, heads, q.shape[1], q.device, trailing)
    return reference_attention(q, k, v, and_mask(attn_mask, allowed), scale=scale, normalizer=normalizer)


def sdpa_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The mask as SDPA takes it: bool as is, float cast to q's dtype."""
    if mask is None or mask.dtype == torch.bool or mask.dtype == dtype:
        return mask
    return mask.to(dtype)


def leading_rows(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
                 leading: int, causal: bool) -> Tensor:
    """Rows [:leading] of the op: leading (global) queries attend every key; under a causal
    layout every key j <= i. Any device; the kernels fill the grid rows."""
    return global_rows(q, k, v, attn_mask, params, 0, leading, causal)


def fill_global_rows(out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None,
                     params: AttentionParams, leading: int, trailing: int, causal: bool) -> Tensor:
    """out with its global rows (the first `leading`, the last `trailing`) written; the kernels
    write the grid rows."""
    S = q.shape[2]
    if leading:
        out[:, :, :leading] = global_rows(q, k, v, attn_mask, params, 0, leading, causal)
    if trailing:
        out[:, :, S - trailing:] = global_rows(q, k, v, attn_mask, params, S - trailing, S, causal)
    return out


def global_rows(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
                start: int, stop: int, causal: bool) -> Tensor:
    """Rows [start:stop] of the op, global queries: they attend every key; under a causal layout
    every key j <= i. Any device."""
    S = k.shape[2]
    m = None
    if causal:
        m = torch.ones(stop - start, S, dtype=torch.bool, device=q.device).tril(diagonal=start)
    if attn_mask is not None:
        rows = attn_mask.expand(*attn_mask.shape[:-2], q.shape[2], S)[..., start:stop, :]
        m = rows if m is None else and_mask(rows, m)
    ql = q[:, :, start:stop]
    if params.normalizer == "softmax" and params.softcap is None:
        return F.scaled_dot_product_attention(ql, k, v, attn_mask=sdpa_mask(m, q.dtype), scale=params.scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    return reference_attention(ql, k, v, m, scale=params.scale, softcap=params.softcap,
                               normalizer=params.normalizer)


def sdpa_gna(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float,
             layout: GNALayout, leading: int, trailing: int = 0) -> Tensor:
    """Softmax GNA as SDPA with the layout (global tokens included) as a bool mask: exact, dense
    work. The GNA op's path when no Triton kernel takes the call."""
    allowed = full_mask(layout, leading, trailing).to(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(and_mask(attn_mask, allowed), q.dtype),
                                          scale=float(scale), enable_gqa=q.shape[1] != k.shape[1])


def exact_rest(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float,
               layout: GNALayout, leading: int, trailing: int = 0) -> Tensor:
    """The site's exact attention for heads that keep it: the layout's full-window counterpart,
    as in reference_gna. For a 1-D causal layout that is plain causal attention, run with
    is_causal when there is no other mask (an explicit S x S mask made the exact heads of a 4K
    Llama site 1.6x slower than the whole site had been)."""
    gqa = q.shape[1] != k.shape[1]
    if not any(layout.causal):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(attn_mask, q.dtype),
                                              scale=float(scale), enable_gqa=gqa)
    if len(layout.shape) == 1 and attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=float(scale), enable_gqa=gqa)
    allowed = full_mask(full_window(layout), leading, trailing).to(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask(and_mask(attn_mask, allowed), q.dtype),
                                          scale=float(scale), enable_gqa=gqa)


def split_heads(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, heads, run_layout,
                run_exact) -> Tensor:
    """out[:, heads] = run_layout(...those heads...), out[:, others] = run_exact(...): each
    receives q/k/v (and a per-head mask) restricted to its heads and their KV groups."""
    H, Hkv = q.shape[1], k.shape[1]
    group = H // Hkv
    sel = sorted({int(h) for h in heads})
    if any(not 0 <= h < H for h in sel):
        raise ValueError(f"gna_attention: heads {sel} out of range for {H} heads")
    kv_sel = sorted({h // group for h in sel})
    if len(sel) != len(kv_sel) * group:
        raise ValueError(f"gna_attention: heads {sel} split a group of {group} query heads per KV head")
    rest = sorted(set(range(H)) - set(sel))
    kv_rest = sorted(set(range(Hkv)) - set(kv_sel))
    out = q.new_empty((q.shape[0], H, q.shape[2], v.shape[3]))
    for qh, kh, fn in ((sel, kv_sel, run_layout), (rest, kv_rest, run_exact)):
        if not qh:
            continue
        m = attn_mask
        if m is not None and m.dim() == 4 and m.shape[1] == H and H > 1:
            m = m[:, qh]
        out[:, qh] = fn(q[:, qh], k[:, kh], v[:, kh], m)
    return out
