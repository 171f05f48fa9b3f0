"""The custom op `torch.ops.attnopt.attention`: what graph rewrites splice in place of an attention site.

Canonical layouts (BHSD), as in reference.py:
  q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv], attn_mask broadcastable to [B, H, Sq, Skv]
  (bool: True = attend; float: added to the scores), out [B, H, Sq, Dv] in q.dtype.

Schema (scalars that are "absent" use sentinels, because optional scalars are awkward in schemas and
in exported programs):
  attnopt::attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, bool causal,
                     str causal_alignment, int window_left, int window_right, float softcap,
                     str normalizer) -> Tensor
  window_left / window_right = -1: no limit on that side; softcap = 0.0: no softcap.

Implementations:
  fake/meta  shape [B, H, Sq, Dv], dtype q.dtype (torch.export, torch.compile, dynamic shapes)
  CPU        exact: F.scaled_dot_product_attention whenever it can express the case, else reference math;
             trailing keys that a padding mask hides from every query are skipped (exactly 0)
  CUDA       tries each function in CUDA_KERNELS (filled by the Triton codegen, imported on first
             call), then the exact path
  ATTNOPT_FORCE_TRITON=1 makes the CPU implementation run the Triton kernels under the interpreter

The op must be registered before a saved .pt2 that contains it is loaded: importing `attnopt` does it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from attnopt.codegen.reference import (
    CAUSAL_ALIGNMENTS,
    EXACT_FILL,
    NORMALIZERS,
    reference_attention,
    structural_mask,
)

OP_NAME = "attnopt::attention"
SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, bool causal, str causal_alignment, "
    "int window_left, int window_right, float softcap, str normalizer) -> Tensor"
)
NO_WINDOW_LIMIT = -1
NO_SOFTCAP = 0.0


@dataclass(frozen=True)
class AttentionParams:
    """The op's scalar arguments in Python conventions (None = absent)."""

    scale: float
    causal: bool = False
    causal_alignment: str = "top_left"
    window: tuple[int | None, int | None] | None = None
    softcap: float | None = None
    normalizer: str = "softmax"

    @classmethod
    def from_schema(
        cls,
        scale: float,
        causal: bool,
        causal_alignment: str,
        window_left: int,
        window_right: int,
        softcap: float,
        normalizer: str,
    ) -> "AttentionParams":
        left = None if window_left == NO_WINDOW_LIMIT else int(window_left)
        right = None if window_right == NO_WINDOW_LIMIT else int(window_right)
        return cls(
            scale=float(scale),
            causal=bool(causal),
            causal_alignment=causal_alignment,
            window=None if left is None and right is None else (left, right),
            softcap=None if softcap == NO_SOFTCAP else float(softcap),
            normalizer=normalizer,
        )

    def kwargs(self) -> dict:
        return dict(
            scale=self.scale,
            causal=self.causal,
            causal_alignment=self.causal_alignment,
            window=self.window,
            softcap=self.softcap,
            normalizer=self.normalizer,
        )


# Hook for generated CUDA kernels: each is called as fn(q, k, v, attn_mask, params) and returns the
# output, or None to decline (e.g. an unsupported mask); the first non-None answer wins. The exact
# path runs when all decline. Append with register_cuda_kernel.
CudaKernel = Callable[[Tensor, Tensor, Tensor, "Tensor | None", AttentionParams], "Tensor | None"]
CUDA_KERNELS: list[CudaKernel] = []


def register_cuda_kernel(fn: CudaKernel, *, first: bool = False) -> CudaKernel:
    if first:
        CUDA_KERNELS.insert(0, fn)
    else:
        CUDA_KERNELS.append(fn)
    return fn


def _sdpa_float_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    # SDPA wants the float mask in q's dtype. Casting a finite fp32 mask such as finfo(fp32).min to
    # fp16 would turn it into -inf and could fully mask a row that the model does not mask; saturate
    # finite values instead so only real -inf stays -inf.
    if mask.dtype == dtype:
        return mask
    info = torch.finfo(dtype)
    return torch.where(torch.isinf(mask), mask, mask.clamp(info.min, info.max)).to(dtype)


def sdpa_can_run(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, p: AttentionParams) -> tuple[bool, str]:
    if p.normalizer != "softmax":
        return False, f"normalizer {p.normalizer!r}"
    if p.softcap is not None:
        return False, "softcap"
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        return False, f"mixed or non-float dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    if attn_mask is not None and not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        return False, f"mask dtype {attn_mask.dtype}"
    return True, ""


# Below this many keys the scan costs more than trimming can save.
_TRIM_MIN_KEYS = 128


def trim_padded_keys(k: Tensor, v: Tensor, attn_mask: Tensor, p: AttentionParams
                     ) -> tuple[Tensor, Tensor, Tensor] | None:
    """Drop the trailing keys that the mask hides from every query (key padding at the end of a
    fixed-length input): their probabilities are exactly 0, so attention over the keys before
    them is the same computation minus zeros. Returns (k, v, mask) views, or None when nothing
    can be dropped or dropping would not be exact: causal/window layouts (bottom-right alignment
    depends on the key count), masks broadcast over keys, a float fill above -1e30, or a query
    row with every key masked (its softmax is uniform over all keys, trimmed ones included).
    Cost when there is no padding: one read of the mask's last column."""
    kv_len = k.shape[2]
    if (p.causal or p.window is not None or kv_len < _TRIM_MIN_KEYS or attn_mask.shape[-1] != kv_len
            or attn_mask.numel() == 0):
        return None
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or is_fake(attn_mask):
        return None  # the key count would depend on data: a tracer cannot follow it

    def attended(m: Tensor) -> Tensor:  # NaN counts as attended: it is not a proven exact fill
        return m if m.dtype == torch.bool else ~(m <= EXACT_FILL)

    if bool(attended(attn_mask[..., -1]).any()):
        return None
    keep = attended(attn_mask)
    rows_live = keep.any(-1)
    if not bool(rows_live.all()):
        return None
    live_keys = keep.reshape(-1, kv_len).any(0).nonzero()
    n = int(live_keys[-1]) + 1
    if n >= kv_len:
        return None
    return k[:, :, :n], v[:, :, :n], attn_mask[..., :n]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, p: AttentionParams) -> Tensor:
    """The case expressed with F.scaled_dot_product_attention (caller checked sdpa_can_run).
    On CPU, keys that padding hides from every query are not computed (trim_padded_keys)."""
    if attn_mask is not None and q.device.type == "cpu":
        trimmed = trim_padded_keys(k, v, attn_mask, p)
        if trimmed is not None:
            k, v, attn_mask = trimmed
    q_len, kv_len = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    is_causal = False
    mask = attn_mask
    top_left_only = p.causal and p.window is None and (p.causal_alignment == "top_left" or q_len == kv_len)
    if top_left_only and attn_mask is None:
        is_causal = True
    else:
        allowed = structural_mask(
            q_len, kv_len, causal=p.causal, causal_alignment=p.causal_alignment, window=p.window, device=q.device
        )
        if allowed is not None:
            if mask is None:
                mask = allowed
            elif mask.dtype == torch.bool:
                mask = mask & allowed
            else:
                mask = torch.where(allowed, mask, float("-inf"))
    if mask is not None and mask.dtype != torch.bool:
        mask = _sdpa_float_mask(mask, q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=p.scale, enable_gqa=gqa
    )


def exact_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, p: AttentionParams) -> Tensor:
    """Exact on any device: SDPA when it can express the case, else the float32 reference math."""
    ok, _ = sdpa_can_run(q, k, v, attn_mask, p)
    if ok:
        return sdpa_attention(q, k, v, attn_mask, p)
    return reference_attention(q, k, v, attn_mask, **p.kwargs())


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
    """Default (any device without its own kernel): the exact path."""
    p = AttentionParams.from_schema(scale, causal, causal_alignment, window_left, window_right, softcap, normalizer)
    _validate(q, k, v, p)
    # The fake impl promises a contiguous [B, H, Sq, Dv] result (inductor asserts strides);
    # SDPA's CPU kernel returns a transposed view.
    return exact_attention(q, k, v, attn_mask, p).contiguous()


@attention.register_fake
def _attention_fake(q, k, v, attn_mask, scale, causal, causal_alignment, window_left, window_right, softcap, normalizer):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k, v must be 4-D [B, H, S, D]")
    torch._check(q.shape[-1] == k.shape[-1], lambda: "q and k head dims differ")
    return q.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3]))


FORCE_TRITON_ENV = "ATTNOPT_FORCE_TRITON"
_TRITON_IMPORTED = False
if os.environ.get(FORCE_TRITON_ENV, "0") == "1":
    # Triton reads TRITON_INTERPRET when its own language library is imported, which happens
    # later during `import attnopt`; after that it is too late to switch to the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _ensure_triton_kernels() -> None:
    """Import the Triton codegen once (it registers itself in CUDA_KERNELS); lazily, because
    importing triton costs time and is not needed on CPU."""
    global _TRITON_IMPORTED
    if _TRITON_IMPORTED:
        return
    _TRITON_IMPORTED = True
    try:
        import attnopt.codegen.triton  # noqa: F401
    except ImportError:  # pragma: no cover - triton missing: the exact path serves
        pass


def _forced_triton(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, p: AttentionParams) -> Tensor | None:
    """ATTNOPT_FORCE_TRITON=1: run the generated kernels on CPU under the Triton interpreter
    (CI of whole rewrites through the Triton path; tiny inputs only)."""
    if os.environ.get(FORCE_TRITON_ENV, "0") != "1":
        return None
    from attnopt.codegen import triton as tk

    ok, why = tk.can_run(q, k, v, attn_mask, p)
    if not ok:
        tk.log_fallback_once(why)
        return None
    return tk.launch(q, k, v, attn_mask, p)


@attention.register_kernel("cpu")
def _attention_cpu(q, k, v, attn_mask, scale, causal, causal_alignment, window_left, window_right, softcap, normalizer):
    p = AttentionParams.from_schema(scale, causal, causal_alignment, window_left, window_right, softcap, normalizer)
    _validate(q, k, v, p)
    out = _forced_triton(q, k, v, attn_mask, p)
    if out is not None:
        return out.contiguous()
    if p.window is not None:
        out = _cpu_window(q, k, v, attn_mask, p)
        if out is not None:
            return out
    # The fake impl promises a contiguous [B, H, Sq, Dv] result (inductor asserts strides);
    # SDPA's CPU kernel returns a transposed view.
    return exact_attention(q, k, v, attn_mask, p).contiguous()


def _cpu_window(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, p: AttentionParams) -> Tensor | None:
    """The exact CPU sliding-window kernel when the window leaves keys out (the dense path would
    compute every query x key pair under a mask: measured 890 ms vs 63 ms for a 4K causal window
    of 256, 8 heads, 2-core EPYC), else None."""
    from attnopt.codegen.cpu import tiles as cpu_kernels

    ok, _ = cpu_kernels.can_run_cpu_sliding_window(p, q, k, v, attn_mask)
    if not ok:
        return None
    left, upper = cpu_kernels.window_bounds(p)
    if min(q.shape[2], 64) + left + upper >= k.shape[2]:
        return None  # every run of queries sees (nearly) every key: nothing to skip
    return cpu_kernels.sliding_window_attention(q, k, v, p, attn_mask).contiguous()


@attention.register_kernel("cuda")
def _attention_cuda(q, k, v, attn_mask, scale, causal, causal_alignment, window_left, window_right, softcap, normalizer):
    p = AttentionParams.from_schema(scale, causal, causal_alignment, window_left, window_right, softcap, normalizer)
    _validate(q, k, v, p)
    _ensure_triton_kernels()
    for kernel in CUDA_KERNELS:
        out = kernel(q, k, v, attn_mask, p)
        if out is not None:
            return out.contiguous()
    return exact_attention(q, k, v, attn_mask, p).contiguous()


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
