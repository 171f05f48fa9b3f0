"""The exact dense path: F.scaled_dot_product_attention whenever it can express the case, else the
float32 reference math. Any device; what every faster kernel falls back to.

Canonical layouts (BHSD, see params.py):
  q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv], attn_mask broadcastable to
  [B, H, Sq, Skv] (bool: True = attend; float: added to the scores), out [B, H, Sq, Dv] in q.dtype.
  A GNA layout reaches this path as a bool mask (the callers AND it into attn_mask).

Why SDPA first: it is torch's fused kernel (flash / memory-efficient / math per device), exact, and
differentiable; the reference materialises [B, H, Sq, Skv] float32 scores. SDPA cannot express a
non-softmax normalizer, a softcap or mixed dtypes: those take the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from attnopt.codegen.params import AttentionParams, TokenLayout
from attnopt.codegen.reference import reference_attention, structural_mask
from attnopt.ir.vocab import EXACT_FILL


def sdpa_float_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """SDPA wants the float mask in q's dtype. Casting a finite fp32 mask such as finfo(fp32).min to
    fp16 would turn it into -inf and could fully mask a row that the model does not mask; saturate
    finite values instead so only real -inf stays -inf."""
    if mask.dtype == dtype:
        return mask
    info = torch.finfo(dtype)
    return torch.where(torch.isinf(mask), mask, mask.clamp(info.min, info.max)).to(dtype)


def sdpa_can_run(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, params: AttentionParams,
                 layout: TokenLayout | None = None) -> tuple[bool, str]:
    """Whether SDPA expresses the case (the kernel table's signature; a layout is always
    expressible: it becomes a bool mask)."""
    if params.normalizer != "softmax":
        return False, f"normalizer {params.normalizer!r}"
    if params.softcap is not None:
        return False, "softcap"
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        return False, f"mixed or non-float dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    if attn_mask is not None and not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        return False, f"mask dtype {attn_mask.dtype}"
    return True, ""


# Below this many keys the scan costs more than trimming can save.
_TRIM_MIN_KEYS = 128
# A decode step (at most this many queries) below _TRIM_MIN_WORK multiply-adds per product
# (B * H * Sq * Skv * D) is not scanned either: the scan is ~6 small ops (~30-70 us on the 2-core
# host, more than a third of SDPA's time for one query over 640 keys, B1 H8 D64), and a static
# cache's unwritten slots are a small share of its keys there (bench/generate.py: 0-20%).
_TRIM_DECODE_QUERIES = 16
_TRIM_MIN_WORK = 1 << 21


def small_decode(q: Tensor, k: Tensor) -> bool:
    """A decode step too small for a scan of the mask to pay: at most 16 queries and under 2M
    multiply-adds per product (B * H * Sq * D * Skv)."""
    return q.shape[2] <= _TRIM_DECODE_QUERIES and q.numel() * k.shape[2] < _TRIM_MIN_WORK


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
    On CPU, keys that padding hides from every query are not computed (trim_padded_keys; not
    scanned for at a small decode step, where the scan costs more than it can save)."""
    if attn_mask is not None and q.device.type == "cpu" and not small_decode(q, k):
        trimmed = trim_padded_keys(k, v, attn_mask, p)
        if trimmed is not None:
            k, v, attn_mask = trimmed
    q_len, kv_len = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    is_causal = False
    mask = attn_mask
    top_left_only = p.causal and p.window is None and (p.causal_alignment == "top_left" or q_len == kv_len)
    # one bottom-right query (a decode step) sees every key: no structure to build
    sees_all = p.causal and p.window is None and p.causal_alignment == "bottom_right" and q_len == 1
    if top_left_only and attn_mask is None:
        is_causal = True
    elif not sees_all:
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
        mask = sdpa_float_mask(mask, q.dtype)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=p.scale, enable_gqa=gqa
    )


def exact_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, p: AttentionParams) -> Tensor:
    """Exact on any device: SDPA when it can express the case, else the float32 reference math
    (the kernel table's last two rows, "sdpa" and "reference", without a layout)."""
    ok, _ = sdpa_can_run(q, k, v, attn_mask, p)
    if ok:
        return sdpa_attention(q, k, v, attn_mask, p)
    return reference_attention(q, k, v, attn_mask, **p.kwargs())
