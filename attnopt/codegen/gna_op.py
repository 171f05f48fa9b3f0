"""The custom op `torch.ops.attnopt.gna_attention`: attention restricted to a GNA layout over the
token grid, with a few leading tokens (class token, attention sinks) and trailing tokens (joint
text tokens after the image grid: SD3, HunyuanVideo) that stay global.

Canonical layouts (BHSD, as attnopt::attention):
  q [B, H, S, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], S = leading + prod(shape) + trailing;
  attn_mask broadcastable to [B, H, S, S] (bool: True = attend; float: added), out [B, H, S, Dv].
  Grid tokens are flattened row-major after the leading ones; the trailing ones come last.

Schema (saved .pt2 programs contain it: it only grows by arguments with defaults at the end, so
programs saved before `trailing` existed still load and mean the same):
  attnopt::gna_attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, int[] shape,
                         int[] window, int[] stride, int[] dilation, bool[] causal, int leading,
                         str normalizer, int[] heads=[], int trailing=0) -> Tensor

Per-head choices: `heads` lists the query heads that run the layout (empty: every head); the
others run exact attention (dense, or causal when the layout is causal: a full-window 1-D causal
layout with leading sinks is plain causal attention; gna_exact.exact_rest). With grouped KV heads a
selection holds whole groups (the planner makes them so), so the selected query heads read only
their own KV heads.

Which pairs attend (on top of attn_mask): gna_exact.py's header.

Implementations (the kernel table, select.py, as caller "gna_attention"):
  fake   shape [B, H, S, Dv] in q.dtype
  CPU / CUDA, softmax with one float dtype: per head group, the first kernel of the table: on CUDA
         the generated block-sparse GNA Triton kernel (leading and trailing keys are one extra
         block each per Q tile, global query rows dense SDPA), else SDPA with the layout as a bool mask (exact, dense
         work); on CPU the exact tile kernel (compiled C, or SDPA per tile group; the box is tuned
         per shape). ATTNOPT_FORCE_TRITON=1 runs the CUDA choice on CPU under the Triton interpreter.
         CPU calls without gradients reach the body straight from the op's AutogradCPU kernel
         (autograd.register_cpu_inference), past the custom op's own Python layers.
  anything else (other normalizers, dtypes, devices): backend "reference", the dense reference
         with the layout's full mask (exact, not faster).
Autograd (codegen/autograd.py): gradients of q, k, v and a float attn_mask; the backward is the op
attnopt::gna_attention_backward. On CUDA (or under ATTNOPT_FORCE_TRITON=1) the block-sparse Triton
backward (triton/gna_backward.py: dQ over the tile plan, dK/dV over the transposed plan); on CPU the
compiled tile backward (cpu/native_backward.py) after a recomputed forward; elsewhere, and for a
learned bias on CPU, exact recomputation per head group through the table's differentiable rows
(SDPA per tile group on CPU: O(tiles) scores, not S x S; SDPA with the layout mask; the reference).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from attnopt.codegen import autograd, select
from attnopt.codegen.gna_exact import every_head, exact_rest, split_heads
from attnopt.codegen.params import AttentionParams, TokenLayout
from attnopt.ir import GNALayout

OP_NAME = "attnopt::gna_attention"
SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, int[] shape, int[] window, "
    "int[] stride, int[] dilation, bool[] causal, int leading, str normalizer, int[] heads=[], "
    "int trailing=0) -> Tensor"
)


def make_layout(shape, window, stride, dilation, causal) -> GNALayout:
    return GNALayout(tuple(int(x) for x in shape), tuple(int(x) for x in window),
                     tuple(int(x) for x in stride), tuple(int(x) for x in dilation),
                     tuple(bool(x) for x in causal))


def _kernels_apply(q, k, v, attn_mask, normalizer) -> bool:
    """Whether the op's kernels serve the call (else backend "reference")."""
    return (q.device.type in ("cpu", "cuda") and normalizer == "softmax" and q.is_floating_point()
            and q.dtype == k.dtype == v.dtype and q.shape[1] % k.shape[1] == 0
            and (attn_mask is None or attn_mask.dtype == torch.bool or attn_mask.is_floating_point()))


@torch.library.custom_op(OP_NAME, mutates_args=(), schema=SCHEMA)
def gna_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, scale: float,
                  shape: list[int], window: list[int], stride: list[int], dilation: list[int],
                  causal: list[bool], leading: int, normalizer: str, heads: list[int] = (),
                  trailing: int = 0) -> Tensor:
    """Every device: the kernel table, per head group (see the module header)."""
    return gna_math(q, k, v, attn_mask, scale, shape, window, stride, dilation, causal, leading, normalizer,
                    heads, trailing)


def gna_math(q, k, v, attn_mask, scale, shape, window, stride, dilation, causal, leading, normalizer,
             heads=(), trailing=0, needs_grad: bool = False) -> Tensor:
    """The op's body; `needs_grad`: only the differentiable rows (its backward's recomputation)."""
    grid = make_layout(shape, window, stride, dilation, causal)
    leading, trailing = int(leading), int(trailing)
    if leading < 0 or trailing < 0:
        raise ValueError(f"gna_attention: leading {leading} / trailing {trailing} must be >= 0")
    S, n = q.shape[2], math.prod(grid.shape)
    if S != leading + n + trailing or k.shape[2] != S:
        raise ValueError(f"gna_attention: sequence {S}/{k.shape[2]} != leading {leading} + grid {n}"
                         f" + trailing {trailing}")
    params = AttentionParams(scale=float(scale), normalizer=normalizer)
    if not _kernels_apply(q, k, v, attn_mask, normalizer):
        request = select.Request.for_op("gna_attention", backend="reference")
        layout = TokenLayout(grid, leading, tuple(int(h) for h in heads), trailing)
        return select.dispatch(q, k, v, attn_mask, params, layout, request).contiguous()
    request = select.Request.for_op("gna_attention", needs_grad=needs_grad)
    layout = TokenLayout(grid, leading, trailing=trailing)

    def run_layout(q_, k_, v_, m_):
        return select.dispatch(q_, k_, v_, m_, params, layout, request)

    if every_head(heads, q.shape[1]):
        return run_layout(q, k, v, attn_mask).contiguous()
    return split_heads(q, k, v, attn_mask, heads, run_layout,
                       lambda q_, k_, v_, m_: exact_rest(q_, k_, v_, m_, scale, grid, leading, trailing))


@gna_attention.register_fake
def _gna_fake(q, k, v, attn_mask, scale, shape, window, stride, dilation, causal, leading, normalizer,
              heads=(), trailing=0):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k, v must be 4-D [B, H, S, D]")
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


autograd.register(gna_attention, "gna_attention", gna_math)
autograd.register_cpu_inference("gna_attention", gna_math)


def gna_attention_op(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, *, scale: float,
                     layout: GNALayout, leading: int = 0, normalizer: str = "softmax",
                     heads=(), trailing: int = 0) -> Tensor:
    """Call torch.ops.attnopt.gna_attention with a GNALayout (`trailing` passed only when set,
    so calls without it read as before the argument existed)."""
    return torch.ops.attnopt.gna_attention(
        q, k, v, attn_mask, float(scale), list(layout.shape), list(layout.window),
        list(layout.stride), list(layout.dilation), [bool(c) for c in layout.causal], int(leading),
        normalizer, [int(h) for h in heads], *([int(trailing)] if trailing else []))

