"""The custom op `torch.ops.attnopt.attention`: what graph rewrites splice in place of an attention site.

Canonical layouts (BHSD, see params.py):
  q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv], attn_mask broadcastable to [B, H, Sq, Skv]
  (bool: True = attend; float: added to the scores), out [B, H, Sq, Dv] in q.dtype, contiguous.

Schema (saved .pt2 programs contain it: it must not change; "absent" scalars are the sentinels of
params.py because optional scalars are awkward in schemas and in exported programs):
  attnopt::attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, bool causal,
                     str causal_alignment, int window_left, int window_right, float softcap,
                     str normalizer) -> Tensor
  window_left / window_right = -1: no limit on that side; softcap = 0.0: no softcap.

Implementations:
  fake/meta  shape [B, H, Sq, Dv], dtype q.dtype (torch.export, torch.compile, dynamic shapes)
  any device the kernel table (select.py) as caller "attention": on CUDA the generated Triton kernels,
             on CPU the exact sliding-window kernel where its windows leave keys out, else exact SDPA
             or the reference math (on CPU, trailing keys that a padding mask hides from every query
             are skipped: exactly 0). ATTNOPT_FORCE_TRITON=1 makes CPU calls try the Triton kernels
             under the interpreter first. Triton refusals are logged once per distinct reason.
  CPU, no grad the same body called straight from the op's AutogradCPU kernel (autograd.
             register_cpu_inference): the custom op's own layers cost about as much as a decode step.
Autograd (codegen/autograd.py): gradients of q, k, v and a float attn_mask (a learned bias); the
backward is the op attnopt::attention_backward: the FlashAttention-2 Triton backward on CUDA (or under
ATTNOPT_FORCE_TRITON=1) where it takes the call, else exact recomputation through the table's
differentiable rows (for windows on CPU the compiled tile forward + backward, cpu/native_backward.py,
or SDPA per tile group; SDPA; the reference math).

The op must be registered before a saved .pt2 that contains it is loaded: importing `attnopt` does it.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from attnopt.codegen import autograd, select
from attnopt.codegen.params import NO_SOFTCAP, NO_WINDOW_LIMIT, AttentionParams
from attnopt.ir.vocab import CAUSAL_ALIGNMENTS, NORMALIZERS

OP_NAME = "attnopt::attention"
SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, bool causal, str causal_alignment, "
    "int window_left, int window_right, float softcap, str normalizer) -> Tensor"
)

if os.environ.get(select.FORCE_TRITON_ENV, "0") == "1":
    # Triton reads TRITON_INTERPRET when its own language library is imported, which happens
    # later during `import attnopt`; after that it is too late to switch to the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _validate(q: Tensor, k: Tensor, v: Tensor, p: AttentionParams) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if p.causal_alignment not in CAUSAL_ALIGNMENTS:
        raise ValueError(f"causal_alignment must be one of {CAUSAL_ALIGNMENTS}, got {p.causal_alignment!r}")
    if p.normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {p.normalizer!r}")


@torch.library.custom_op(OP_NAME, mutates_args=(), schema=SCHEMA)
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    scale: float,
    causal: bool,
    causal_alignment: str,
    window_left: int,
    window_right: int,
    softcap: float,
    normalizer: str,
) -> Tensor:
    """Every device: the first kernel of the table that takes the call."""
    return attention_math(q, k, v, attn_mask, scale, causal, causal_alignment, window_left, window_right,
                          softcap, normalizer)


# A model calls the op with the same few scalar sets on every step: parse each once (a decode step's
# whole attention is ~100 us on CPU, and these Python objects are part of what it pays per call).
_params = functools.lru_cache(maxsize=1024)(AttentionParams.from_schema)


def attention_math(q, k, v, attn_mask, scale, causal, causal_alignment, window_left, window_right, softcap,
                   normalizer, needs_grad: bool = False) -> Tensor:
    """The op's body; `needs_grad`: only the differentiable rows (its backward's recomputation)."""
    p = _params(scale, causal, causal_alignment, window_left, window_right, softcap, normalizer)
    _validate(q, k, v, p)
    request = select.Request.for_op("attention", needs_grad=needs_grad)
    # The fake impl promises a contiguous [B, H, Sq, Dv] result (inductor asserts strides);
    # SDPA's CPU kernel returns a transposed view.
    return select.dispatch(q, k, v, attn_mask, p, None, request).contiguous()


@attention.register_fake
def _attention_fake(q, k, v, attn_mask, scale, causal, causal_alignment, window_left, window_right, softcap, normalizer):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k, v must be 4-D [B, H, S, D]")
    torch._check(q.shape[-1] == k.shape[-1], lambda: "q and k head dims differ")
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


autograd.register(attention, "attention", attention_math)
autograd.register_cpu_inference("attention", attention_math)


def attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    *,
    scale: float,
    causal: bool = False,
    causal_alignment: str = "top_left",
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    normalizer: str = "softmax",
) -> Tensor:
    """Call torch.ops.attnopt.attention with Python conventions (None = absent)."""
    left, right = window if window is not None else (None, None)
    for side, value in (("left", left), ("right", right)):
        if value is not None and value < 0:
            raise ValueError(f"window {side} must be >= 0 or None, got {value}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    return torch.ops.attnopt.attention(
        q,
        k,
        v,
        attn_mask,
        float(scale),
        bool(causal),
        causal_alignment,
        NO_WINDOW_LIMIT if left is None else int(left),
        NO_WINDOW_LIMIT if right is None else int(right),
        NO_SOFTCAP if softcap is None else float(softcap),
        normalizer,
    )
