"""The custom op `torch.ops.attnopt.gna_attention`: attention restricted to a GNA layout over the
token grid, with a few leading tokens (class token, attention sinks) that stay global.

Canonical layouts (BHSD), as attnopt::attention:
  q [B, H, S, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], S = leading + prod(shape);
  attn_mask broadcastable to [B, H, S, S] (bool: True = attend; float: added), out [B, H, S, Dv].
  Grid tokens are flattened row-major after the leading ones.

Schema:
  attnopt::gna_attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, int[] shape,
                         int[] window, int[] stride, int[] dilation, bool[] causal, int leading,
                         str normalizer, int[] heads=[]) -> Tensor

Per-head choices: `heads` lists the query heads that run the layout (empty: every head); the
others run exact attention (dense, or causal when the layout is causal: a full-window 1-D causal
layout with leading sinks is plain causal attention). With grouped KV heads a selection holds
whole groups (the planner makes them so), so the selected query heads read only their own KV
heads.

Which pairs attend (on top of attn_mask):
  * a leading query attends every key (if the layout is causal: every key j <= i);
  * a grid query attends every leading key, and the grid keys its GNA layout allows
    (DESIGN.md, "GNA: the sparsity family").

Implementations:
  fake  shape [B, H, S, Dv] in q.dtype
  CPU   softmax: codegen.cpu.gna_attention (tiled SDPA over Q boxes, each tile's KV box extended
        by the leading keys; the box is tuned per shape). Other normalizers: the dense reference
        with the layout's full mask.
        ATTNOPT_FORCE_TRITON=1 runs the CUDA path below under the Triton interpreter (CI).
  CUDA  the generated block-sparse GNA Triton kernel when it fits (codegen.triton.can_run; leading
        keys are one extra block per Q tile, leading query rows dense SDPA); else SDPA with the
        layout as a bool mask (exact, dense work).
  other devices: the dense reference with the layout's full mask (exact, not faster)
No autograd formula: backward through the op raises (torch's "no autograd formula was registered")
rather than return a wrong gradient; attnopt.attention is the differentiable entry point.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from attnopt.codegen.ops import AttentionParams
from attnopt.codegen.reference import reference_attention
from attnopt.sparsity import gna
from attnopt.ir import GNALayout

OP_NAME = "attnopt::gna_attention"
SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, int[] shape, int[] window, "
    "int[] stride, int[] dilation, bool[] causal, int leading, str normalizer, int[] heads=[]) -> Tensor"
)


def make_layout(shape, window, stride, dilation, causal) -> GNALayout:
    return GNALayout(tuple(int(x) for x in shape), tuple(int(x) for x in window),
                     tuple(int(x) for x in stride), tuple(int(x) for x in dilation),
                     tuple(bool(x) for x in causal))


@functools.lru_cache(maxsize=32)
def full_mask(layout: GNALayout, leading: int) -> Tensor:
    """Bool [S, S] (True = attend) of the layout with its leading global tokens."""
    n = int(np.prod(layout.shape))
    s = leading + n
    m = np.zeros((s, s), dtype=bool)
    m[leading:, leading:] = gna.dense_mask(layout, max_tokens=max(n, gna.DENSE_MASK_MAX_TOKENS))
    m[:, :leading] = True
    if any(layout.causal):
        m[:leading, :] = np.tril(np.ones((leading, s), dtype=bool))
    else:
        m[:leading, :] = True
    return torch.from_numpy(m)


def _and_mask(attn_mask: Tensor | None, allowed: Tensor) -> Tensor:
    if attn_mask is None:
        return allowed
    if attn_mask.dtype == torch.bool:
        return attn_mask & allowed
    return torch.where(allowed, attn_mask, float("-inf"))


def reference_gna(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float,
                  layout: GNALayout, leading: int, normalizer: str = "softmax", heads=()) -> Tensor:
    """Dense reference: the layout as a full mask (any device, any normalizer); with `heads`,
    only those heads get the layout (the others: the same mask minus the layout)."""
    allowed = full_mask(layout, leading).to(q.device)
    if not _every_head(heads, q.shape[1]):
        full = full_mask(_full_window(layout), leading).to(q.device)
        per_head = full.repeat(q.shape[1], 1, 1)
        per_head[sorted(set(int(h) for h in heads))] = allowed
        allowed = per_head
    return reference_attention(q, k, v, _and_mask(attn_mask, allowed), scale=scale,
                               normalizer=normalizer)


def _full_window(layout: GNALayout) -> GNALayout:
    """The layout's exact counterpart: every grid key (causal ones: every earlier key)."""
    n = len(layout.shape)
    return GNALayout(layout.shape, layout.shape, (1,) * n, (1,) * n, layout.causal)


def cpu_gna(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float,
            layout: GNALayout, leading: int) -> Tensor:
    """Exact softmax GNA with leading global tokens on CPU (codegen.cpu, tile choice tuned)."""
    from attnopt.codegen.cpu.tiles import gna_attention

    S, n = q.shape[2], int(np.prod(layout.shape))
    if S != leading + n or k.shape[2] != S:
        raise ValueError(f"gna_attention: sequence {S}/{k.shape[2]} != leading {leading} + grid {n}")
    return gna_attention(q, k, v, layout, AttentionParams(scale=float(scale)), attn_mask, leading=leading)


def leading_rows(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
                 leading: int, causal: bool) -> Tensor:
    """Rows [:leading] of the op: leading (global) queries attend every key; under a causal
    layout every key j <= i. Any device; the kernels fill the grid rows."""
    S = k.shape[2]
    m = torch.ones(leading, S, dtype=torch.bool, device=q.device).tril() if causal else None
    if attn_mask is not None:
        rows = attn_mask.expand(*attn_mask.shape[:-2], q.shape[2], S)[..., :leading, :]
        m = rows if m is None else _and_mask(rows, m)
    ql = q[:, :, :leading]
    if params.normalizer == "softmax" and params.softcap is None:
        return F.scaled_dot_product_attention(ql, k, v, attn_mask=_sdpa_mask(m, q.dtype), scale=params.scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    return reference_attention(ql, k, v, m, scale=params.scale, softcap=params.softcap,
                               normalizer=params.normalizer)


def _sdpa_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None or mask.dtype == torch.bool or mask.dtype == dtype:
        return mask
    return mask.to(dtype)


def _exact_rest(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float,
                layout: GNALayout, leading: int) -> Tensor:
    """The site's exact attention for heads that keep it: the layout's full-window counterpart,
    as in reference_gna. For a 1-D causal layout that is plain causal attention, run with
    is_causal when there is no other mask (an explicit S x S mask made the exact heads of a 4K
    Llama site 1.6x slower than the whole site had been)."""
    gqa = q.shape[1] != k.shape[1]
    if not any(layout.causal):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_sdpa_mask(attn_mask, q.dtype),
                                              scale=float(scale), enable_gqa=gqa)
    if len(layout.shape) == 1 and attn_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=float(scale), enable_gqa=gqa)
    allowed = full_mask(_full_window(layout), leading).to(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_sdpa_mask(_and_mask(attn_mask, allowed), q.dtype),
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


def _every_head(heads, num_heads: int) -> bool:
    """`heads` selects every head (empty means all)."""
    return not heads or len(set(heads)) == num_heads


def _dispatch(q, k, v, attn_mask, scale, layout: GNALayout, leading: int, heads, run_layout) -> Tensor:
    if _every_head(heads, q.shape[1]):
        return run_layout(q, k, v, attn_mask).contiguous()
    return split_heads(q, k, v, attn_mask, heads, run_layout,
                       lambda q_, k_, v_, m_: _exact_rest(q_, k_, v_, m_, scale, layout, leading))


@torch.library.custom_op(OP_NAME, mutates_args=(), schema=SCHEMA)
def gna_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float,
                  shape: list[int], window: list[int], stride: list[int], dilation: list[int],
                  causal: list[bool], leading: int, normalizer: str, heads: list[int] = ()) -> Tensor:
    """Default (devices without their own kernel): the exact dense reference."""
    layout = make_layout(shape, window, stride, dilation, causal)
    return reference_gna(q, k, v, attn_mask, scale, layout, int(leading), normalizer, heads).contiguous()


@gna_attention.register_fake
def _gna_fake(q, k, v, attn_mask, scale, shape, window, stride, dilation, causal, leading, normalizer,
              heads=()):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k, v must be 4-D [B, H, S, D]")
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


def _kernel_ok(q, k, v, attn_mask, normalizer) -> bool:
    return (normalizer == "softmax" and q.is_floating_point() and q.dtype == k.dtype == v.dtype
            and q.shape[1] % k.shape[1] == 0
            and (attn_mask is None or attn_mask.dtype == torch.bool or attn_mask.is_floating_point()))


def triton_or_sdpa_gna(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float,
                       layout: GNALayout, leading: int) -> Tensor:
    """Softmax GNA on an accelerator: the generated block-sparse Triton kernel when it fits (its
    tiles cover the grid, plus one block of the leading keys per Q tile; the leading queries' own
    rows are dense SDPA rows), else SDPA with the layout as a bool mask (exact, dense work)."""
    from attnopt.codegen.ops import _ensure_triton_kernels

    _ensure_triton_kernels()
    try:
        from attnopt.codegen import triton as tk
    except ImportError:  # pragma: no cover - no triton: the SDPA path serves
        tk = None
    if tk is not None:
        p = AttentionParams(scale=float(scale))
        ok, why = tk.can_run(q, k, v, attn_mask, p, layout, leading)
        out = tk.launch(q, k, v, attn_mask, p, layout, leading) if ok else None
        if out is not None:
            if leading:
                out[:, :, :leading] = leading_rows(q, k, v, attn_mask, p, leading, any(layout.causal))
            return out
        tk.log_fallback_once(f"gna_attention: {why or 'no kernel config fits'}")
    allowed = full_mask(layout, leading).to(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_sdpa_mask(_and_mask(attn_mask, allowed), q.dtype),
                                          scale=float(scale), enable_gqa=q.shape[1] != k.shape[1])


@gna_attention.register_kernel("cpu")
def _gna_cpu(q, k, v, attn_mask, scale, shape, window, stride, dilation, causal, leading, normalizer,
             heads=()):
    from attnopt.codegen.ops import FORCE_TRITON_ENV

    layout = make_layout(shape, window, stride, dilation, causal)
    if not _kernel_ok(q, k, v, attn_mask, normalizer):
        return reference_gna(q, k, v, attn_mask, scale, layout, int(leading), normalizer, heads).contiguous()
    if os.environ.get(FORCE_TRITON_ENV, "0") == "1":
        run = lambda q_, k_, v_, m_: triton_or_sdpa_gna(q_, k_, v_, m_, scale, layout, int(leading))  # noqa: E731
    else:
        run = lambda q_, k_, v_, m_: cpu_gna(q_, k_, v_, m_, scale, layout, int(leading))  # noqa: E731
    return _dispatch(q, k, v, attn_mask, scale, layout, int(leading), heads, run)


@gna_attention.register_kernel("cuda")
def _gna_cuda(q, k, v, attn_mask, scale, shape, window, stride, dilation, causal, leading, normalizer,
              heads=()):
    layout = make_layout(shape, window, stride, dilation, causal)
    if not _kernel_ok(q, k, v, attn_mask, normalizer):
        return reference_gna(q, k, v, attn_mask, scale, layout, int(leading), normalizer, heads).contiguous()
    return _dispatch(q, k, v, attn_mask, scale, layout, int(leading), heads,
                     lambda q_, k_, v_, m_: triton_or_sdpa_gna(q_, k_, v_, m_, scale, layout, int(leading)))


def gna_attention_op(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, *, scale: float,
                     layout: GNALayout, leading: int = 0, normalizer: str = "softmax",
                     heads=()) -> Tensor:
    """Call torch.ops.attnopt.gna_attention with a GNALayout."""
    return torch.ops.attnopt.gna_attention(
        q, k, v, attn_mask, float(scale), list(layout.shape), list(layout.window),
        list(layout.stride), list(layout.dilation), [bool(c) for c in layout.causal], int(leading),
        normalizer, [int(h) for h in heads])
